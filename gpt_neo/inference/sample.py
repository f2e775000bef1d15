"""Sampling: a KV-cache decoder. The prompts are run once (prefill) to fill every layer's key
and value cache, then each step feeds one new token per row and attends over the cache; the
prefix is never recomputed.

Prompts of different lengths are left-padded to a common length: each row's positions start at
0 at its first real token, and padding slots are masked out as keys. The whole decode runs as
one jitted `lax.while_loop` (it stops early once every row has produced `eos_id`); with
`on_token` it runs step by step instead so tokens can be streamed as they come.

A row may hold several prompts packed (`segment_ids`): each attends only to itself, its
positions restart at 0, and generation continues the row's last prompt, as if it were alone.

Limits (documented in README): a prompt longer than n_ctx - 1 tokens keeps its last n_ctx - 1
tokens (with a warning); generation stops when a row reaches n_ctx positions.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from gpt_neo import axes
from gpt_neo.config import Config, require_causal
from gpt_neo.errors import ConfigError
from gpt_neo.inference.apply import mesh_of
from gpt_neo.mesh import activation_sharding, constrain, data_parallel_size, pieces, rules
from gpt_neo.models.blocks import COMPUTE_DTYPES, DecodeCache, cast_params
from gpt_neo.models.gpt import forward, head, trunk
from gpt_neo.models.positions import segment_positions
from gpt_neo.models.stack import layer_stacks


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits. temperature 0 is greedy (argmax)."""

    temperature: float = 0.9  # GPT-Neo's fixed sampling temperature
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1.0 keeps all

    def __post_init__(self):
        if not self.temperature >= 0 or math.isinf(self.temperature):  # also refuses NaN
            raise ConfigError(f"temperature must be a number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def choose(logits: jax.Array, sampling: Sampling, rng: jax.Array) -> jax.Array:
    """Next token ids [batch] from float32 logits [batch, vocab]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # the most likely token is always kept
        sorted_logits = jnp.where(mass_before < sampling.top_p, sorted_logits, -jnp.inf)
        logits = (
            jnp.full_like(logits, -jnp.inf)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(sorted_logits)
        )
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _empty_cache(cfg: Config, batch: int, length: int) -> tuple:
    """Per layer (keys [batch, kv_heads, head_dim, length], values [batch, kv_heads, length,
    head_dim]), see `attention.KVCache`; None for `none` layers. Stacked like the parameters
    where the layers are scanned: per stack, with a leading layers axis."""
    dtype = COMPUTE_DTYPES[cfg.precision]
    stacks = layer_stacks(cfg)
    kinds = cfg.attention_types if stacks is None else cfg.attention_types[: stacks.period]
    layers = () if stacks is None else (stacks.repeats,)

    def zeros(shape, dims):  # sharded per the layout when traced under a mesh
        dims = (None,) * len(layers) + dims
        return constrain(jnp.zeros(layers + shape, dtype), cfg, dims)

    k_shape = (batch, cfg.n_kv_head, cfg.head_dim, length)
    v_shape = (batch, cfg.n_kv_head, length, cfg.head_dim)
    return tuple(
        None
        if kind == "none"
        else (zeros(k_shape, axes.CACHED_KEYS), zeros(v_shape, axes.CACHED_VALUES))
        for kind in kinds
    )


@dataclass(frozen=True)
class Decoder:
    """The decode of one batch shape: prefill, then `step` until `running` is false. The loop
    carry is (step index, cache, last logits [batch, vocab], new tokens [batch, max_new], done)."""

    cfg: Config
    sampling: Sampling
    max_new: int
    eos_id: int | None
    # the cache's length is a multiple of this: the devices a sequence is split over
    slot_multiple: int = 1

    def cache_length(self, prompt_len: int) -> int:
        """Slots for the prompt and the new tokens, rounded up to `slot_multiple` (the slots
        past the last new token are never written and, being later, never seen)."""
        return -(-(prompt_len + self.max_new) // self.slot_multiple) * self.slot_multiple

    def key_valid(self, prompts, lengths):
        """[batch, cache length]: slots holding a real token (not left padding)."""
        pad = prompts.shape[1] - lengths
        return jnp.arange(self.cache_length(prompts.shape[1]))[None, :] >= pad[:, None]

    def cache_segments(self, segments):
        """Packed prompts' segment per cache slot [batch, cache length]: the prompt's, then
        the row's last segment for every generated token (None: rows are not packed)."""
        if segments is None:
            return None
        new_slots = self.cache_length(segments.shape[1]) - segments.shape[1]
        last = jnp.broadcast_to(segments[:, -1:], (segments.shape[0], new_slots))
        return jnp.concatenate([segments, last], axis=1)

    def next_position(self, lengths, segments, i):
        """[batch]: the position of generated token i (after the row's last prompt)."""
        if segments is None:
            return lengths + i
        return segment_positions(segments)[:, -1] + 1 + i

    def prefill(self, params, prompts, lengths, segments=None):
        batch, prompt_len = prompts.shape
        slots = jnp.arange(prompt_len)
        if segments is None:
            positions = jnp.maximum(slots[None, :] - (prompt_len - lengths)[:, None], 0)
        else:
            positions = segment_positions(segments)  # left padding is a segment of its own
        layers = _empty_cache(self.cfg, batch, self.cache_length(prompt_len))
        valid = self.key_valid(prompts, lengths)
        cache = DecodeCache(layers, slots, valid, self.cache_segments(segments))
        x, cache, _ = trunk(self.cfg, params, prompts, positions=positions, cache=cache)
        assert cache is not None  # trunk extends the cache it was given
        logits = head(self.cfg, params, x[:, -1:])[:, 0]  # only the last position's: no [b, t, v]
        out = jnp.zeros((batch, self.max_new), jnp.int32)
        return jnp.int32(0), cache.layers, logits, out, jnp.zeros(batch, bool)

    def step(self, params, prompts, lengths, segments, rng, carry):
        i, cache, last_logits, out, done = carry
        token = choose(last_logits, self.sampling, jax.random.fold_in(rng, i))
        if self.eos_id is not None:
            token = jnp.where(done, self.eos_id, token)
            done = done | (token == self.eos_id)
        out = out.at[:, i].set(token)
        slot = (prompts.shape[1] + i)[None]
        valid = self.key_valid(prompts, lengths)
        cache = DecodeCache(cache, slot, valid, self.cache_segments(segments))
        position = self.next_position(lengths, segments, i)[:, None]
        logits, cache, _ = forward(
            self.cfg, params, token[:, None], positions=position, cache=cache
        )
        assert cache is not None
        return i + 1, cache.layers, logits[:, -1], out, done

    def running(self, carry):
        i, *_, done = carry
        return (i < self.max_new) & ~jnp.all(done)

    def run(self, params, prompts, lengths, rng, segments=None):
        """New tokens [batch, max_new] in one while_loop (rows past eos hold eos)."""
        carry = self.prefill(params, prompts, lengths, segments)
        step = functools.partial(self.step, params, prompts, lengths, segments, rng)
        return jax.lax.while_loop(self.running, step, carry)[3]


@functools.lru_cache(maxsize=32)
def _compiled(decoder: Decoder):
    """(whole decode, prefill, one step): jitted once per decoder and reused."""
    return (
        jax.jit(decoder.run),
        jax.jit(decoder.prefill),
        jax.jit(decoder.step, donate_argnums=5),
    )


def generate(
    cfg: Config,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.9,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    on_token: Callable[[list[int | None]], None] | None = None,
    segment_ids: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (a list of token-id lists, of any lengths).

    Each row stops after it produces `eos_id` (default `cfg.eos_id`; the eos token is kept in
    its output) or after `max_new_tokens`. `temperature=0` is greedy. `on_token(tokens)` is
    called after every step with each row's new token (None once a row has stopped).
    Runs on the mesh the params live on, with the config's layout. `segment_ids` (one list per
    prompt, of its length: equal ids = one prompt, contiguous) packs several prompts in a row;
    each row's output continues its last prompt, exactly as that prompt alone would.
    """
    require_causal(cfg, "generating text")
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not prompts:
        return []
    eos_id = cfg.eos_id if eos_id is None else eos_id
    mesh = mesh_of(params)
    split = 1 if mesh is None else pieces(dict(mesh.shape), rules(cfg).activations, axes.SEQ)
    rows, lengths, max_new = _prepare(cfg, prompts, max_new_tokens, split)
    segments = None if segment_ids is None else _packed_segments(prompts, segment_ids, rows)
    rows, lengths, n_real = _pad_batch_for_mesh(cfg, mesh, rows, lengths)
    if segments is not None:
        segments = np.concatenate([segments, np.repeat(segments[-1:], len(rows) - n_real, 0)])
    rng = jax.random.key(seed)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        # Cast once per call, not in every decode step: decoding reads all weights per token,
        # so bfloat16 weights halve the bytes it moves.
        params = cast_params(cfg, params)
        tokens = jnp.asarray(rows)
        seg = None if segments is None else jnp.asarray(segments)
        if mesh is not None:
            tokens, seg = jax.device_put((tokens, seg), activation_sharding(mesh, cfg, axes.TOKENS))
        lengths = jnp.asarray(lengths)
        decoder = Decoder(cfg, sampling, max_new, eos_id, split)
        if on_token is None:
            out = np.asarray(_compiled(decoder)[0](params, tokens, lengths, rng, seg))
        else:
            out = _stream(decoder, params, tokens, lengths, seg, rng, on_token, n_real)
    return [_until_eos(list(row), eos_id) for row in out[:n_real]]


def _stream(decoder: Decoder, params, tokens, lengths, segments, rng, on_token, n_real):
    """The decode one step at a time, calling on_token after each."""
    _, prefill, step = _compiled(decoder)
    carry = prefill(params, tokens, lengths, segments)
    stopped = np.zeros(tokens.shape[0], bool)
    for i in range(decoder.max_new):
        carry = step(params, tokens, lengths, segments, rng, carry)
        new = np.asarray(carry[3][:, i])
        on_token(
            [None if s else int(t) for s, t in zip(stopped[:n_real], new[:n_real], strict=True)]
        )
        if decoder.eos_id is not None:
            stopped |= new == decoder.eos_id
            if stopped[:n_real].all():
                break
    return np.asarray(carry[3])


def _until_eos(tokens: list, eos_id: int | None) -> list[int]:
    tokens = [int(t) for t in tokens]
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


def _prepare(cfg: Config, prompts, max_new_tokens: int, multiple: int = 1):
    """Left-pad prompts to one length (a multiple of `multiple`: the devices a sequence is
    split over), truncating any longer than n_ctx - 1 from the left; cap the new tokens so
    that no row passes n_ctx positions."""
    limit = cfg.n_ctx - 1
    prompts = [list(map(int, p)) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt is empty: give at least one token per prompt")
    if too_long := [i for i, p in enumerate(prompts) if len(p) > limit]:
        warnings.warn(
            f"prompt(s) {too_long} are longer than n_ctx - 1 = {limit} tokens; keeping the last "
            f"{limit} tokens of each",
            stacklevel=3,
        )
        prompts = [p[-limit:] for p in prompts]
    if bad := sorted({t for p in prompts for t in p if not 0 <= t < cfg.n_vocab}):
        raise ConfigError(
            f"prompt token ids {bad[:5]} are outside the vocabulary [0, {cfg.n_vocab})"
        )
    prompt_len = max(map(len, prompts))
    max_new = min(max_new_tokens, cfg.n_ctx - prompt_len)
    if max_new < max_new_tokens:
        warnings.warn(
            f"max_new_tokens {max_new_tokens} would pass n_ctx {cfg.n_ctx} after a "
            f"{prompt_len}-token prompt; generating {max_new}",
            stacklevel=3,
        )
    # Left padding is masked out as keys; it holds padding_id, as GPT-Neo padded prompts.
    prompt_len = -(-prompt_len // multiple) * multiple
    rows = np.full((len(prompts), prompt_len), cfg.padding_id or 0, np.int32)
    for row, p in zip(rows, prompts, strict=True):
        row[prompt_len - len(p) :] = p
    return rows, np.array([len(p) for p in prompts], np.int32), max_new


def _packed_segments(prompts, segment_ids, rows: np.ndarray) -> np.ndarray:
    """`segment_ids` left-padded like `rows` (padding: segment 0), checked against the prompts."""
    if len(segment_ids) != len(prompts):
        raise ConfigError(f"segment_ids has {len(segment_ids)} rows for {len(prompts)} prompts")
    out = np.zeros(rows.shape, np.int32)
    for row, prompt, ids in zip(out, prompts, segment_ids, strict=True):
        ids = np.asarray(ids, np.int32)[-rows.shape[1] :]  # truncated like the prompt
        if ids.size != min(len(prompt), rows.shape[1]) or (ids <= 0).any():
            raise ConfigError(
                "segment_ids must give each prompt token a segment id >= 1 (one list per "
                "prompt, of its length)"
            )
        row[rows.shape[1] - ids.size :] = ids
    return out


def _pad_batch_for_mesh(cfg: Config, mesh, rows, lengths):
    """Repeat the last prompt until the batch divides the data-parallel mesh axis."""
    n_real = len(rows)
    if mesh is None:
        return rows, lengths, n_real
    extra = -n_real % data_parallel_size(cfg, mesh)
    if extra:
        rows = np.concatenate([rows, np.repeat(rows[-1:], extra, axis=0)])
        lengths = np.concatenate([lengths, np.repeat(lengths[-1:], extra)])
    return rows, lengths, n_real
