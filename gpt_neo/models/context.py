"""Context parallelism: attention when the layout splits the sequence over devices.

With `"layout": "sequence:c"` (alone or beside `batch`, `heads`, FSDP's `param_layout`) every
activation of a block is split along the sequence over the `c` devices: embeddings, norms,
MLP and MoE run on each device's share of the tokens, and only attention needs tokens of other
devices. This module is that attention, one `jax.shard_map` per layer whose body sees one
device's share:

- **softmax attention** (global layers, and local layers whose window reaches past one chunk)
  runs over the keys chunk by chunk with an online softmax (float32 running max, sum and
  output), so no device holds more than one chunk's scores. `context_parallel` says how the
  chunks arrive: `all_gather` gathers every device's keys and values first (one collective;
  the gathered copy is what it costs in memory), `ring` passes them around the devices with
  `ppermute`, the next chunk travelling while the current one is computed (memory: two
  chunks). Both are one `custom_vjp`: the backward pass walks the chunks again and sends the
  keys' and values' gradients back where they came from (a reduce-scatter, or the ring). On a
  TPU each block of the walk is the splash kernel (`splash_chunks`, `block_kernel`), else XLA
  einsums over blocks of queries.
- **local layers** (a window that fits in one chunk) take only the last `window - 1` keys and
  values of the chunk before each of theirs from the device that holds it: a halo, not a ring.
- **linear layers** all-gather each chunk's running sums (a [heads, head_dim, head_dim] state,
  whatever the length), and each device adds those of the chunks before its own.

Causal models hold the sequence **load-balanced** ("zig-zag"): cut into 2P chunks for P
devices, device r holds chunks r and 2P-1-r, so that every device has as many keys before its
queries as every other and no device idles while causal masking spares the others.
`to_balanced`/`to_contiguous` move a [batch, seq, ...] activation between the two orders with
two `ppermute`s; `gpt_neo.models.gpt.trunk` balances the tokens on the way in and restores the
residual stream on the way out, so nothing outside the trunk sees the order. Masks compare each
token's index in the original sequence (`Ring.positions`), with segments (packing) and windows
exactly as the single-device kernels do.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.mesh import MeshAxes, activation_spec, constrain, rules, split_size
from gpt_neo.models import attention as attn_lib
from gpt_neo.models import splash_chunks
from gpt_neo.models.platform import target_platform

TOKENS = (axes.BATCH, axes.SEQ)
# Softmax attention computes the scores of a block of queries at a time against a chunk of
# keys: the largest buffers of a layer. A block holds at most QUERY_BLOCK queries, fewer
# where their float32 scores (all rows and heads of the device) would pass SCORE_BYTES, and
# no fewer than MIN_QUERY_BLOCK (whole TPU tiles). So memory grows with the chunk, not its
# square: 1.3B at 16k tokens per device, 4 rows, 16 heads: 8.4 GiB of temporaries per step
# with blocks of 512 queries, 3.6 GiB with 128 (v5e, 2 layers).
QUERY_BLOCK = 512
MIN_QUERY_BLOCK = 128
SCORE_BYTES = 128 * 2**20


# --------------------------------------------------------------------------------------------
# Where the sequence is split


def sequence_axes(cfg: Config) -> MeshAxes:
    """The mesh axes the layout splits the sequence over, in the mesh being traced against."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(a for a in rules(cfg).activations.get(axes.SEQ, ()) if a in mesh.shape)


def context_size(cfg: Config) -> int:
    """How many devices share one sequence (1: no context parallelism)."""
    seq_axes = sequence_axes(cfg)
    return split_size(dict(jax.sharding.get_abstract_mesh().shape), seq_axes) if seq_axes else 1


def balanced(cfg: Config) -> bool:
    """Whether the trunk holds the sequence in the load-balanced (zig-zag) order: causal
    models whose sequence is split."""
    return context_size(cfg) > 1 and not cfg.mlm_training


# --------------------------------------------------------------------------------------------
# The load-balanced order


def _owner(chunk: int, p: int) -> int:
    """The device that holds `chunk` (of 2p) in the load-balanced order."""
    return chunk if chunk < p else 2 * p - 1 - chunk


