"""The Pallas splash kernel on one block of context-parallel attention (TPU).

Context-parallel softmax attention (`gpt_neo.models.context`) walks the key chunks of a
sequence and merges each block's online-softmax statistics. On TPU the block itself can be
the splash kernel rather than XLA einsums: no [queries, keys] scores in HBM, and the kernel
skips the masked tiles of a causal block. Two calls, one per direction:

- `block_stats`: the kernel's forward pass with its log-sum-exp (`save_residuals`), as the
  statistics `context._merge` combines: (lse, 1, normalised output), since a block's
  sum of exp(score - lse) is 1.
- `block_grads`: the kernel's backward pass fed the *merged* output and log-sum-exp of the
  whole walk instead of the block's own: the gradients of a block are exp(score - LSE) and
  sum(d_out * out) of the full attention, so given those the kernel's backward pass returns
  this block's exact share of dq, dk and dv, which the walk sums as it does the XLA ones.

The backward entry is `splash_attention_kernel._splash_attention_bwd`, private to JAX (the
public kernel differentiates only with its own log-sum-exp). `supported()` checks its
signature, so a JAX whose kernel changed falls back to the XLA blocks under
`attention_kernel: auto`; `tests/models/test_context_parallel.py` runs both directions in
interpret mode against the XLA blocks.

Only the masks the load-balanced walk needs exist here: a causal block whose queries end
where its keys end (the diagonal of a device's own chunks), and a full block (every other
visible one). Segment ids (packing) go to the kernel as its `SegmentIds`.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

# The arguments of `_splash_attention_bwd` this module passes, in order (checked by
# `supported`): (save_residuals, mask_value, is_mqa, block_sizes, residual_checkpoint_name,
# mask_function, attn_logits_soft_cap, interpret, res, do).
_BACKWARD_ARGS = (
    "save_residuals",
    "mask_value",
    "is_mqa",
    "block_sizes",
    "residual_checkpoint_name",
    "mask_function",
    "attn_logits_soft_cap",
    "interpret",
    "res",
    "do",
)


def _kernel_module():
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel

    return splash_attention_kernel


@functools.cache
def supported() -> bool:
    """Whether this JAX's splash kernel has the backward entry and residual layout used here."""
    try:
        sk = _kernel_module()
        backward = inspect.signature(sk._splash_attention_bwd).parameters
        forward = inspect.signature(sk._splash_attention_forward).parameters
    except (ImportError, AttributeError):
        return False
    return tuple(backward) == _BACKWARD_ARGS and "sinks" in forward


def _kernel(groups: int, queries: int, keys: int, causal: bool, interpret: bool):
    """A multi-query splash kernel (one key/value head for `groups` query heads) over a
    [queries, keys] block: causal with the last query seeing the last key, or full. Not
    cached: its block tables become constants of the program being traced (a few KiB)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (queries, keys)
    mask = sm.CausalMask(shape, offset=keys - queries) if causal else sm.FullMask(shape)
    return _kernel_module().make_splash_mqa(
        sm.MultiHeadMask([mask] * groups),
        head_shards=1,
        q_seq_shards=1,
        save_residuals=True,
        interpret=interpret,
    )


def _scaled(q, scale: float):
    """The kernel takes no score scale: q is scaled first (in float32, back to its dtype)."""
    return q if scale == 1.0 else (q.astype(jnp.float32) * scale).astype(q.dtype)


def block_stats(qg, kg, vg, q_seg, k_seg, *, causal: bool, scale: float, interpret: bool):
    """Online-softmax statistics of queries qg [b, kv, g, q, d] over keys and values
    [b, kv, l, d] with segments [b, q], [b, l]: (log-sum-exp, 1, normalised output), float32.
    A row that sees no key gets the kernel's mask value as its log-sum-exp, which weighs
    nothing once merged with a block it does see."""
    kernel = _kernel(qg.shape[2], qg.shape[3], kg.shape[2], causal, interpret)
    ids = _kernel_module().SegmentIds

    def one_head(q, k, v, q_seg, k_seg):  # q [g, q, d], k, v [l, d]
        out, (lse,) = kernel(q, k, v, segment_ids=ids(q=q_seg, kv=k_seg))
        return out, lse

    per_row = jax.vmap(one_head, in_axes=(0, 0, 0, None, None))
    out, lse = jax.vmap(per_row)(_scaled(qg, scale), kg, vg, q_seg, k_seg)
    return lse, jnp.ones_like(lse), out.astype(jnp.float32)


def block_grads(
    qg, dog, out, lse, kg, vg, q_seg, k_seg, *, causal: bool, scale: float, interpret: bool
):
    """(dq, dk, dv), float32, of a block of queries against a block of keys, from the merged
    output `out` [b, kv, g, q, d] and log-sum-exp `lse` [b, kv, g, q] of the whole attention
    and its cotangent `dog` (see the module docstring)."""
    sk = _kernel_module()
    kernel = _kernel(qg.shape[2], qg.shape[3], kg.shape[2], causal, interpret)
    options = kernel.kwargs

    def one_head(q, do, o, lse, k, v, q_seg, k_seg):
        residuals = (
            q,
            k,
            v,
            sk.SegmentIds(q=q_seg, kv=k_seg),
            None,  # attention sinks
            o,
            lse,
            kernel.dq_mask_info,
            kernel.dkv_mask_info,
        )
        grads = sk._splash_attention_bwd(
            False,
            options["mask_value"],
            options["is_mqa"],
            options["block_sizes"],
            None,
            options["mask_function"],
            options["attn_logits_soft_cap"],
            options["interpret"],
            residuals,
            do,
        )
        return grads[3:6]  # q, k, v

    per_row = jax.vmap(one_head, in_axes=(0, 0, 0, 0, 0, 0, None, None))
    dq, dk, dv = jax.vmap(per_row)(
        _scaled(qg, scale), dog, out.astype(qg.dtype), lse, kg, vg, q_seg, k_seg
    )
    f32 = jnp.float32
    return dq.astype(f32) * scale, dk.astype(f32), dv.astype(f32)
