"""Mixture of experts: GPT-Neo's MoE layer and a dropless top-k, with expert parallelism.

GPT-Neo's MoE is Mesh-TensorFlow 0.1.18's `transformer_moe_layer_v1`; this module computes the
same function (Mesh-TensorFlow 0.1.18's `moe.py`, which GPT-Neo pinned):

1. The batch's tokens, flattened in [batch, seq] order, are cut into G groups of S consecutive
   tokens (`split_into_groups`: G is a multiple of the pieces `batch` is split into, so a group
   never spans two devices and routing stays local).
2. A bias-free float32 router scores each token; `top_2` (GShard) or `rand_1` (Switch) picks
   experts, and each expert takes at most C = int(S * capacity_factor / E) tokens per group:
   first choices in token order, then second choices. Tokens over capacity are dropped (their
   residual passes through).
3. Tokens are moved to their experts with one-hot einsums into [E, G, C, M]; the layout puts
   E on the `experts` mesh axes and G on the batch axes that `experts` does not use, so XLA
   moves tokens between devices with an all-to-all (expert parallelism). Each expert is
   `wo(act(wi x))`, no biases; the combine einsum weights the outputs by the gates.

`dropless_top_k` (not in GPT-Neo) sends every token to its k experts: the token copies are
sorted by expert and run through a grouped matmul (`jax.lax.ragged_dot` on TPU/GPU, a tiled
form on CPU), so no capacity is reserved and nothing is dropped. With experts split over
devices, each device gathers the tokens of its expert group, runs its own experts on the
copies routed to them and reduce-scatters the outputs back (written by hand in `shard_map`:
XLA:CPU cannot lower `ragged_all_to_all`, so the all-gather form is the one that runs and is
tested everywhere).

Differences from GPT-Neo, on purpose (README "Mixture of experts"): no dropout on the MoE
output outside training, the load-balancing loss divided by the microbatch count once (not
twice), decoding with a KV cache and without capacity limits, bfloat16 works (routing stays
float32), and randomness outside training (the default `random` second-expert policy) draws
from a fixed key, so evaluation is repeatable.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.mesh import batch_axes, constrain, rules, split_size
from gpt_neo.models.activations import ACTIVATIONS
from gpt_neo.models.layers import ParamDecl, dropout, truncated_normal
from gpt_neo.models.platform import target_platform

EVAL_ROUTING_SEED = 0  # the fixed key of random routing choices outside training


class MoeStats(NamedTuple):
    """What one MoE layer reports about a forward pass (float32 scalars, load [experts])."""

    aux_loss: jax.Array  # load-balancing loss, before moe_loss_coef
    router_z_loss: jax.Array  # mean logsumexp(router logits)^2, before moe_router_z_loss
    dropped: jax.Array  # fraction of routed (token, expert) pairs over capacity
    load: jax.Array  # [experts]: share of the kept (token, expert) pairs each expert got


class Routing(NamedTuple):
    """Where a capacity-limited router sends each token: combine [G, S, E, C] holds the gate
    of token s in slot c of expert e (0 elsewhere); the rest are `MoeStats` fields."""

    combine: jax.Array
    aux_loss: jax.Array
    dropped: jax.Array
    load: jax.Array


def param_decls(cfg: Config) -> dict[str, ParamDecl]:
    """Router [embd, experts], wi [experts, embd, hidden], wo [experts, hidden, embd], no
    biases, initialised as Mesh-TensorFlow does: truncated normal, std 1/sqrt(fan_in)."""
    m, e, h = cfg.n_embd, cfg.moe.moe_num_experts, cfg.moe.moe_hidden_size
    return {
        "router": ParamDecl((m, e), axes.ROUTER, truncated_normal(m**-0.5)),
        "wi": ParamDecl((e, m, h), axes.EXPERT_IN, truncated_normal(m**-0.5)),
        "wo": ParamDecl((e, h, m), axes.EXPERT_OUT, truncated_normal(h**-0.5)),
    }


# --------------------------------------------------------------------------------------------
# Groups and capacity


def split_into_groups(n: int, max_group_size: int, mesh_dim_size: int) -> tuple[int, int]:
    """Mesh-TensorFlow's `_split_into_groups`: (G, S) with G * S = n, G a multiple of
    `mesh_dim_size`, starting from G = n // max_group_size (so S may exceed the maximum)."""
    if n % mesh_dim_size:
        raise ValueError(
            f"{n} tokens cannot be routed in groups split {mesh_dim_size} ways: the batch's "
            "token count must be a multiple of the pieces 'batch' is split into"
        )
    groups = max(1, n // max_group_size)
    while groups % mesh_dim_size or n % groups:
        groups += 1
    return groups, n // groups


def expert_capacity(group_size: int, experts: int, factor: float, minimum: int) -> int:
    """Tokens each expert takes per group: int(S * factor / E), at most S, at least `minimum`."""
    return max(min(group_size, int(group_size * factor / experts)), minimum)


def batch_split(cfg: Config) -> int:
    """Pieces the batch is split into on the mesh being traced under (1 without one): as in
    GPT-Neo, the groups depend on the layout, so a model scored on one device may group its
    tokens differently from its training run (routing tests use groups that do not)."""
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    return split_size(sizes, tuple(a for a in batch_axes(cfg) if a in sizes))


# --------------------------------------------------------------------------------------------
# Routers (all float32)


def _exclusive_cumsum(mask):
    return jnp.cumsum(mask, axis=1) - mask


def _balance_loss(gates, first_choice_mask, real=None):
    """E * mean over groups of sum_e (share of first choices to e) * (mean gate of e), over
    the `real` tokens [G, S] (default all; padding of packed rows is not)."""
    experts = gates.shape[-1]
    if real is None:
        density = first_choice_mask.mean(axis=1)
        proxy = gates.mean(axis=1)
    else:
        count = jnp.maximum(real.sum(axis=1), 1.0)[:, None]
        density = (first_choice_mask * real[..., None]).sum(axis=1) / count
        proxy = (gates * real[..., None]).sum(axis=1) / count
    return (density * proxy).mean() * experts * experts


def _load(kept_masks):
    """Each expert's share of the kept (token, expert) pairs."""
    counts = functools.reduce(jnp.add, (m.sum(axis=(0, 1)) for m in kept_masks))
    return counts / jnp.maximum(counts.sum(), 1.0)


def top2_routing(
    gates, capacity, policy, threshold, uniforms=None, second_place_loss=False, real=None
):
    """Mesh-TensorFlow 0.1.18's `_top_2_gating` on router probabilities gates [G, S, E].

    `policy` decides which second choices are used (`all`, `none`, `threshold`: gate above
    `threshold`, `random`: uniforms [G, S] below gate / threshold); gates are normalised over
    the two choices *before* the policy and capacity, and not again after drops. Tokens not
    `real` [G, S] (padding) go to no expert: they take no capacity and add no load.
    """
    experts = gates.shape[-1]
    index_1 = jnp.argmax(gates, axis=-1)  # ties -> lowest index, as tf.math.top_k
    mask_1 = jax.nn.one_hot(index_1, experts, dtype=gates.dtype)
    if real is not None:
        mask_1 = mask_1 * real[..., None]
    gate_1 = (gates * mask_1).sum(-1)
    without_1 = gates * (1.0 - mask_1)
    index_2 = jnp.argmax(without_1, axis=-1)
    mask_2 = jax.nn.one_hot(index_2, experts, dtype=gates.dtype)
    if real is not None:
        mask_2 = mask_2 * real[..., None]
    gate_2 = (without_1 * mask_2).sum(-1)
    denom = gate_1 + gate_2 + 1e-9
    gate_1, gate_2 = gate_1 / denom, gate_2 / denom

    aux_loss = _balance_loss(gates, mask_1, real)
    if second_place_loss:
        normalized = without_1 / (without_1.sum(-1, keepdims=True) + 1e-9)
        aux_loss += 0.5 * (normalized.mean(1) * mask_2.mean(1)).mean() * experts * experts

    if policy == "none":
        mask_2 = jnp.zeros_like(mask_2)
    elif policy == "threshold":
        mask_2 = mask_2 * (gate_2 > threshold)[..., None]
    elif policy == "random":
        mask_2 = mask_2 * (uniforms < gate_2 / max(threshold, 1e-9))[..., None]
    requested = mask_1.sum() + mask_2.sum()

    position_1 = _exclusive_cumsum(mask_1) * mask_1
    mask_1 = mask_1 * (position_1 < capacity)
    first_counts = mask_1.sum(axis=1, keepdims=True)  # [G, 1, E], after the capacity cut
    gate_1 = gate_1 * mask_1.sum(-1)
    position_1 = position_1.sum(-1)
    position_2 = (_exclusive_cumsum(mask_2) + first_counts) * mask_2
    mask_2 = mask_2 * (position_2 < capacity)
    gate_2 = gate_2 * mask_2.sum(-1)
    position_2 = position_2.sum(-1)

    combine = _slots(gate_1, index_1, position_1, experts, capacity) + _slots(
        gate_2, index_2, position_2, experts, capacity
    )
    kept = mask_1.sum() + mask_2.sum()
    dropped = 1.0 - kept / jnp.maximum(requested, 1.0)
    return Routing(combine, aux_loss, dropped, _load((mask_1, mask_2)))


def top1_routing(gates, index, capacity, real=None):
    """Mesh-TensorFlow 0.1.18's `_rand_1_gating` after the expert is chosen: index [G, S] ->
    the first C tokens of each expert in group order, weighted by their raw router gate.
    Tokens not `real` [G, S] (padding) go to no expert."""
    experts = gates.shape[-1]
    mask = jax.nn.one_hot(index, experts, dtype=gates.dtype)
    if real is not None:
        mask = mask * real[..., None]
    gate = (gates * mask).sum(-1)
    aux_loss = _balance_loss(gates, mask, real)
    requested = mask.sum()
    position = _exclusive_cumsum(mask) * mask
    mask = mask * (position < capacity)
    gate = gate * mask.sum(-1)
    combine = _slots(gate, index, position.sum(-1), experts, capacity)
    dropped = 1.0 - mask.sum() / jnp.maximum(requested, 1.0)
    return Routing(combine, aux_loss, dropped, _load((mask,)))


def _slots(gate, index, position, experts, capacity):
    """gate [G, S] placed at (expert index, slot position) of [G, S, E, C]; an out-of-range
    position (a dropped token) places nothing, as tf.one_hot does."""
    one_hot_slot = jax.nn.one_hot(position.astype(jnp.int32), capacity, dtype=gate.dtype)
    return (
        gate[..., None, None]
        * jax.nn.one_hot(index, experts, dtype=gate.dtype)[..., None]
        * one_hot_slot[..., None, :]
    )


def topk_dropless(gates, k, real=None):
    """Every token's k best experts (ties -> lowest index) and gates renormalised over them
    (Mixtral), plus the balance loss with each token's k choices counted 1/k each. Tokens not
    `real` [G, S] (padding) are computed with weight 0 (dropless: nothing to save) and add no
    load."""
    experts = gates.shape[-1]
    weights, index = jax.lax.top_k(gates, k)
    weights = weights / weights.sum(-1, keepdims=True)
    chosen = jax.nn.one_hot(index, experts, dtype=gates.dtype).sum(-2)  # [G, S, E]
    if real is not None:
        weights = weights * real[..., None]
        chosen = chosen * real[..., None]
    return index, weights, _balance_loss(gates, chosen / k, real), _load((chosen,))


# --------------------------------------------------------------------------------------------
# The layer


def moe_mlp(
    cfg: Config,
    p: dict,
    x: jax.Array,
    *,
    train: bool,
    rng: jax.Array | None = None,
    layer: int = 0,
    decoding: bool = False,
    real: jax.Array | None = None,
) -> tuple[jax.Array, MoeStats]:
    """x [batch, seq, embd] -> ([batch, seq, embd], MoeStats), in place of the MLP.

    `train` picks the training capacity factor and policies and enables expert dropout
    (`rng` draws the random choices; outside training they come from a fixed key).
    `decoding` (KV-cache steps) gives every expert room for the whole group, so nothing is
    dropped whatever the batch routes together. `real` [batch, seq] bool: the tokens that are
    not padding of packed rows (default all); only they are routed and counted.
    """
    hp = cfg.moe
    b, t, m = x.shape
    groups, size = split_into_groups(b * t, hp.moe_group_size, batch_split(cfg))
    grouped = constrain(x.reshape(groups, size, m), cfg, axes.GROUPS)
    real_tokens = None if real is None else real.reshape(groups, size).astype(jnp.float32)
    if rng is None:
        rng = jax.random.fold_in(jax.random.key(EVAL_ROUTING_SEED), layer)
    router_rng, policy_rng, dropout_rng = jax.random.split(rng, 3)
    expert_rng = dropout_rng if train and hp.moe_dropout_rate > 0 else None

    router_in = grouped.astype(jnp.float32)
    rand_1_policy = hp.moe_rand_1_policy_train if train else hp.moe_rand_1_policy_eval
    if hp.moe_gating == "rand_1" and train and rand_1_policy == "input_jitter":
        j = hp.moe_rand_1_jitter
        router_in = router_in * jax.random.uniform(
            router_rng, router_in.shape, jnp.float32, 1 - j, 1 + j
        )
    if hp.moe_gating == "rand_1" and train and rand_1_policy == "input_dropout":
        router_in = dropout(router_in, hp.moe_rand_1_dropout, router_rng)
    logits = router_in @ p["router"].astype(jnp.float32)  # [G, S, E]
    gates = jax.nn.softmax(logits, axis=-1)
    z_squared = jnp.square(jax.nn.logsumexp(logits, axis=-1))
    if real_tokens is None:
        router_z_loss = z_squared.mean()
    else:
        router_z_loss = (z_squared * real_tokens).sum() / jnp.maximum(real_tokens.sum(), 1.0)

    if hp.moe_gating == "dropless_top_k":
        index, weights, aux_loss, load = topk_dropless(gates, hp.moe_top_k, real_tokens)
        y = dropless_experts(cfg, p, grouped, index, weights, expert_rng)
        stats = MoeStats(aux_loss, router_z_loss, jnp.float32(0.0), load)
        return y.reshape(b, t, m), stats

    factor = hp.moe_capacity_factor_train if train else hp.moe_capacity_factor_eval
    capacity = (
        size
        if decoding
        else expert_capacity(size, hp.moe_num_experts, factor, hp.moe_min_expert_capacity)
    )
    if hp.moe_gating == "top_2":
        policy = hp.moe_second_policy_train if train else hp.moe_second_policy_eval
        threshold = hp.moe_second_threshold_train if train else hp.moe_second_threshold_eval
        uniforms = jax.random.uniform(policy_rng, (groups, size)) if policy == "random" else None
        routing = top2_routing(
            gates, capacity, policy, threshold, uniforms, hp.moe_use_second_place_loss, real_tokens
        )
    else:  # rand_1
        if rand_1_policy == "sample":
            temperature = hp.moe_rand_1_temperature
            index = jax.random.categorical(policy_rng, logits / temperature, axis=-1)
        else:
            index = jnp.argmax(gates, axis=-1)
        routing = top1_routing(gates, index, capacity, real_tokens)
    y = dispatched_experts(cfg, p, grouped, routing.combine, expert_rng)
    stats = MoeStats(routing.aux_loss, router_z_loss, routing.dropped, routing.load)
    return y.reshape(b, t, m), stats


def _expert_ffn(cfg: Config, h: jax.Array, rng) -> jax.Array:
    h = ACTIVATIONS[cfg.moe_activation](h, {})
    return dropout(h, cfg.moe.moe_dropout_rate, rng)


def _expert_major(cfg: Config, x: jax.Array, last: str) -> jax.Array:
    """Pin [E, G, C, last] with E on the `experts` mesh axes and G on the batch axes that
    neither `experts` nor `last` use (mtf's `batch_unsplit`): the reshard from G-split to
    E-split is the all-to-all."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    table = rules(cfg).activations
    experts, inner = table.get(axes.EXPERTS, ()), table.get(last, ())
    batch = tuple(a for a in table.get(axes.BATCH, ()) if a not in experts + inner)
    spec = [experts, batch, (), inner]
    spec = [None if not s else s[0] if len(s) == 1 else s for s in spec]
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def dispatched_experts(cfg: Config, p: dict, grouped, combine, rng) -> jax.Array:
    """GShard's einsums: tokens [G, S, M] -> expert slots [E, G, C, M] -> experts -> back."""
    dtype = grouped.dtype
    dispatch = (combine > 0).astype(dtype)
    expert_in = _expert_major(cfg, jnp.einsum("gsec,gsm->egcm", dispatch, grouped), axes.EMBD)
    h = jnp.einsum("egcm,emh->egch", expert_in, p["wi"])
    h = _expert_major(cfg, _expert_ffn(cfg, h, rng), axes.EXPERT_MLP)
    out = _expert_major(cfg, jnp.einsum("egch,ehm->egcm", h, p["wo"]), axes.EMBD)
    y = jnp.einsum("gsec,egcm->gsm", combine.astype(dtype), out)
    return constrain(y, cfg, axes.GROUPS)


def dropless_experts(cfg: Config, p: dict, grouped, index, weights, rng) -> jax.Array:
    """Every (token, expert) pair computed: tokens [G, S, M], index/weights [G, S, k]."""
    g, s, m = grouped.shape
    k = index.shape[-1]
    tokens = grouped.reshape(g * s, m)
    index, weights = index.reshape(g * s, k), weights.reshape(g * s, k)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _local_experts(cfg, tokens, index, weights, p["wi"], p["wo"], 0, rng).reshape(
            g, s, m
        )

    table = rules(cfg).activations
    expert_axes = table.get(axes.EXPERTS, ())
    batch = table.get(axes.BATCH, ())
    gathered = tuple(a for a in expert_axes if a in batch)  # tokens split over them too
    summed = tuple(a for a in expert_axes if a not in batch)  # tokens already replicated
    P = jax.sharding.PartitionSpec
    rows = P(batch or None, None)
    experts = P(expert_axes or None, None, None)
    key_data = jax.random.key_data(jax.random.key(0) if rng is None else rng)

    def per_device(tokens, index, weights, wi, wo, key_data):
        if gathered:
            tokens, index, weights = (
                jax.lax.all_gather(a, gathered, axis=0, tiled=True)
                for a in (tokens, index, weights)
            )
        if summed:  # a gather at varying indices does not mark its operand varying (jax 0.10):
            # say it, or the cotangents of these replicated inputs are not summed over `summed`
            tokens, weights = (jax.lax.pcast(a, summed, to="varying") for a in (tokens, weights))
        shard = jax.lax.axis_index(expert_axes) if expert_axes else 0
        local_rng = None
        if rng is not None:
            local_rng = jax.random.fold_in(jax.random.wrap_key_data(key_data), shard)
        y = _local_experts(cfg, tokens, index, weights, wi, wo, shard * wi.shape[0], local_rng)
        if summed:
            y = jax.lax.psum(y, summed)
        if gathered:
            y = jax.lax.psum_scatter(y, gathered, scatter_dimension=0, tiled=True)
        return y

    in_specs = (rows, rows, rows, experts, experts, P())
    y = jax.shard_map(per_device, in_specs=in_specs, out_specs=rows)(
        tokens, index, weights, p["wi"], p["wo"], key_data
    )
    return constrain(y.reshape(g, s, m), cfg, axes.GROUPS)


def _local_experts(cfg: Config, tokens, index, weights, wi, wo, first_expert, rng):
    """This device's experts (global ids first_expert...) on the (token, expert) pairs routed
    to them: pairs sorted by expert, two ragged matmuls, outputs summed back per token."""
    n, k = index.shape
    local_experts = wi.shape[0]
    local = index - first_expert
    mine = (local >= 0) & (local < local_experts)
    bucket = jnp.where(mine, local, local_experts).reshape(-1)  # others sort to the end
    order = jnp.argsort(bucket, stable=True)
    sizes = jnp.bincount(bucket, length=local_experts + 1)[:local_experts]
    token = order // k
    h = grouped_matmul(tokens[token], wi, sizes)  # rows past sum(sizes) come out 0
    out = grouped_matmul(_expert_ffn(cfg, h, rng), wo, sizes)
    gate = jnp.where(mine, weights, 0.0).reshape(-1)[order].astype(out.dtype)
    return jnp.zeros((n, tokens.shape[-1]), out.dtype).at[token].add(out * gate[:, None])


GROUP_TILE = 256  # rows per tile of `tiled_grouped_matmul`


def grouped_matmul(x, w, sizes):
    """x [rows, in] (rows sorted by group) times w [groups, in, out], group g taking the next
    sizes[g] rows; rows past sum(sizes) give 0. `jax.lax.ragged_dot` where the backend has a
    kernel for it (TPU, GPU); on CPU XLA lowers it to a masked dense product with every group
    (groups x the FLOPs), so there the tiled form below runs instead (4x faster, measured)."""
    if target_platform() == "cpu":
        return tiled_grouped_matmul(x, w, sizes)
    return jax.lax.ragged_dot(x, w, sizes)


def tiled_grouped_matmul(x, w, sizes, tile: int = GROUP_TILE):
    """`grouped_matmul` as a batched matmul over row tiles: each group's rows are padded to
    whole tiles (at most groups x tile extra rows), each tile multiplies its group's weight."""
    rows, width = x.shape
    groups = w.shape[0]
    ends = jnp.cumsum(sizes)
    tiles_per_group = (sizes + tile - 1) // tile
    tile_ends = jnp.cumsum(tiles_per_group)
    n_tiles = rows // tile + groups  # the most sum(ceil(size / tile)) can be
    row = jnp.arange(rows)
    group = jnp.searchsorted(ends, row, side="right")
    valid = group < groups
    group = jnp.minimum(group, groups - 1)
    first_tile = tile_ends[group] - tiles_per_group[group]
    slot = first_tile * tile + row - (ends[group] - sizes[group])
    slot = jnp.where(valid, slot, n_tiles * tile)  # out of range: dropped by the scatter
    padded = jnp.zeros((n_tiles * tile, width), x.dtype).at[slot].set(x, mode="drop")
    tile_group = jnp.searchsorted(tile_ends, jnp.arange(n_tiles), side="right")
    tile_weights = w[jnp.minimum(tile_group, groups - 1)]
    out = jnp.einsum("tim,tmo->tio", padded.reshape(n_tiles, tile, width), tile_weights)
    out = out.reshape(n_tiles * tile, -1)[jnp.minimum(slot, n_tiles * tile - 1)]
    return jnp.where(valid[:, None], out, 0).astype(x.dtype)
