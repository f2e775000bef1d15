"""Attention: global, local (sliding window), linear; causal, or bidirectional for
`mlm_training`; per-backend kernels.

Softmax attention is *unscaled* by default: GPT-Neo folds 1/sqrt(head_dim) into q's init
(mesh-tf `fold_scaling_into_initializer`), and Hugging Face's GPT-Neo computes q.k unscaled
too, so trained checkpoints need exactly that. `scale_attn_weights` multiplies the float32
scores by 1/sqrt(head_dim) instead, as Llama, Mistral and Qwen do. Scores and softmax are
float32.

Grouped-query attention (`n_kv_head` < n_head): query head i reads key/value head
i // (n_head / n_kv_head), as Hugging Face's `repeat_kv` orders them. The XLA kernels and the
decoding cache group the queries by the key/value head they read, so each key is multiplied by
its whole group at once and never copied (the cache's memory and the bytes each generated token
reads shrink by the group size); cuDNN, splash and linear attention get each key/value head
repeated for its group.

Kernels for softmax attention (config key `attention_kernel`):
- `xla`: plain einsums, the reference every other kernel is tested against. Causal global
  layers score each block of queries (up to `QUERY_BLOCKS`) against the keys up to the
  block's end only; local layers use a blocked form that costs O(T * window), not O(T^2).
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, flash attention on NVIDIA
  GPUs (bfloat16/float16 only, no attention dropout).
- `splash`: Pallas splash attention on TPU (sequence a multiple of 128, no attention dropout,
  sequence and head dims not sharded).
`auto` picks the fastest kernel that applies and falls back to `xla`. Bidirectional attention
(masked-LM training) and memory key/values (`num_mem_kv`) always run on `xla`. A layout that
splits the sequence over devices runs attention in `gpt_neo.models.context` instead, built
from this module's projections and kernels.

Packed rows (`segment_ids` [batch, seq], equal ids = one document, 0 = padding): a query sees
only keys of its own segment, in every layer kind and kernel; a local window also stops at the
segment's start, and linear attention's cumulative sums restart there. Segments are contiguous
runs (packing writes them so). `num_mem_kv` memory slots are not tokens: every segment sees
them, as every sequence does.

Bidirectional local attention lets query i see keys j with |i - j| < radius. (GPT-Neo's
Mesh-TensorFlow kernel saw (i - radius, i + radius], one more key to the right than the left,
an artefact of its blocking; there is no checkpoint of it to be compatible with, since its
masked-LM training never worked.)
"""

from __future__ import annotations

import math
import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import activation_spec, constrain, rules
from gpt_neo.models.layers import ParamDecl, dropout, normal, ones, rms_norm, zeros
from gpt_neo.models.platform import target_platform
from gpt_neo.models.positions import rotate, segment_begins

MASK_VALUE = float(jnp.finfo(jnp.float32).min)
LINEAR_CHUNK = 64
# Causal XLA attention runs its queries in blocks that skip the masked keys (dense_attention):
# at most this many blocks, of at least this many queries (shorter sequences gain too little to
# pay for the extra compile time of more, smaller matmuls).
QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 64


class KVCache(NamedTuple):
    """One layer's decoding cache, and where the tokens of this call go in it.

    Laid out for the matmuls that read it every step, so nothing is transposed per token:
    `keys` [batch, kv_heads, head_dim, length], `values` [batch, kv_heads, length, head_dim].
    `slots` [new]: the cache slots of this call's tokens, the same in every row. `valid`
    [batch, length]: slots that hold a real token. Prompts are left-padded to a common length,
    so slot distance equals position distance within a row, and causality and the local
    window are slot comparisons. `segments` [batch, length] (packed prompts only): each slot's
    segment id; a token sees the slots of its own segment.
    """

    keys: jax.Array
    values: jax.Array
    slots: jax.Array
    valid: jax.Array
    segments: jax.Array | None = None


MEMORY = (None, axes.HEADS, axes.KV)  # num_mem_kv memory slots


