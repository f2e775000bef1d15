"""The blocks: one block's math, and every layer's block run in turn over the residual
stream, by a Python loop or by one `lax.scan` over stacked parameters (`gpt_neo.models.stack`),
whichever the config's layout is; the results are the same either way.

Decoding threads a `DecodeCache` through the same path: each layer reads and extends its keys
and values, stacked like the parameters where they are.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.mesh import constrain
from gpt_neo.models import attention as attn_lib
from gpt_neo.models import context
from gpt_neo.models import moe as moe_lib
from gpt_neo.models import stack as stack_lib
from gpt_neo.models.layers import dropout as dropout_fn
from gpt_neo.models.layers import mlp, pre_norm
from gpt_neo.models.platform import target_platform

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# What the model's signatures pass around.
Params = dict[str, Any]  # the parameter tree (gpt_neo.models.gpt)


def cast_params(cfg: Config, params):
    """float32 master parameters -> the compute dtype (`precision`); a no-op on cast ones.
    Each block casts its own weights (`block`); decoding casts the whole tree once per call so
    that its loop reads cast weights."""
    dtype = COMPUTE_DTYPES[cfg.precision]
    return jax.tree.map(lambda a: a.astype(dtype), params)


class DecodeCache(NamedTuple):
    """Every layer's keys and values (None for `none` layers), and where a call's tokens go:
    see `attention.KVCache` for the layout of each field. `layers` follows the parameters:
    one (keys, values) per layer, or, where the layers are stacked, one per stack with a
    leading layers axis."""

    layers: tuple
    slots: jax.Array  # [new]
    valid: jax.Array  # [batch, length]
    segments: jax.Array | None = None  # [batch, length]: packed prompts' segment per slot

    def layer(self, index: int) -> attn_lib.KVCache | None:
        return self.layer_of(self.layers[index])

    def layer_of(self, entry) -> attn_lib.KVCache | None:
        """One layer's (keys, values) as that layer's `KVCache` (None for a `none` layer)."""
        if entry is None:
            return None
        keys, values = entry
        return attn_lib.KVCache(keys, values, self.slots, self.valid, self.segments)


def layer_params(cfg: Config, params: Params, index: int) -> Params:
    """Layer `index`'s block parameters in the loop layout (the one shared block with
    `share_parameters`)."""
    return params["blocks"][0 if cfg.share_parameters else index]


def run_blocks(
    cfg: Config,
    params: Params,
    x: jax.Array,
    keys: jax.Array | None,
    cache: DecodeCache | None,
    positions: jax.Array,
    train: bool,
    segments: jax.Array | None = None,
) -> tuple[jax.Array, DecodeCache | None, dict[int, moe_lib.MoeStats]]:
    """Every block in turn over x: one `lax.scan` over the stacks where the parameters are
    stacked (`gpt_neo.models.stack`), else a Python loop; the results are the same either way.
    `keys` [n_layer]: each layer's dropout key (None: no dropout). `segments` [batch, seq]:
    packed documents (`attention`), or None."""
    stacks = stack_lib.layer_stacks(cfg)
    if stacks is None:
        return _looped_layers(cfg, params, x, keys, cache, positions, train, segments)
    return _scanned_layers(cfg, stacks, params, x, keys, cache, positions, train, segments)


def _layer(cfg: Config, kind: str, index, train: bool, decoding: bool):
    """Layer `index`'s block as a function of (weights, x, key, cache, positions, segments);
    with `recompute_grad`, its activations are recomputed in the backward pass."""
    fn = functools.partial(block, cfg, kind, layer=index, train=train)
    if decoding:
        return fn
    if cfg.recompute_grad:
        return jax.checkpoint(fn)
    if target_platform() == "cpu":
        # XLA:CPU keeps each saved activation of a scanned stack in a [layers, ...] buffer
        # that it zero-fills, then writes and reads a slice of per layer: on a small model,
        # more time than recomputing the elementwise ops (norms, activations, softmax) from
        # the saved matmul outputs. Saving only those makes a CPU step 5-13% faster
        # (bench/hf_families.py, configs/demo.json) and holds fewer activations, at the same
        # FLOPs. prevent_cse=False: the scan already keeps the recomputation where it is.
        policy = jax.checkpoint_policies.dots_saveable
        return jax.checkpoint(fn, policy=policy, prevent_cse=False)
    return fn


def _looped_layers(cfg, params, x, keys, cache, positions, train, segments):
    caches, moe_stats = [], {}
    for index, kind in enumerate(cfg.attention_types):
        layer_cache = None if cache is None else cache.layer(index)
        x, layer_cache, stats = _layer(cfg, kind, index, train, cache is not None)(
            layer_params(cfg, params, index),
            x,
            None if keys is None else keys[index],
            layer_cache,
            positions,
            segments,
        )
        caches.append(None if layer_cache is None else (layer_cache.keys, layer_cache.values))
        if stats is not None:
            moe_stats[index] = stats
    return x, None if cache is None else cache._replace(layers=tuple(caches)), moe_stats


def _scanned_layers(
    cfg, stacks: stack_lib.Stacks, params, x, keys, cache, positions, train, segments
):
    """One scan step runs one repeat of the pattern: a block per stack, each reading its
    layer's slice of the stack (and of the cache's, when decoding)."""
    kinds = cfg.attention_types[: stacks.period]

    def repeat(x, xs):
        weights, index, layer_keys, layer_caches = xs
        caches, stats = [], []
        for position, kind in enumerate(kinds):
            layer_cache = None if cache is None else cache.layer_of(layer_caches[position])
            x, layer_cache, layer_stats = _layer(
                cfg, kind, index * stacks.period + position, train, cache is not None
            )(
                weights[position],
                x,
                None if layer_keys is None else layer_keys[position],
                layer_cache,
                positions,
                segments,
            )
            caches.append(None if layer_cache is None else (layer_cache.keys, layer_cache.values))
            stats.append(layer_stats)
        return x, (tuple(caches), tuple(stats))

    by_repeat = None if keys is None else keys.reshape(stacks.repeats, stacks.period)
    xs = (
        params[stack_lib.STACKS],
        jnp.arange(stacks.repeats),
        by_repeat,
        None if cache is None else cache.layers,
    )
    x, (caches, stats) = jax.lax.scan(repeat, x, xs)
    moe_stats = {
        layer: jax.tree.map(lambda a, r=r: a[r], stats[position])
        for position in range(stacks.period)
        if stats[position] is not None
        for r, layer in enumerate(stacks.layers(position))
    }
    moe_stats = dict(sorted(moe_stats.items()))
    return x, None if cache is None else cache._replace(layers=caches), moe_stats


def block(
    cfg: Config,
    kind: str,
    p: dict,
    x: jax.Array,
    rng: jax.Array | None = None,
    cache: attn_lib.KVCache | None = None,
    positions: jax.Array | None = None,
    segments: jax.Array | None = None,
    *,
    layer: int = 0,
    train: bool = False,
) -> tuple[jax.Array, attn_lib.KVCache | None, moe_lib.MoeStats | None]:
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); each branch followed by residual dropout.
    A `none` layer (GPT-Neo's PAR configs) has the MLP half only; in an MoE layer the MLP is
    a mixture of experts, which also reports its `MoeStats`. GPT-Neo's block options, in its
    order: `macaron` first adds half an MLP of x (no norm) and halves the main MLP branch;
    `rezero` scales each branch by a learned scalar instead of normalising its input;
    `scalenorm` swaps the norm (see `pre_norm`). `p` is cast to the compute dtype here.
    `segments` [batch, seq] (packed documents): attention stays within a segment, and MoE
    routes no padding (segment 0)."""
    p = cast_params(cfg, p)
    attn_rng = res_rng = mlp_rng = moe_rng = macaron_rng = None
    if rng is not None:
        attn_rng, res_rng, mlp_rng = jax.random.split(rng, 3)
        moe_rng, macaron_rng = jax.random.fold_in(rng, 3), jax.random.fold_in(rng, 4)

    def add(x, branch, rezero_gate=None, rng=None):
        if cfg.rezero and rezero_gate is not None:
            branch = branch * p["rezero"][rezero_gate]
        return constrain(x + dropout_fn(branch, cfg.res_dropout, rng), cfg, axes.HIDDEN)

    half = 0.5 if cfg.macaron else 1.0
    if cfg.macaron:
        x = add(x, 0.5 * mlp(cfg, p["mlp_macaron"], x), rng=macaron_rng)
    if kind != "none":
        normed = pre_norm(cfg, p.get("ln_1"), x)
        if cache is None and context.context_size(cfg) > 1:  # the sequence split over devices
            h = context.attention_layer(cfg, kind, p["attn"], normed, positions, segments)
        else:
            h, cache = attn_lib.attention(
                cfg, kind, p["attn"], normed, attn_rng, cache, positions, segments
            )
        x = add(x, h, "attn", res_rng)
    elif cfg.gpt_neo_none_layers:
        x = add(x, x, "attn")  # GPT-Neo's `a = x`
    stats = None
    normed = pre_norm(cfg, p.get("ln_2"), x)
    if "moe" in p:
        h, stats = moe_lib.moe_mlp(
            cfg,
            p["moe"],
            normed,
            train=train,
            rng=moe_rng,
            layer=layer,
            decoding=cache is not None,
            real=None if segments is None else segments != 0,
        )
    else:
        h = mlp(cfg, p["mlp"], normed)
    return add(x, half * h, "mlp", mlp_rng), cache, stats
