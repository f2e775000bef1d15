"""What the model is trained to predict: the next token (causal LM) or masked tokens (MLM).

Either way a batch of records [batch, n_ctx + 1] becomes an `Example`: model inputs, targets
aligned with them, and a weight per position (1 where the position counts in the loss). A
causal target counts unless it is padding (`padding_id`, or segment 0 of a packed row), the
first token of another document than its input's (packed rows), or context of a fine-tuning
record (`loss_mask` 0).

Masked-LM examples are drawn on the device inside the training step, from the step's RNG, so
a resumed run masks exactly as an uninterrupted one would. Selection follows BERT (GPT-Neo's
`mlm_sample_text` had its labels inverted: it trained a copy of the visible tokens):
- a position is selected with probability `mlm_mask_prob`, unless it holds a token of
  `mlm_mask_ignore_ids`, the cls token or `padding_id`;
- of the selected positions, `mlm_random_token_prob` get a uniformly random token,
  `mlm_same_token_prob` keep theirs and the rest get `mlm_mask_id`;
- the targets are the original tokens, and only selected positions count.
With `mlm_cls_token_id` every example starts with that token and holds n_ctx - 1 record tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gpt_neo.config import Config
from gpt_neo.data.batch import Batch, as_batch
from gpt_neo.errors import ConfigError

# fold_in data for the masking RNG of a step, apart from the dropout streams (0, 1, ...)
MASKING_STREAM = 0x4D41534B


class Example(NamedTuple):
    inputs: jax.Array  # [batch, n_ctx] int32
    targets: jax.Array  # [batch, n_ctx] int32
    weights: jax.Array  # [batch, n_ctx] float32
    segments: jax.Array | None = None  # [batch, n_ctx] int32: the inputs' documents (packed)


def make_example(cfg: Config, batch: Batch | jax.Array, rng: jax.Array | None = None) -> Example:
    """A `Batch` (or bare records [batch, n_ctx + 1]) -> this config's `Example`. A masked
    LM without `rng` masks with a key derived from `seed` (evaluation)."""
    batch = as_batch(batch)
    if not cfg.mlm_training:
        return causal_example(cfg, batch)
    if batch.segments is not None or batch.loss_mask is not None:
        raise ConfigError(
            "mlm_training reads unpacked records only: use a documents or chunks sampling mode"
        )
    return masked_example(cfg, batch.tokens, jax.random.key(cfg.seed) if rng is None else rng)


def causal_example(cfg: Config, batch: Batch | jax.Array) -> Example:
    """Predict each next token; see the module docstring for the targets that do not count."""
    tokens, segments, loss_mask = as_batch(batch)
    targets = tokens[:, 1:]
    if cfg.padding_id is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    else:
        weights = (targets != cfg.padding_id).astype(jnp.float32)
    input_segments = None
    if segments is not None:
        input_segments = segments[:, :-1]
        continues = (segments[:, 1:] == input_segments) & (segments[:, 1:] != 0)
        weights = weights * continues.astype(jnp.float32)
    if loss_mask is not None:
        weights = weights * loss_mask[:, 1:].astype(jnp.float32)
    return Example(tokens[:, :-1], targets, weights, input_segments)


def masked_example(cfg: Config, tokens: jax.Array, rng: jax.Array) -> Example:
    """BERT-style masking of the first n_ctx tokens of each record (see the module docstring)."""
    sequence = tokens[:, : cfg.n_ctx]
    never = list(cfg.mlm_mask_ignore_ids)
    if cfg.mlm_cls_token_id is not None:
        cls = jnp.full((sequence.shape[0], 1), cfg.mlm_cls_token_id, sequence.dtype)
        sequence = jnp.concatenate([cls, sequence[:, :-1]], axis=1)
        never.append(cfg.mlm_cls_token_id)
    if cfg.padding_id is not None:
        never.append(cfg.padding_id)
    select_rng, kind_rng, token_rng = jax.random.split(rng, 3)
    selected = jax.random.uniform(select_rng, sequence.shape) < cfg.mlm_mask_prob
    if never:
        selected &= ~jnp.isin(sequence, jnp.asarray(never, sequence.dtype))
    # one uniform draw splits the selected positions: [mask | random token | same token]
    kind = jax.random.uniform(kind_rng, sequence.shape)
    masked_share = 1.0 - cfg.mlm_same_token_prob - cfg.mlm_random_token_prob
    random_tokens = jax.random.randint(token_rng, sequence.shape, 0, cfg.n_vocab, sequence.dtype)
    assert cfg.mlm_mask_id is not None  # the config requires it with mlm_training
    inputs = jnp.where(selected & (kind < masked_share), cfg.mlm_mask_id, sequence)
    to_random = selected & (kind >= masked_share) & (kind < 1.0 - cfg.mlm_same_token_prob)
    inputs = jnp.where(to_random, random_tokens, inputs)
    return Example(inputs, sequence, selected.astype(jnp.float32))