def param_decls(cfg: Config, kind: str = "global") -> dict[str, ParamDecl]:
    """q/k/v/o as mesh-tf's `attention_params_simple` initialises them (scale folded into q,
    unless `scale_attn_weights` scales the scores); k and v have `n_kv_head` heads. `bias`
    adds o's bias, `qkv_bias` q/k/v's, `qk_norm` the scales of the per-head norms; global
    layers with `num_mem_kv` add GPT-Neo's memory keys and values."""
    d, h, kvh, hd = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q_std = d**-0.5 if cfg.scale_attn_weights else d**-0.5 * hd**-0.5
    decls: dict = {
        "q": ParamDecl((d, h, hd), axes.QKV, normal(q_std)),
        "k": ParamDecl((d, kvh, hd), axes.KV_PROJ, normal(d**-0.5)),
        "v": ParamDecl((d, kvh, hd), axes.KV_PROJ, normal(d**-0.5)),
        "o": ParamDecl((h, hd, d), axes.OUT, normal((h * hd) ** -0.5)),
    }
    if cfg.bias:
        decls["o_bias"] = ParamDecl((d,), axes.OUT_BIAS, zeros)
    if cfg.qkv_bias:
        decls["q_bias"] = ParamDecl((h, hd), axes.QKV_BIAS, zeros)
        decls["k_bias"] = ParamDecl((kvh, hd), axes.KV_BIAS, zeros)
        decls["v_bias"] = ParamDecl((kvh, hd), axes.KV_BIAS, zeros)
    if cfg.qk_norm:
        for name in ("q_norm", "k_norm"):
            decls[name] = {"scale": ParamDecl((hd,), axes.HEAD_NORM, ones)}
    if cfg.num_mem_kv and kind == "global":
        for name in ("mem_k", "mem_v"):
            decls[name] = ParamDecl((cfg.num_mem_kv, h, hd), MEMORY, normal(hd**-0.5))
    return decls


