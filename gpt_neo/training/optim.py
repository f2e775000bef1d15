"""Optimizers and the learning-rate schedule, from GPT-Neo's config keys, built with optax.

Differences from GPT-Neo, on purpose:
- `adam` is AdamW *with* bias correction (GPT-Neo used BERT's Adam, which has none, so its
  first steps took larger updates than lr suggests). Weight decay is decoupled and applies to
  matrices only (kernels and embeddings); GPT-Neo matched names against `norm|bias`, which
  missed `ln_f` and decayed it.
- `adafactor` follows the learning-rate schedule (GPT-Neo passed it the constant `lr`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gpt_neo.config import Config
from gpt_neo.models.stack import STACKS

DECAY_FLOOR = 0.1  # GPT-Neo decays to 10% of lr (tf cosine_decay alpha / polynomial end_lr)


def learning_rate(cfg: Config, step) -> jax.Array:
    """GPT-Neo's schedule: the decayed lr times min(1, step / warmup_steps).

    Decay runs from step 0 to `lr_decay_end` (default `train_steps`) and then stays at 10%.
    """
    step = jnp.asarray(step, jnp.float32)
    end = float(cfg.lr_decay_end or cfg.train_steps or 1)
    progress = jnp.minimum(step, end) / end
    if cfg.lr_decay == "cosine":
        decayed = cfg.lr * (
            DECAY_FLOOR + (1 - DECAY_FLOOR) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        )
    elif cfg.lr_decay == "linear":
        decayed = cfg.lr * (1 - (1 - DECAY_FLOOR) * progress)
    else:
        decayed = jnp.full_like(step, cfg.lr)
    if cfg.warmup_steps:
        decayed = decayed * jnp.minimum(1.0, step / cfg.warmup_steps)
    return decayed


def decay_mask(params):
    """Weight decay on matrices (kernels, embeddings), not on biases, norms or scalars. A
    stacked layer's leading layers axis (`gpt_neo.models.stack`) does not make a bias a
    matrix."""

    def matrix(path, p) -> bool:
        layers_axis = getattr(path[0], "key", None) == STACKS
        return p.ndim - layers_axis >= 2

    return jax.tree_util.tree_map_with_path(matrix, params)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    schedule = lambda step: learning_rate(cfg, step)  # noqa: E731 - optax wants a callable
    # Stateless placeholders keep the optimizer state's structure the same whatever the
    # settings, so a run may resume with clipping or decay switched on or off.
    clip = (
        optax.clip_by_global_norm(cfg.gradient_clipping)
        if cfg.gradient_clipping > 0
        else optax.identity()
    )
    if cfg.opt_name.lower() == "adam":
        return optax.chain(
            clip,
            optax.adamw(
                schedule,
                b1=cfg.beta1,
                b2=cfg.beta2,
                eps=cfg.epsilon,
                weight_decay=cfg.weight_decay,
                mask=decay_mask,
            ),
        )
    decay = (
        optax.add_decayed_weights(cfg.weight_decay, decay_mask)
        if cfg.weight_decay
        else optax.identity()
    )
    return optax.chain(
        clip,
        optax.scale_by_factored_rms(epsilon=cfg.ada_epsilon1),
        optax.clip_by_block_rms(1.0),
        optax.scale_by_param_block_rms(min_scale=cfg.ada_epsilon2),
        decay,
        optax.scale_by_learning_rate(schedule),
    )


def state_shardings(optimizer: optax.GradientTransformation, params, replicated):
    """Where the optimizer state lives: a moment shaped like its parameter (Adam's m and v,
    Adafactor's unfactored v) is split like the parameter; counters and Adafactor's factored
    row and column statistics (small vectors) are replicated. `params`: abstract parameters
    carrying their shardings."""
    state = jax.eval_shape(optimizer.init, params)
    return optax.tree_utils.tree_map_params(
        optimizer,
        lambda leaf, param: param.sharding if leaf.shape == param.shape else replicated,
        state,
        params,
        transform_non_params=lambda _: replicated,
    )