def to_balanced(cfg: Config, a: jax.Array, dims: tuple = TOKENS) -> jax.Array:
    """[batch, seq, ...] in sequence order -> the load-balanced order (device r holds chunks r
    and 2P-1-r of 2P). A no-op unless the trunk balances (`balanced`). `dims`: a's logical
    axes, which say how it is laid out."""
    return _reorder(cfg, a, dims, to_contiguous=False)


def to_contiguous(cfg: Config, a: jax.Array, dims: tuple = axes.HIDDEN) -> jax.Array:
    """The inverse of `to_balanced`."""
    return _reorder(cfg, a, dims, to_contiguous=True)


def _reorder(cfg: Config, a: jax.Array, dims: tuple, *, to_contiguous: bool) -> jax.Array:
    if not balanced(cfg):
        return a
    p, seq_axes = context_size(cfg), sequence_axes(cfg)
    # In sequence order device r holds chunks 2r (even) and 2r+1 (odd); balanced, one even and
    # one odd chunk too (r and 2P-1-r, whose parities differ). So each order change is two
    # permutations of devices: one moves the even chunks, one the odd ones.
    moves = [
        [(r, _owner(2 * r + parity, p)) for r in range(p)] for parity in (0, 1)
    ]  # sequence order -> balanced
    if to_contiguous:
        moves = [[(dst, src) for src, dst in move] for move in moves]

    def body(a):
        even_device = jax.lax.axis_index(seq_axes) % 2 == 0

        def even_first(x, y):  # (x, y) on even devices, (y, x) on odd ones
            return jnp.where(even_device, x, y), jnp.where(even_device, y, x)

        first, second = jnp.split(a, 2, axis=1)
        if to_contiguous:  # a balanced device holds chunk r first: the even one if r is even
            even, odd = even_first(first, second)
            moved = [
                jax.lax.ppermute(even, seq_axes, moves[0]),
                jax.lax.ppermute(odd, seq_axes, moves[1]),
            ]
        else:
            even = jax.lax.ppermute(first, seq_axes, moves[0])
            odd = jax.lax.ppermute(second, seq_axes, moves[1])
            moved = even_first(even, odd)
        return jnp.concatenate(moved, axis=1)

    spec = activation_spec(cfg, dims[: a.ndim])
    return jax.shard_map(body, in_specs=spec, out_specs=spec, check_vma=False)(a)


# --------------------------------------------------------------------------------------------
# Attention


def attention_layer(cfg: Config, kind: str, p: dict, x: jax.Array, positions, segments):
    """One attention sub-block under a sequence split, x [batch, seq, embd] as the trunk
    holds it -> [batch, seq, embd]: `attention.attention` without a cache, the same numbers."""
    q, k, v = attn_lib.queries_keys_values(cfg, p, x, positions)
    k, v = (constrain(a, cfg, axes.GROUPED_KEYS_VALUES) for a in (k, v))
    out = attention(cfg, kind, q, k, v, segments)
    return attn_lib.project_out(constrain(out, cfg, axes.QUERIES), p)


def attention(cfg: Config, kind: str, q, k, v, segments=None) -> jax.Array:
    """Self-attention of one layer under a sequence split: q [batch, seq, heads, head_dim],
    k, v [batch, seq, kv_heads, head_dim] and segments [batch, seq] as the trunk holds them
    (load-balanced when causal); returns [batch, seq, heads, head_dim]. The same numbers as
    `attention._self_attention` on the whole sequence."""
    heads_split = rules(cfg).activations.get(axes.HEADS, ())
    grouped = rules(cfg).activations.get(axes.KV_HEADS, ()) == heads_split or cfg.kv_groups == 1
    if kind == "linear" or not grouped:
        # one key/value head per query head: linear attention's sums are per head, and a
        # layout that splits query heads but not key/value heads splits them alike this way
        k, v = attn_lib.ungrouped(cfg, k), attn_lib.ungrouped(cfg, v)
    kv_dims = (axes.BATCH, axes.SEQ, axes.KV_HEADS if k.shape[2] < q.shape[2] else axes.HEADS)
    q_spec = activation_spec(cfg, (axes.BATCH, axes.SEQ, axes.HEADS, None))
    kv_spec = activation_spec(cfg, (*kv_dims, None))
    seg_spec = activation_spec(cfg, TOKENS)
    body = functools.partial(_attention_body, cfg, kind, sequence_axes(cfg), context_size(cfg))
    specs = (q_spec, kv_spec, kv_spec, None if segments is None else seg_spec)
    run = jax.shard_map(body, in_specs=specs, out_specs=q_spec, check_vma=False)
    return typing.cast(jax.Array, run(q, k, v, segments))