def attention(
    cfg: Config,
    kind: str,
    p: dict,
    x: jax.Array,
    rng: jax.Array | None = None,
    cache: KVCache | None = None,
    positions: jax.Array | None = None,
    segments: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """One attention sub-block, x [batch, seq, embd] -> ([batch, seq, embd], cache).

    Without a cache (training, scoring) the positions of x attend to each other. With one
    (decoding) x's keys and values are written into it at `cache.slots` and x attends over
    every valid cached slot; the updated cache is returned. `rng` enables attention dropout.
    `positions` [batch, seq] are x's positions, which rotary needs (default 0..seq-1).
    `segments` [batch, seq]: packed documents' ids (module docstring); None: one sequence.
    """
    q, k, v = queries_keys_values(cfg, p, x, positions)
    # global layers only; a shared block (share_parameters) holds memory for its global uses
    memory = (p["mem_k"], p["mem_v"]) if "mem_k" in p and kind == "global" else None
    if cache is None:
        k, v = (constrain(a, cfg, axes.GROUPED_KEYS_VALUES) for a in (k, v))
        out = _self_attention(cfg, kind, q, k, v, rng, memory, segments)
    else:
        out, cache = _cached_attention(cfg, kind, q, k, v, cache, memory)
    return project_out(constrain(out, cfg, axes.QUERIES), p), cache


def queries_keys_values(cfg: Config, p: dict, x: jax.Array, positions=None):
    """x [batch, seq, embd] -> q [batch, seq, heads, head_dim], k and v [batch, seq,
    kv_heads, head_dim]: projected (with their biases), q and k normed (`qk_norm`) and
    rotated (`rotary_emb`, at `positions`, default 0..seq-1)."""
    q, k, v = (project_in(x, p[name], p.get(f"{name}_bias")) for name in "qkv")
    if cfg.qk_norm:  # Qwen3: before rotary
        q = rms_norm(q, p["q_norm"]["scale"], cfg.norm_eps)
        k = rms_norm(k, p["k_norm"]["scale"], cfg.norm_eps)
    if cfg.rotary_emb:
        if positions is None:
            positions = jnp.arange(x.shape[1])[None, :]
        q, k = rotate(cfg, q, positions), rotate(cfg, k, positions)
    return constrain(q, cfg, axes.QUERIES), k, v


def project_in(x, w, bias=None):
    """[batch, seq, embd] x [embd, heads, head_dim] (+ bias [heads, head_dim]) as one 2-D
    matmul (XLA:CPU's fast path)."""
    e, h, d = w.shape
    y = jnp.dot(x, w.reshape(e, h * d)).reshape(*x.shape[:-1], h, d)
    return y if bias is None else y + bias


def project_out(out, p):
    """[batch, seq, heads, head_dim] -> [batch, seq, embd] through o (and o's bias, if any),
    as one 2-D matmul."""
    b, t, h, d = out.shape
    y = jnp.dot(out.reshape(b, t, h * d), p["o"].reshape(h * d, -1))
    return y + p["o_bias"] if "o_bias" in p else y


def ungrouped(cfg: Config, a: jax.Array) -> jax.Array:
    """Keys or values [batch, seq, kv_heads, head_dim] -> one head per query head [batch, seq,
    heads, head_dim]: each key/value head repeated for its group (as `repeat_kv` orders it)."""
    a = constrain(a, cfg, axes.GROUPED_KEYS_VALUES)
    if cfg.kv_groups > 1:
        a = jnp.repeat(a, cfg.kv_groups, axis=2)
    return constrain(a, cfg, axes.KEYS_VALUES)


def score_scale(cfg: Config) -> float:
    """What softmax attention multiplies q.k by: 1/sqrt(head_dim) with `scale_attn_weights`,
    else 1 (GPT-Neo's unscaled attention)."""
    return cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0


def _self_attention(cfg: Config, kind: str, q, k, v, rng, memory=None, segments=None):
    """Each position of the sequence attends to those before it (or, for a masked LM, around
    it) in its segment, per the layer kind. k, v have `n_kv_head` heads."""
    causal = not cfg.mlm_training
    if kind == "linear":
        k, v = ungrouped(cfg, k), ungrouped(cfg, v)
        if causal:
            return causal_linear_attention(q, k, v, segments=segments)
        if segments is not None:
            raise ConfigError(
                "bidirectional linear attention (mlm_training) does not take packed segments; "
                "use global or local layers, or unpacked data"
            )
        return bidirectional_linear_attention(q, k, v)
    window = cfg.local_attention_radius if kind == "local" else None
    # GPT-Neo applies attention dropout in global layers only.
    rate = cfg.attn_dropout if (kind == "global" and rng is not None) else 0.0
    return softmax_attention(
        cfg,
        q,
        k,
        v,
        scale=score_scale(cfg),
        window=window,
        dropout_rate=rate,
        rng=rng,
        causal=causal,
        memory=memory,
        segments=segments,
    )


def _cached_attention(cfg: Config, kind: str, q, k, v, cache: KVCache, memory=None):
    """q, k, v [batch, new, heads, head_dim]: write k and v at the cache's slots, attend over
    the visible cached slots. Returns (out [batch, new, heads, head_dim], updated cache)."""
    start = cache.slots[0]
    keys = jax.lax.dynamic_update_slice_in_dim(cache.keys, k.transpose(0, 2, 3, 1), start, axis=3)
    values = jax.lax.dynamic_update_slice_in_dim(
        cache.values, v.transpose(0, 2, 1, 3), start, axis=2
    )
    keys = constrain(keys, cfg, axes.CACHED_KEYS)
    values = constrain(values, cfg, axes.CACHED_VALUES)
    q = q.transpose(0, 2, 1, 3)  # [b, h, new, d]
    b, h, new, d = q.shape
    offset = cache.slots[:, None] - jnp.arange(values.shape[2])[None, :]  # [new, length]
    visible = (offset >= 0)[None] & cache.valid[:, None, :]  # [batch, new, length]
    if cache.segments is not None:  # packed prompts: a token sees its own segment's slots
        own = jax.lax.dynamic_slice_in_dim(cache.segments, start, q.shape[2], axis=1)
        visible &= own[:, :, None] == cache.segments[:, None, :]
    if kind == "local":
        visible &= offset < cfg.local_attention_radius
    if kind == "linear":
        repeat = cfg.kv_groups
        out = _linear_attention_over_cache(
            q, jnp.repeat(keys, repeat, axis=1), jnp.repeat(values, repeat, axis=1), visible
        )
        return out.transpose(0, 2, 1, 3), cache._replace(keys=keys, values=values)
    # queries grouped by the key/value head they read: [b, kv_heads, group, new, d]
    grouped = q.reshape(b, cfg.n_kv_head, cfg.kv_groups, new, d)
    scores = jnp.einsum("bkgqd,bkdl->bkgql", grouped, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(visible[:, None], scores.reshape(b, h, new, -1), MASK_VALUE)
    slots = 0
    if memory is not None:  # memory slots: visible to every query, per query head
        mem_k = memory[0]
        mem_scores = jnp.einsum("bhqd,mhd->bhqm", q, mem_k, preferred_element_type=jnp.float32)
        scores, slots = jnp.concatenate([mem_scores, scores], axis=-1), mem_k.shape[0]
    probs = jax.nn.softmax(scores * score_scale(cfg), axis=-1)
    cached = probs[..., slots:].reshape(b, cfg.n_kv_head, cfg.kv_groups, new, -1)
    out = jnp.einsum("bkgql,bkld->bkgqd", cached.astype(values.dtype), values)
    out = out.reshape(b, h, new, d)
    if memory is not None:
        mem_probs = probs[..., :slots].astype(values.dtype)
        out += jnp.einsum("bhqm,mhd->bhqd", mem_probs, memory[1].astype(values.dtype))
    return out.transpose(0, 2, 1, 3), cache._replace(keys=keys, values=values)


def _linear_attention_over_cache(q, k, v, visible, eps=1e-6):
    """`causal_linear_attention` from cached raw keys: out_i = sum_j (q_i . exp(k_j)) v_j /
    (q_i . (sum_j exp(k_j) + eps)) over the visible j, q softmaxed; padding is not visible."""
    dtype = v.dtype
    q = jax.nn.softmax(q.astype(jnp.float32), axis=-1)  # [b, h, new, d]
    k = jnp.exp(k.astype(jnp.float32))  # [b, h, d, length]
    mask = visible.astype(jnp.float32)  # [b, new, length]
    normaliser = jnp.einsum("bhqd,bhqd->bhq", q, jnp.einsum("bqk,bhdk->bhqd", mask, k) + eps)
    scores = jnp.einsum("bhqd,bhdk->bhqk", q, k) * mask[:, None]
    out = jnp.einsum("bhqk,bhkd->bhqd", scores, v.astype(jnp.float32)) / normaliser[..., None]
    return out.astype(dtype)


def softmax_attention(
    cfg,
    q,
    k,
    v,
    *,
    scale=1.0,
    window=None,
    dropout_rate=0.0,
    rng=None,
    causal=True,
    memory=None,
    segments=None,
):
    """Softmax attention of scores q.k * `scale`, optionally windowed: query i sees keys j
    with 0 <= i-j < window (causal) or |i-j| < window (bidirectional) in its segment, and
    every `memory` slot."""
    plain = not causal or memory is not None  # what only the XLA kernels compute
    kernel = resolve_kernel(cfg, q.dtype, q.shape[1], dropout_rate > 0, plain=plain)
    if kernel in ("cudnn", "splash"):  # both take one key/value head per query head
        k, v = ungrouped(cfg, k), ungrouped(cfg, v)
    if kernel == "cudnn":
        return dot_product_attention(
            q, k, v, scale=scale, window=window, implementation="cudnn", segments=segments
        )
    if kernel == "splash":
        return splash_attention(cfg, q, k, v, scale=scale, window=window, segments=segments)
    if window is not None and q.shape[1] > window and memory is None:
        return blocked_local_attention(
            q, k, v, scale=scale, window=window, causal=causal, segments=segments
        )
    # slicing a sharded sequence into query blocks would move each block to fewer devices
    query_blocks = 1 if _sharded(cfg, axes.SEQ) else query_blocks_for(q.shape[1])
    return dense_attention(
        q,
        k,
        v,
        scale=scale,
        window=window,
        dropout_rate=dropout_rate,
        rng=rng,
        causal=causal,
        memory=memory,
        segments=segments,
        query_blocks=query_blocks,
    )


def query_blocks_for(seq_len: int) -> int:
    """How many query blocks causal XLA attention over `seq_len` positions runs in."""
    return max(1, min(QUERY_BLOCKS, seq_len // MIN_QUERY_BLOCK))


def resolve_kernel(cfg: Config, dtype, seq_len: int, has_dropout: bool, plain=False) -> str:
    """The kernel to run: `auto` prefers the backend's fused kernel and falls back to XLA;
    a forced kernel that cannot run this attention is a `ConfigError`. `plain`: the attention
    is bidirectional or has memory slots, which only XLA computes."""
    if cfg.attention_kernel == "auto":
        preferred = {"gpu": "cudnn", "tpu": "splash"}.get(target_platform(), "xla")
        usable = not plain and _why_not(cfg, preferred, dtype, seq_len, has_dropout) is None
        return preferred if usable else "xla"
    if plain and cfg.attention_kernel != "xla":
        raise ConfigError(
            f"attention_kernel '{cfg.attention_kernel}' computes causal attention without "
            "memory slots only (this model has mlm_training or num_mem_kv). Use 'auto' or 'xla'."
        )
    if reason := _why_not(cfg, cfg.attention_kernel, dtype, seq_len, has_dropout):
        raise ConfigError(
            f"attention_kernel '{cfg.attention_kernel}' cannot run this model: {reason}. "
            "Use attention_kernel 'auto' to fall back to XLA where it does not apply."
        )
    return cfg.attention_kernel


def _why_not(cfg: Config, kernel: str, dtype, seq_len: int, has_dropout: bool) -> str | None:
    """Why `kernel` cannot compute this attention, or None when it can."""
    if kernel == "xla":
        return None
    if has_dropout:
        return "it has no attention dropout (set attn_dropout to 0)"
    if _sharded(cfg, axes.SEQ, axes.KV_SEQ, axes.KV):
        return "the layout shards the sequence or the head dimension"
    if kernel == "cudnn" and dtype not in (jnp.bfloat16, jnp.float16):
        return "cuDNN flash attention needs precision bfloat16"
    if kernel == "cudnn" and (cfg.head_dim % 8 or cfg.head_dim > 128):
        return f"cuDNN flash attention needs a head dim that is a multiple of 8, at most 128 (got {cfg.head_dim})"
    if kernel == "splash" and seq_len % 128:
        return f"splash attention needs a sequence length that is a multiple of 128 (got {seq_len})"
    return None


def _sharded(cfg: Config, *logical: str) -> bool:
    """Whether the layout splits any of these logical activation axes over devices."""
    return any(axis in rules(cfg).activations for axis in logical)


def _mask(scores, q_pos, k_pos, window, causal=True, length=None, q_seg=None, k_seg=None):
    """Scores [batch, ..., q, k] of invisible keys (future ones when `causal`, outside the
    window, before the start or, with `length`, past the end of the sequence, and with
    segments q_seg [batch, q] / k_seg [batch, k], another segment's) set to MASK_VALUE."""
    offset = q_pos[:, None] - k_pos[None, :]
    visible = k_pos[None, :] >= 0
    if length is not None:
        visible &= k_pos[None, :] < length
    if causal:
        visible &= offset >= 0
    if window is not None:
        visible &= (offset if causal else jnp.abs(offset)) < window
    if q_seg is not None and k_seg is not None:
        same = q_seg[:, :, None] == k_seg[:, None, :]  # [batch, q, k]
        visible = visible & same.reshape(same.shape[0], *(1,) * (scores.ndim - 3), *same.shape[1:])
    return jnp.where(visible, scores, MASK_VALUE)


def _grouped(q, kv_heads: int):
    """Queries [batch, seq, heads, head_dim] -> [batch, kv_heads, group, seq, head_dim], each
    key/value head's group of query heads together (heads next to batch: XLA:CPU runs batched
    matmuls with leading batch dims fastest)."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _ungrouped_out(out):
    """[batch, kv_heads, group, seq, head_dim] -> [batch, seq, heads, head_dim]."""
    b, kv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


def dense_attention(
    q,
    k,
    v,
    *,
    scale=1.0,
    window=None,
    dropout_rate=0.0,
    rng=None,
    causal=True,
    memory=None,
    segments=None,
    query_blocks=1,
):
    """Reference: [T, T] scores. q [batch, seq, heads, head_dim]; k, v [batch, seq, kv_heads,
    head_dim], query head i reading key/value head i // (heads / kv_heads), without repeating
    them (each key is multiplied by its whole group of queries at once); `memory` (mem_k,
    mem_v) [slots, heads, head_dim] adds keys every query (of any segment) sees.

    Causal attention with `query_blocks` > 1 scores each block of queries against the keys up
    to the block's end only, so most of the masked upper triangle is never computed: 4 blocks
    compute 5/8 of the square. The result is the same; the blocks are sliced from the
    sequence, so a layout that shards it passes 1."""
    t, h, d = q.shape[1:]
    kv_heads = k.shape[2]
    qg = _grouped(q, kv_heads)
    k, v = (a.transpose(0, 2, 1, 3) for a in (k, v))  # [batch, kv_heads, seq, head_dim]
    if memory is not None:  # per query head, grouped like the queries: [slots, kv, group, d]
        memory = tuple(m.reshape(m.shape[0], kv_heads, h // kv_heads, d) for m in memory)
    pos = jnp.arange(t)
    size = -(-t // query_blocks) if causal else t
    outs = []
    for start in range(0, t, size):
        end = min(start + size, t)
        seen = end if causal else t  # keys this block may see are all before `seen`
        scores = jnp.einsum(
            "bkgqd,bkld->bkgql",
            qg[:, :, :, start:end],
            k[:, :, :seen],
            preferred_element_type=jnp.float32,
        )
        q_seg = k_seg = None
        if segments is not None:
            q_seg, k_seg = segments[:, start:end], segments[:, :seen]
        scores = _mask(scores, pos[start:end], pos[:seen], window, causal, None, q_seg, k_seg)
        slots = 0
        if memory is not None:  # GPT-Neo prepends the memory slots to the keys
            mem_scores = jnp.einsum(
                "bkgqd,mkgd->bkgqm",
                qg[:, :, :, start:end],
                memory[0],
                preferred_element_type=jnp.float32,
            )
            scores, slots = jnp.concatenate([mem_scores, scores], axis=-1), memory[0].shape[0]
        block_rng = None if rng is None else jax.random.fold_in(rng, start)
        probs = dropout(jax.nn.softmax(scores * scale, axis=-1), dropout_rate, block_rng)
        probs = probs.astype(v.dtype)
        out = jnp.einsum("bkgql,bkld->bkgqd", probs[..., slots:], v[:, :, :seen])
        if memory is not None:
            out += jnp.einsum("bkgqm,mkgd->bkgqd", probs[..., :slots], memory[1].astype(v.dtype))
        outs.append(out)
    return _ungrouped_out(jnp.concatenate(outs, axis=3))


def blocked_local_attention(q, k, v, *, window: int, scale=1.0, causal: bool = True, segments=None):
    """Sliding-window attention in O(T * window): each block of `window` queries attends to its
    own block of keys and the previous one (and the next one when bidirectional), which
    together hold every key it may see (segments [batch, seq] blocked the same way). k, v may
    have fewer heads than q, as in `dense_attention`."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    pad = -t % window
    if pad:
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        if segments is not None:
            segments = jnp.pad(segments, ((0, 0), (0, pad)))
    n = (t + pad) // window

    def blocks(a):  # [b, n, window, ...]
        return a.reshape(b, n, window, *a.shape[2:])

    def neighbourhood(a):  # [b, n, 2 or 3 * window, ...]
        a = blocks(a)
        rest = ((0, 0),) * (a.ndim - 3)
        parts = [jnp.pad(a, ((0, 0), (1, 0), (0, 0), *rest))[:, :-1], a]
        if not causal:
            parts.append(jnp.pad(a, ((0, 0), (0, 1), (0, 0), *rest))[:, 1:])
        return jnp.concatenate(parts, axis=2)

    q_pos = jnp.arange(window)
    # relative to the block start; < 0 is the previous block, >= window the next one
    k_pos = jnp.arange(-window, window if causal else 2 * window)

    def one_block(qb, kb, vb, start, q_seg, k_seg):
        qg = _grouped(qb, kv_heads)
        kb, vb = (a.transpose(0, 2, 1, 3) for a in (kb, vb))
        scores = jnp.einsum("bkgqd,bkld->bkgql", qg, kb, preferred_element_type=jnp.float32)
        scores = _mask(scores, start + q_pos, start + k_pos, window, causal, t, q_seg, k_seg)
        probs = jax.nn.softmax(scores * scale, axis=-1)
        return _ungrouped_out(jnp.einsum("bkgql,bkld->bkgqd", probs.astype(vb.dtype), vb))

    starts = jnp.arange(n) * window
    seg_blocks = seg_neighbourhood = None
    if segments is not None:
        seg_blocks, seg_neighbourhood = blocks(segments), neighbourhood(segments)
    out = jax.vmap(one_block, in_axes=(1, 1, 1, 0, 1, 1), out_axes=1)(
        blocks(q), neighbourhood(k), neighbourhood(v), starts, seg_blocks, seg_neighbourhood
    )
    return out.reshape(b, n * window, h, d)[:, :t]


def bidirectional_linear_attention(q, k, v):
    """GPT-Neo's non-causal linear attention: q softmaxed over features, k over the sequence,
    out = q . (k^T v)."""
    q = jax.nn.softmax(q.astype(jnp.float32), axis=-1)
    k = jax.nn.softmax(k.astype(jnp.float32), axis=1)
    context = jnp.einsum("bkhd,bkhe->bhde", k, v.astype(jnp.float32))
    return jnp.einsum("bqhd,bhde->bqhe", q, context).astype(v.dtype)


def causal_linear_attention(
    q, k, v, *, chunk: int = LINEAR_CHUNK, eps: float = 1e-6, segments=None, initial=None
):
    """GPT-Neo's causal linear attention without its [b, s, h, d, d] cumulative tensor.

    GPT-Neo: q = softmax(q over features), k = exp(k), C_i = sum_{j<=i} k_j (x) v_j,
    Z_i = sum_{j<=i} k_j + eps, out_i = (q_i . C_i) / (q_i . Z_i). The numerator is computed
    chunk by chunk: exact within a chunk, a [b, h, d, d] running state across chunks
    (lax.scan), so memory is O(T * d + d * d), not O(T * d * d).

    With `segments` [batch, seq] (contiguous runs) the sums run over j in i's segment: within
    a chunk the scores are masked by segment, and the state carried out of a chunk holds the
    keys of the segment still open at its end (the previous state too if that segment began
    before the chunk); a chunk's queries add it only if they belong to that segment.

    `initial` (sum of exp(k) (x) v [b, h, d, e], sum of exp(k) [b, h, d], their segment's id
    [b]) continues a sequence whose earlier tokens are elsewhere (context parallelism): the
    sums of its segment still open where this part begins.
    """
    dtype = v.dtype
    q = jax.nn.softmax(q.astype(jnp.float32), axis=-1)
    k = jnp.exp(k.astype(jnp.float32))
    v = v.astype(jnp.float32)
    b, t, h, d = q.shape
    key_sums = _segment_cumsum(k, segments)
    if segments is None:
        segments = jnp.ones((b, t), jnp.int32)
    state = jnp.zeros((b, h, d, v.shape[-1]), jnp.float32)
    open_segment = segments[:, 0]
    if initial is not None:
        state, earlier_key_sum, open_segment = initial
        continues = (segments == open_segment[:, None]).astype(jnp.float32)
        key_sums = key_sums + earlier_key_sum[:, None] * continues[:, :, None, None]
    normaliser = jnp.einsum("bthd,bthd->bth", q, key_sums + eps)[..., None]
    pad = -t % chunk
    if pad:  # trailing zeros: later positions never influence earlier ones
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, pad)), mode="edge")
    n = (t + pad) // chunk
    q, k, v = (a.reshape(b, n, chunk, h, -1).swapaxes(0, 1) for a in (q, k, v))
    segs = segments.reshape(b, n, chunk).swapaxes(0, 1)  # [n, b, chunk]
    causal = jnp.tril(jnp.ones((chunk, chunk), dtype=bool))

    def step(carry, xs):
        state, open_segment = carry  # the open segment's k (x) v sum, and its id [b]
        qc, kc, vc, sc = xs
        visible = causal[None] & (sc[:, :, None] == sc[:, None, :])  # [b, q, k]
        scores = jnp.where(visible[:, None], jnp.einsum("bqhd,bkhd->bhqk", qc, kc), 0.0)
        continues = (sc == open_segment[:, None]).astype(jnp.float32)  # [b, q]
        carried = jnp.einsum("bqhd,bhde->bqhe", qc, state) * continues[:, :, None, None]
        out = jnp.einsum("bhqk,bkhe->bqhe", scores, vc) + carried
        last = sc[:, -1]
        in_last = (sc == last[:, None]).astype(jnp.float32)  # [b, k]
        state_in = state * (last == open_segment).astype(jnp.float32)[:, None, None, None]
        state = state_in + jnp.einsum("bkhd,bkhe,bk->bhde", kc, vc, in_last)
        return (state, last), out

    _, out = jax.lax.scan(step, (state, open_segment), (q, k, v, segs))
    out = out.swapaxes(0, 1).reshape(b, n * chunk, h, -1)[:, :t]
    return (out / normaliser).astype(dtype)


def _segment_cumsum(x, segments):
    """Cumulative sum over axis 1 of x [batch, seq, ...], restarting where the segment id
    changes (segments [batch, seq], contiguous runs; None: one segment). A scan that resets,
    not a difference of running totals: another segment's values never enter, not even as
    rounding."""
    if segments is None:
        return jnp.cumsum(x, axis=1)
    begins = segment_begins(segments)
    begins = begins.reshape(*begins.shape, *(1,) * (x.ndim - 2))

    def combine(earlier, later):
        (sum_a, start_a), (sum_b, start_b) = earlier, later
        return jnp.where(start_b, sum_b, sum_a + sum_b), start_a | start_b

    return jax.lax.associative_scan(combine, (x, jnp.broadcast_to(begins, x.shape)), axis=1)[0]


def dot_product_attention(q, k, v, *, scale=1.0, window=None, implementation=None, segments=None):
    """`jax.nn.dot_product_attention` (cuDNN flash on GPU) with GPT-Neo's masking and scale.
    Segments go in as its `mask` [batch, 1, T, T] (JAX 0.10's public API has no segment ids;
    cuDNN adds the mask as a bias, so a packed step holds that [T, T] per row: fine at the
    lengths packing is used for, O(T^2) memory at long context)."""
    mask = None
    if segments is not None:
        mask = (segments[:, :, None] == segments[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        scale=scale,
        is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation,
    )


def splash_attention(
    cfg: Config, q, k, v, *, scale=1.0, window=None, interpret=None, segments=None
):
    """Pallas splash attention (TPU); `interpret=True` runs the same kernel on CPU for tests.
    Segments go in as the kernel's own `SegmentIds` (it skips blocks no segment spans). The
    kernel takes no scale: q is scaled first (in float32, then back to its dtype)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if interpret is None:
        interpret = target_platform() != "tpu"
    if scale != 1.0:
        q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    mesh = jax.sharding.get_abstract_mesh()
    spec = activation_spec(cfg, (axes.BATCH, None, axes.HEADS, None))
    heads_axes = rules(cfg).activations.get(axes.HEADS, ()) if not mesh.empty else ()
    t = q.shape[1]
    local_heads = q.shape[2] // math.prod(mesh.shape[a] for a in heads_axes)
    if window is None:
        mask = sm.CausalMask((t, t))
    else:
        mask = sm.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([mask] * local_heads), head_shards=1, q_seq_shards=1, interpret=interpret
    )

    def run(q, k, v, segments):  # [b, t, h, d] -> kernel's [h, t, d] per example
        def per_example(q, k, v, segments):
            ids = None if segments is None else sk.SegmentIds(q=segments, kv=segments)
            out = kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), segment_ids=ids)
            return typing.cast(jax.Array, out).swapaxes(0, 1)

        return jax.vmap(per_example)(q, k, v, segments)

    if mesh.empty:
        return run(q, k, v, segments)
    seg_spec = activation_spec(cfg, (axes.BATCH, None))
    specs = (spec, spec, spec, None if segments is None else seg_spec)
    return jax.shard_map(run, in_specs=specs, out_specs=spec, check_vma=False)(q, k, v, segments)