def _attention_body(cfg: Config, kind: str, seq_axes: MeshAxes, p: int, q, k, v, segments):
    device = jax.lax.axis_index(seq_axes)
    length = q.shape[1]
    causal = not cfg.mlm_training
    if kind == "linear":
        if causal:
            return _causal_linear(cfg, seq_axes, p, device, q, k, v, segments)
        return attn_lib.bidirectional_linear_attention(
            q, *(jax.lax.all_gather(a, seq_axes, axis=1, tiled=True) for a in (k, v))
        )
    window = cfg.local_attention_radius if kind == "local" else None
    if window is not None and causal and window - 1 <= length // 2:
        return _local_with_halo(cfg, seq_axes, p, device, q, k, v, segments, window)
    ring = Ring(
        axes=seq_axes,
        size=p,
        causal=causal,
        window=window,
        scale=attn_lib.score_scale(cfg),
        transport=cfg.context_parallel,
        kernel=block_kernel(cfg, window, length),
        interpret=target_platform() != "tpu",
    )
    if segments is None:
        segments = jnp.zeros(q.shape[:2], jnp.int32)
    return ring_attention(ring, q, k, v, segments)


# --------------------------------------------------------------------------------------------
# Softmax attention chunk by chunk (all-gather or ring)


def block_kernel(cfg: Config, window: int | None, length: int) -> str:
    """What computes a block of a layer's chunked softmax attention: `splash`
    (`splash_chunks`) for causal layers without a window whose half chunks are whole
    128-token tiles, when `attention_kernel` is `splash`, or `auto` on a TPU; else `xla`.
    `length`: the tokens a device holds."""
    applies = not cfg.mlm_training and window is None and (length // 2) % 128 == 0
    wanted = cfg.attention_kernel == "splash" or (
        cfg.attention_kernel == "auto" and target_platform() == "tpu"
    )
    return "splash" if applies and wanted and splash_chunks.supported() else "xla"


@dataclass(frozen=True)
class Ring:
    """What the chunked softmax attention needs to know besides its arrays (hashable: a
    `custom_vjp`'s static argument). Causal attention holds the sequence load-balanced."""

    axes: MeshAxes  # the mesh axes the sequence is split over
    size: int  # how many devices share a sequence
    causal: bool
    window: int | None  # a local layer's, or None
    scale: float
    transport: str  # `context_parallel`: all_gather or ring
    kernel: str = "xla"  # what computes a block: `block_kernel`
    interpret: bool = False  # the splash kernel in Pallas's interpreter (not on a TPU)

    def positions(self, device, length: int):
        """Original-sequence indices of the `length` tokens a device holds."""
        local = jnp.arange(length)
        if not self.causal:  # in sequence order
            return device * length + local
        chunk = length // 2
        first = device * chunk + local
        second = (2 * self.size - 1 - device) * chunk + local - chunk
        return jnp.where(local < chunk, first, second)

    def visible(self, q_pos, k_pos, q_seg, k_seg):
        """[batch, queries, keys]: which keys each query sees (original positions, segments)."""
        offset = q_pos[:, None] - k_pos[None, :]
        seen = jnp.ones_like(offset, bool)
        if self.causal:
            seen &= offset >= 0
        if self.window is not None:
            seen &= (offset if self.causal else jnp.abs(offset)) < self.window
        return seen[None] & (q_seg[:, :, None] == k_seg[:, None, :])


def _shift(ring: Ring, tree):
    """Every device's `tree` to the next device along the ring."""
    pairs = [(i, (i + 1) % ring.size) for i in range(ring.size)]
    return jax.lax.ppermute(tree, ring.axes, pairs)


def _walk(ring: Ring, own: tuple, state, visit):
    """`state = visit(state, step, chunk)` for each step of the ring (a Python int): chunk =
    (keys, values, segments) of the device `step` places before this one, its own first.
    `ring` receives each chunk while the previous one is computed, and never holds more than
    two: the send of the next chunk waits for the step before (an optimization barrier; left
    free, the compiler would start every transfer at once and hold every chunk, an
    all-gather's memory). `all_gather` gathers every chunk first and reads one per step."""
    device = jax.lax.axis_index(ring.axes)
    if ring.transport == "all_gather":
        gathered = tuple(jax.lax.all_gather(a, ring.axes) for a in own)  # [P, ...] each
        for step in range(ring.size):
            source = (device - step) % ring.size
            chunk = tuple(jax.lax.dynamic_index_in_dim(a, source, 0, False) for a in gathered)
            state = visit(state, step, chunk if step else own)
        return state
    chunk = own
    for step in range(ring.size):
        if step < ring.size - 1:  # send it on once the step before is done
            sendable, state = jax.lax.optimization_barrier((chunk, state))
            upcoming = _shift(ring, sendable)
        state = visit(state, step, chunk)
        if step < ring.size - 1:
            chunk = upcoming
    return state


def _grouped_kv(a):
    """[batch, seq, kv_heads, d] -> [batch, kv_heads, seq, d]."""
    return a.transpose(0, 2, 1, 3)


def _block(ring: Ring, device, step, source, compute) -> list:
    """`compute(part)` on the parts of a (queries, keys) block that can hold a visible key,
    one result per part. For causal balanced attention, at the first step (a device's own
    chunks) the first half of the queries against the first half of the keys and the second
    half against all; at every later step all queries against the first half of the keys when
    the keys' device comes before this one (their second chunk is later than both of ours),
    else the second half of the queries against all keys. So each device computes the same
    amount at every step, and no part is larger than half a block. Otherwise the whole
    block (`part` None)."""
    if not ring.causal:
        return [compute(None)]
    if isinstance(step, int) and step == 0:
        return [compute("first"), compute("late")]
    return [jax.lax.cond(source < device, lambda: compute("early"), lambda: compute("late"))]


def _parts(part, length):
    """(query slice, key slice) of a block for `_block`'s part."""
    half = length // 2
    whole = slice(0, length)
    if part == "first":
        return slice(0, half), slice(0, half)
    if part == "early":
        return whole, slice(0, half)
    if part == "late":
        return slice(half, length), whole
    return whole, whole


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_attention(ring: Ring, q, k, v, segments):
    """Softmax attention of one device's queries q [batch, len, heads, d] over every device's
    keys and values [batch, len, kv_heads, d] (segments [batch, len] travel with them),
    chunk by chunk with an online softmax; run inside `jax.shard_map`."""
    return _ring_forward(ring, q, k, v, segments)[0]


def _ring_forward(ring: Ring, q, k, v, segments):
    length = q.shape[1]
    device = jax.lax.axis_index(ring.axes)
    qg = attn_lib._grouped(q, k.shape[2])  # [b, kv, g, len, d]
    qg, q_pos, segments = _per_layer(qg, ring.positions(device, length), segments)

    def visit(stats, step, chunk):
        kc, vc, sc = chunk
        source = (device - step) % ring.size
        k_pos = ring.positions(source, length)
        kg, vg = _grouped_kv(kc), _grouped_kv(vc)

        def compute(part):
            qs, ks = _parts(part, length)
            keys = (kg[:, :, ks], vg[:, :, ks], k_pos[ks], sc[:, ks])
            if ring.kernel == "splash":
                block_stats = splash_chunks.block_stats(
                    qg[..., qs, :],
                    keys[0],
                    keys[1],
                    segments[:, qs],
                    keys[3],
                    causal=step == 0,  # the diagonal of a device's own chunks
                    scale=ring.scale,
                    interpret=ring.interpret,
                )
                return _pad_queries(block_stats, qs, length)
            block_stats = _by_query_blocks(
                lambda qb, pos, seg: _softmax_stats(ring, qb, pos, seg, *keys),
                (qg[..., qs, :], 3),
                (q_pos[qs], 0),
                (segments[:, qs], 1),
                keys=keys[0].shape[2],
            )
            return _pad_queries(block_stats, qs, length)

        for new in _block(ring, device, step, source, compute):
            stats = _merge(stats, new)
        return stats

    empty = (
        jnp.full(qg.shape[:-1], attn_lib.MASK_VALUE, jnp.float32),
        jnp.zeros(qg.shape[:-1], jnp.float32),
        jnp.zeros(qg.shape, jnp.float32),
    )
    top, total, out = _walk(ring, (k, v, segments), empty, visit)
    out = out / total[..., None]  # every query sees at least itself
    lse = top + jnp.log(total)
    result = attn_lib._ungrouped_out(out.astype(q.dtype))
    return result, (q, k, v, segments, result, lse)


def _per_layer(queries, positions, segments):
    """The queries' positions and segments, tied to the queries by an optimization barrier.
    The masks derive from positions and segments alone, the same in every layer: inside a
    scan over layers, XLA would hoist them out of the loop, one [queries, keys] mask per step
    and block of queries at once (gigabytes at long context); tied to this layer's queries,
    they are made where they are used."""
    return jax.lax.optimization_barrier((queries, positions, segments))


def _merge(stats, new):
    """Two online-softmax statistics (max, sum, weighted values) of the same queries over
    different keys -> over all of them."""
    (top, total, out), (top_new, total_new, out_new) = stats, new
    top_next = jnp.maximum(top, top_new)
    old, fresh = jnp.exp(top - top_next), jnp.exp(top_new - top_next)
    return (
        top_next,
        total * old + total_new * fresh,
        out * old[..., None] + out_new * fresh[..., None],
    )


def _softmax_stats(ring: Ring, qg, q_pos, q_seg, kg, vg, k_pos, k_seg):
    """Online-softmax statistics of queries qg [b, kv, g, q, d] over keys and values
    [b, kv, l, d]: (max score, sum of exponentials, their weighted values), float32, over the
    visible keys only (a row that sees none: MASK_VALUE, 0, 0)."""
    visible = ring.visible(q_pos, k_pos, q_seg, k_seg)[:, None, None]
    scores = jnp.einsum("bkgqd,bkld->bkgql", qg, kg, preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores * ring.scale, attn_lib.MASK_VALUE)
    top = scores.max(-1)
    probs = jnp.where(visible, jnp.exp(scores - top[..., None]), 0.0)
    weighted = jnp.einsum(
        "bkgql,bkld->bkgqd", probs.astype(vg.dtype), vg, preferred_element_type=jnp.float32
    )
    return top, probs.sum(-1), weighted


def _softmax_grads(ring: Ring, qg, dog, lse, delta, q_pos, q_seg, kg, vg, k_pos, k_seg):
    """(dq, dk, dv) of a block of queries against a block of keys, from the forward pass's
    log-sum-exp and delta = sum(d_out * out) per query: matmuls in the inputs' dtype with
    float32 accumulation (as flash attention's backward pass), everything else float32."""
    f32 = jnp.float32
    visible = ring.visible(q_pos, k_pos, q_seg, k_seg)[:, None, None]
    scores = jnp.einsum("bkgqd,bkld->bkgql", qg, kg, preferred_element_type=f32) * ring.scale
    probs = jnp.where(visible, jnp.exp(scores - lse[..., None]), 0.0)
    dv = jnp.einsum("bkgql,bkgqd->bkld", probs.astype(dog.dtype), dog, preferred_element_type=f32)
    dp = jnp.einsum("bkgqd,bkld->bkgql", dog, vg, preferred_element_type=f32)
    ds = probs * (dp - delta[..., None]) * ring.scale
    dq = jnp.einsum("bkgql,bkld->bkgqd", ds.astype(kg.dtype), kg, preferred_element_type=f32)
    dk = jnp.einsum("bkgql,bkgqd->bkld", ds.astype(qg.dtype), qg, preferred_element_type=f32)
    return dq, dk, dv


def query_block(queries: int, score_bytes_per_query: int) -> int:
    """How many of `queries` a block computes at once (see QUERY_BLOCK): a divisor of it."""
    size = QUERY_BLOCK
    while size > MIN_QUERY_BLOCK and size * score_bytes_per_query > SCORE_BYTES:
        size //= 2
    while queries % size:  # a power of two that divides the queries
        size //= 2
    return max(size, 1)


def _by_query_blocks(fn, *queries, keys: int, summed: int = 0):
    """`fn` over blocks of queries (`query_block`), one after another (a `lax.scan`), so that
    no more than one block's scores against the `keys` exist at once. `queries`: (array, its
    query axis) pairs, the first [b, kv, g, q, d]; fn returns arrays with the query axis
    where the inputs have it (3, or 0 for positions), except its last `summed` results, which
    are summed over the blocks."""
    first, axis = queries[0]
    count = first.shape[axis]
    size = query_block(count, 4 * keys * math.prod(first.shape[:axis]))
    blocks = count // size
    if blocks == 1:
        return fn(*(a for a, _ in queries))

    def split(a, axis):  # [..., count, ...] -> [blocks, ..., size, ...]
        shape = (*a.shape[:axis], blocks, size, *a.shape[axis + 1 :])
        return jnp.moveaxis(a.reshape(shape), axis, 0)

    def step(totals, xs):
        results = fn(*xs)
        kept, added = results[: len(results) - summed], results[len(results) - summed :]
        return tuple(t + a for t, a in zip(totals, added, strict=True)), kept

    first = jax.eval_shape(fn, *(split(a, axis)[0] for a, axis in queries))
    zeros = tuple(jnp.zeros(r.shape, r.dtype) for r in first[len(first) - summed :])
    totals, kept = jax.lax.scan(step, zeros, tuple(split(a, axis) for a, axis in queries))
    # the query axis of every per-query result is 3 ([b, kv, g, q, ...])
    merged = tuple(jnp.moveaxis(r, 0, 3).reshape(*r.shape[1:4], count, *r.shape[5:]) for r in kept)
    return (*merged, *totals)


def _pad_queries(stats, qs: slice, length: int):
    """Block statistics over a slice of the queries -> over all of them (nothing seen by the
    others: max MASK_VALUE, sum and output 0)."""
    if qs.start == 0 and qs.stop == length:
        return stats
    m, total, out = stats
    pad = [(0, 0)] * (m.ndim - 1) + [(qs.start, length - qs.stop)]
    return (
        jnp.pad(m, pad, constant_values=attn_lib.MASK_VALUE),
        jnp.pad(total, pad),
        jnp.pad(out, [*pad, (0, 0)]),
    )


def _ring_fwd(ring: Ring, q, k, v, segments):
    return _ring_forward(ring, q, k, v, segments)


def _ring_bwd(ring: Ring, residuals, d_out):
    """The chunks again, in the same order: each step's gradient of its keys and values is
    sent back to the device they came from (ring: travelling with them, one step behind, so
    that sending overlaps the next step; all-gather: summed into a gathered buffer that one
    reduce-scatter returns)."""
    q, k, v, segments, out, lse = residuals
    length = q.shape[1]
    device = jax.lax.axis_index(ring.axes)
    kv_heads = k.shape[2]
    qg = attn_lib._grouped(q, kv_heads)
    dog = attn_lib._grouped(d_out, kv_heads)
    og = attn_lib._grouped(out, kv_heads)
    delta = jnp.einsum("bkgqd,bkgqd->bkgq", dog, og, preferred_element_type=jnp.float32)
    qg, q_pos, segments = _per_layer(qg, ring.positions(device, length), segments)
    kv_grads = (jnp.zeros((k.shape[0], kv_heads, length, k.shape[3]), jnp.float32),) * 2
    gathering = ring.transport == "all_gather"

    def visit(state, step, chunk):
        # ring: the sums travelling with the chunk held now (one step behind it) and this
        # device's addition to the previous chunk's; all-gather: every chunk's sums
        dq, sums, pending = state
        kc, vc, sc = chunk
        source = (device - step) % ring.size
        k_pos = ring.positions(source, length)
        kg, vg = _grouped_kv(kc), _grouped_kv(vc)
        if not gathering and not (isinstance(step, int) and step == 0):
            sums = _shift(ring, jax.tree.map(jnp.add, sums, pending))

        def compute(part):
            qs, ks = _parts(part, length)
            kb, vb, kp, kseg = kg[:, :, ks], vg[:, :, ks], k_pos[ks], sc[:, ks]
            if ring.kernel == "splash":
                grads = splash_chunks.block_grads(
                    qg[..., qs, :],
                    dog[..., qs, :],
                    og[..., qs, :],
                    lse[..., qs],
                    kb,
                    vb,
                    segments[:, qs],
                    kseg,
                    causal=step == 0,
                    scale=ring.scale,
                    interpret=ring.interpret,
                )
                return _pad_grads(grads, qs, ks, length)
            grads = _by_query_blocks(
                lambda qb, dob, lse_b, delta_b, pos, seg: _softmax_grads(
                    ring, qb, dob, lse_b, delta_b, pos, seg, kb, vb, kp, kseg
                ),
                (qg[..., qs, :], 3),
                (dog[..., qs, :], 3),
                (lse[..., qs], 3),
                (delta[..., qs], 3),
                (q_pos[qs], 0),
                (segments[:, qs], 1),
                keys=kb.shape[2],
                summed=2,  # the keys' and values' gradients add up over query blocks
            )
            return _pad_grads(grads, qs, ks, length)

        parts = _block(ring, device, step, source, compute)
        dq_step, dk, dv = jax.tree.map(lambda *a: sum(a), *parts)
        if gathering:
            sums = tuple(
                jax.lax.dynamic_update_index_in_dim(
                    g, jax.lax.dynamic_index_in_dim(g, source, 0, False) + new, source, 0
                )
                for g, new in zip(sums, (dk, dv), strict=True)
            )
            return dq + dq_step, sums, pending
        return dq + dq_step, sums, (dk, dv)

    sums = (
        tuple(jnp.zeros((ring.size, *g.shape), g.dtype) for g in kv_grads)
        if gathering
        else kv_grads
    )
    state = (jnp.zeros(qg.shape, jnp.float32), sums, kv_grads)
    dq, sums, pending = _walk(ring, (k, v, segments), state, visit)
    if gathering:
        dk, dv = (jax.lax.psum_scatter(g, ring.axes, scatter_dimension=0) for g in sums)
    else:  # the sums for the chunk from the next device, which is where it goes
        dk, dv = _shift(ring, jax.tree.map(jnp.add, sums, pending))
    dq = attn_lib._ungrouped_out(dq).astype(q.dtype)
    dk, dv = (a.transpose(0, 2, 1, 3).astype(k.dtype) for a in (dk, dv))
    return dq, dk, dv, None


def _pad_grads(grads, qs: slice, ks: slice, length: int):
    """A block's (dq, dk, dv) over slices of the queries and keys -> over all of them."""
    dq, dk, dv = grads

    def pad(a, s, axis):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (s.start, length - s.stop)
        return jnp.pad(a, widths)

    return pad(dq, qs, 3), pad(dk, ks, 2), pad(dv, ks, 2)


ring_attention.defvjp(_ring_fwd, _ring_bwd)


# --------------------------------------------------------------------------------------------
# Local attention: a halo from the neighbouring chunk


def _local_with_halo(cfg: Config, seq_axes, p: int, device, q, k, v, segments, window: int):
    """Causal sliding-window attention of a balanced device's two chunks. Each needs the last
    `window - 1` keys and values (and segment ids) of the chunk before it: chunk r's is the
    end of device r-1's first chunk, chunk 2P-1-r's the end of device r+1's second (on the
    last device, its own first chunk). Two `ppermute`s of that halo, nothing else, then
    `blocked_local_attention` over halo + chunk; the first chunk of the sequence has no halo
    (its slots carry segment -1, which no query has)."""
    b, length = q.shape[:2]
    chunk, halo = length // 2, window - 1
    if segments is None:
        segments = jnp.zeros((b, length), jnp.int32)
    if halo == 0:
        return attn_lib.blocked_local_attention(
            q, k, v, window=1, scale=attn_lib.score_scale(cfg), segments=segments
        )

    def tails(slot):
        part = slice(slot * chunk + chunk - halo, (slot + 1) * chunk)
        return (k[:, part], v[:, part], segments[:, part])

    forward = [(r, r + 1) for r in range(p - 1)]
    backward = [(r + 1, r) for r in range(p - 1)]
    first_halo = jax.lax.ppermute(tails(0), seq_axes, forward)
    second_halo = jax.lax.ppermute(tails(1), seq_axes, backward)
    last = device == p - 1
    second_halo = jax.tree.map(lambda own, got: jnp.where(last, own, got), tails(0), second_halo)
    k0, v0, s0 = first_halo
    s0 = jnp.where(device == 0, -1, s0)  # nothing precedes the sequence's first chunk

    def one_chunk(slot, halo_kvs):
        hk, hv, hs = halo_kvs
        part = slice(slot * chunk, (slot + 1) * chunk)
        qe = jnp.concatenate([jnp.zeros_like(q[:, :halo]), q[:, part]], axis=1)
        ke = jnp.concatenate([hk, k[:, part]], axis=1)
        ve = jnp.concatenate([hv, v[:, part]], axis=1)
        se = jnp.concatenate([hs, segments[:, part]], axis=1)
        out = attn_lib.blocked_local_attention(
            qe, ke, ve, window=window, scale=attn_lib.score_scale(cfg), segments=se
        )
        return out[:, halo:]

    return jnp.concatenate([one_chunk(0, (k0, v0, s0)), one_chunk(1, second_halo)], axis=1)


# --------------------------------------------------------------------------------------------
# Linear attention: each chunk's running sums, gathered


def _causal_linear(cfg: Config, seq_axes, p: int, device, q, k, v, segments):
    """GPT-Neo's causal linear attention of a balanced device's two chunks. A chunk's
    contribution to later tokens is the running sums it ends with (sum of exp(k) (x) v and of
    exp(k) over its last segment) and that segment's id; each device all-gathers every
    chunk's, folds those of the chunks before each of its own in order (restarting where a
    segment begins, as `causal_linear_attention` does), and starts each chunk from them."""
    b, length = q.shape[:2]
    chunk = length // 2
    if segments is None:
        segments = jnp.ones((b, length), jnp.int32)
    halves = [slice(0, chunk), slice(chunk, length)]
    summaries = [_chunk_sums(k[:, s], v[:, s], segments[:, s]) for s in halves]
    # [P, 2 slots, ...] -> the 2P chunks in sequence order
    gathered = jax.lax.all_gather(jax.tree.map(lambda *a: jnp.stack(a), *summaries), seq_axes)
    in_order = [
        jax.tree.map(lambda a, c=c: a[_owner(c, p), int(c >= p)], gathered) for c in range(2 * p)
    ]
    first_segment = jax.lax.all_gather(segments[:, 0], seq_axes)[0]  # the sequence's first
    starts = [(jnp.zeros_like(in_order[0][0]), jnp.zeros_like(in_order[0][1]), first_segment)]
    for kv_sum, k_sum, last in in_order[:-1]:
        state, normaliser, open_segment = starts[-1]
        carried = (last == open_segment).astype(jnp.float32)
        starts.append(
            (
                kv_sum + state * carried[:, None, None, None],
                k_sum + normaliser * carried[:, None, None],
                last,
            )
        )
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *starts)  # [2P, ...]
    mine = [device, 2 * p - 1 - device]
    outs = []
    for slot, s in enumerate(halves):
        start = jax.tree.map(
            lambda a, c=mine[slot]: jax.lax.dynamic_index_in_dim(a, c, 0, False), stacked
        )
        outs.append(
            attn_lib.causal_linear_attention(
                q[:, s], k[:, s], v[:, s], segments=segments[:, s], initial=start
            )
        )
    return jnp.concatenate(outs, axis=1)


def _chunk_sums(k, v, segments):
    """A chunk's running sums at its end, over its last segment: (sum exp(k) (x) v [b, h, d,
    e], sum exp(k) [b, h, d], that segment's id [b])."""
    k = jnp.exp(k.astype(jnp.float32))
    last = segments[:, -1]
    in_last = (segments == last[:, None]).astype(jnp.float32)
    kv_sum = jnp.einsum("bthd,bthe,bt->bhde", k, v.astype(jnp.float32), in_last)
    return kv_sum, jnp.einsum("bthd,bt->bhd", k, in_last), last


__all__ = [
    "attention",
    "attention_layer",
    "balanced",
    "context_size",
    "ring_attention",
    "to_balanced",
    "to_contiguous",
]
