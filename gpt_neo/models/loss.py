"""The output head and its cross-entropy, fused, in chunks: no [batch, seq, vocab] float32 logits
(except where they are small: `AUTODIFF_BYTES`).

A whole batch's float32 logits are the largest tensor of a training step (3 GiB per device for
the 125M preset at batch 32 x 2048 on 4 chips: more than the model and its optimizer state).
`head_loss` never builds them. It walks the sequence in chunks (a `lax.scan`); for each chunk
it computes the logits in float32, their log-sum-exp, the loss terms and, when differentiated,
the logits' gradient, which it immediately turns into the gradients of the hidden states and
of the head's weights. Only those are kept for the backward pass, which just scales them by the
incoming cotangent. So the head costs the same three matmuls as plain autodiff (no
recomputation) and its peak memory is one chunk's logits.

Why by hand (a `custom_vjp`) rather than `jax.checkpoint` around a chunked loss: checkpointing
recomputes each chunk's logits in the backward pass, one extra vocabulary-sized matmul per
step (+9% FLOPs at 125M). The gradient of softmax cross-entropy is closed-form, so there is
nothing to recompute.
"""

from __future__ import annotations

import functools
import math
import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gpt_neo import axes
from gpt_neo.mesh import pieces, rules
from gpt_neo.models.attention import MASK_VALUE  # also the logit of padding rows: never predicted

# Per-device bytes of one chunk's float32 logits: a few of these are live at once (logits,
# probabilities, their gradient), so the head's peak stays well under a GiB at any vocabulary.
CHUNK_BYTES = 256 * 2**20
# Per-device bytes of float32 logits up to which the loss keeps them whole for plain autodiff
# (a few copies live into the backward pass: a small share of any accelerator's memory).
AUTODIFF_BYTES = 32 * 2**20


class LossTerms(NamedTuple):
    """Sums over the counted targets, each divided by the target count."""

    total: jax.Array  # cross_entropy + z_loss: the only differentiable output
    cross_entropy: jax.Array
    z_loss: jax.Array  # z_loss * logsumexp(logits)^2
    correct: jax.Array  # argmax == target (for a masked LM's accuracy)


def logits(x: jax.Array, weights: jax.Array, bias: jax.Array | None, n_vocab: int) -> jax.Array:
    """x [..., embd] @ weights [vocab, embd]^T (+ bias): float32 logits, padding rows masked."""
    out = jnp.einsum("...e,ve->...v", x, weights, preferred_element_type=jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    if out.shape[-1] > n_vocab:
        out = jnp.where(jnp.arange(out.shape[-1]) < n_vocab, out, MASK_VALUE)
    return out


def head_loss(
    cfg,
    x: jax.Array,
    weights: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    target_weights: jax.Array,
    target_count: jax.Array,
    *,
    chunks: int | None = None,
) -> LossTerms:
    """The loss of hidden states x [batch, seq, embd] (after ln_f) through the output head
    `weights` [padded vocab, embd] (+ `bias`), against `targets` [batch, seq] weighted by
    `target_weights` (0 where a position does not count). Equal to the cross-entropy of
    `logits(...)` plus `cfg.z_loss` * logsumexp^2, summed and divided by `target_count`.
    `chunks` (default: `loss_chunks`) splits the sequence. Logits of at most
    `AUTODIFF_BYTES` per device are kept instead, and differentiated by plain autodiff: the
    faster program where they are that small (bench/step_cost.py: the fused head's own
    gradients cost a small CPU model's step 14% more)."""
    batch, seq = x.shape[:2]
    small = chunks is None and local_logit_bytes(cfg, batch, seq, weights.shape[0]) <= (
        AUTODIFF_BYTES
    )
    chunks = chunks or loss_chunks(cfg, x.shape[0], x.shape[1], weights.shape[0])
    static = _Static(cfg.n_vocab, float(cfg.z_loss), chunks, bool(cfg.mlm_training))
    scale = 1.0 / jnp.asarray(target_count, jnp.float32)
    if small:
        sums, _ = _chunk_terms(static, x, weights, bias, targets, target_weights, scale, False)
        return LossTerms(*_terms(static, sums, scale))
    terms = _fused(static, x, weights, bias, targets, target_weights, scale)
    return LossTerms(*typing.cast(tuple, terms))


def loss_chunks(cfg, batch: int, seq: int, vocab: int) -> int:
    """How many pieces to cut the sequence into so that one piece's float32 logits take at
    most `CHUNK_BYTES` per device (the fewest such pieces that divide the sequence, and whose
    length a sequence split divides, where one can)."""
    wanted = max(1, math.ceil(local_logit_bytes(cfg, batch, seq, vocab) / CHUNK_BYTES))
    mesh = jax.sharding.get_abstract_mesh()
    split = 1 if mesh.empty else pieces(dict(mesh.shape), rules(cfg).activations, axes.SEQ)
    fitting = [n for n in range(wanted, seq + 1) if seq % n == 0]
    return next((n for n in fitting if (seq // n) % split == 0), fitting[0])


def local_logit_bytes(cfg, batch: int, seq: int, vocab: int) -> float:
    """Bytes of float32 logits per device, under the mesh being traced against."""
    mesh = jax.sharding.get_abstract_mesh()
    split = 1 if mesh.empty else logits_split(cfg, dict(mesh.shape))
    return batch * seq * vocab * 4 / split


def logits_split(cfg, sizes: dict[str, int]) -> int:
    """Devices a batch's logits are spread over (batch, sequence and vocabulary splits)."""
    table = rules(cfg).activations
    return math.prod(pieces(sizes, table, dim) for dim in axes.LOGITS)


class _Static(NamedTuple):
    n_vocab: int
    z_loss: float
    chunks: int
    accuracy: bool  # count argmax == target (a masked LM reports it); else `correct` is 0


def _chunked(a: jax.Array, chunks: int) -> jax.Array:
    """[batch, seq, ...] -> [chunks, batch, seq / chunks, ...]: chunk c holds every `chunks`-th
    position from c, not a contiguous stretch. A loss is a sum over positions, so any split
    gives it; strided, each device keeps its share of every chunk where the layout splits the
    sequence (context parallelism), and all of them compute each step of the scan. Contiguous
    chunks would each lie on one device: the scan would gather every chunk to every device,
    which then computes the logits of the whole sequence."""
    b, t = a.shape[:2]
    return jnp.moveaxis(a.reshape(b, t // chunks, chunks, *a.shape[2:]), 2, 0)


def _unchunked(a: jax.Array) -> jax.Array:
    """The inverse of `_chunked`."""
    n, b, c = a.shape[:3]
    return jnp.moveaxis(a, 0, 2).reshape(b, c * n, *a.shape[3:])


def _chunk_terms(static: _Static, x, weights, bias, targets, target_weights, scale, grads: bool):
    """One chunk: the loss sums and, with `grads`, d total / d (x, weights, bias)."""
    z = logits(x, weights, bias, static.n_vocab)
    # log-sum-exp by hand, so that the softmax below reuses its exponentials: one pass of exp
    # over the logits instead of two
    top = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))  # any shift is exact
    exps = jnp.exp(z - top)
    total = jnp.sum(exps, axis=-1, keepdims=True)
    log_z = (top + jnp.log(total))[..., 0]
    target_logit = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    # Each term below is a pass over [batch, chunk, vocab] logits, the step's largest tensor:
    # the z-loss and accuracy terms are computed only where they count.
    zero = jnp.zeros((), jnp.float32)
    sums = (
        jnp.sum((log_z - target_logit) * target_weights),
        jnp.sum(jnp.square(log_z) * target_weights) if static.z_loss else zero,
        jnp.sum((jnp.argmax(z, axis=-1) == targets) * target_weights) if static.accuracy else zero,
    )
    if not grads:
        return sums, None
    # d/dz [(lse - z_t) + c * lse^2] = softmax * (1 + 2c * lse) - onehot(t), per counted target
    probs = exps * (1.0 / total)
    if static.z_loss:
        probs = probs * (1.0 + 2.0 * static.z_loss * log_z)[..., None]
    onehot = jnp.arange(z.shape[-1]) == targets[..., None]
    dz = ((probs - onehot) * (target_weights * scale)[..., None]).astype(x.dtype)
    dx = jnp.einsum("btv,ve->bte", dz, weights, preferred_element_type=jnp.float32)
    dw = jnp.einsum("btv,bte->ve", dz, x, preferred_element_type=jnp.float32)
    db = None if bias is None else jnp.sum(dz.astype(jnp.float32), axis=(0, 1))
    return sums, (dx.astype(x.dtype), dw, db)  # dw, db float32: chunks add up before rounding


def _scan_chunks(static: _Static, x, weights, bias, targets, target_weights, scale, grads):
    """Every chunk's sums (added up) and gradients (dx concatenated, dw and db added up)."""
    body = functools.partial(_chunk_terms, static, weights=weights, bias=bias, scale=scale)
    if static.chunks == 1:
        return body(x, targets=targets, target_weights=target_weights, grads=grads)

    def step(carry, chunk):
        sums, grads_so_far = carry
        x_c, t_c, w_c = chunk
        chunk_sums, chunk_grads = body(x_c, targets=t_c, target_weights=w_c, grads=grads)
        sums = jax.tree.map(jnp.add, sums, chunk_sums)
        if not grads:
            return (sums, None), None
        assert chunk_grads is not None and grads_so_far is not None
        dx, dw, db = chunk_grads
        dw_sum, db_sum = grads_so_far
        db_sum = None if db is None else db_sum + db
        return (sums, (dw_sum + dw, db_sum)), dx

    zero = jnp.zeros((), jnp.float32)
    init_grads = None
    if grads:
        init_grads = (
            jnp.zeros(weights.shape, jnp.float32),
            None if bias is None else jnp.zeros(bias.shape, jnp.float32),
        )
    xs = tuple(_chunked(a, static.chunks) for a in (x, targets, target_weights))
    # rolled: unrolled, XLA schedules the chunks' logits side by side (5x the temporaries)
    (sums, summed_grads), dx = jax.lax.scan(step, ((zero, zero, zero), init_grads), xs)
    if not grads:
        return sums, None
    assert summed_grads is not None and dx is not None
    return sums, (_unchunked(dx), *summed_grads)


def _terms(static: _Static, sums, scale):
    cross_entropy, log_z_squared, correct = (s * scale for s in sums)
    z_loss = static.z_loss * log_z_squared
    return cross_entropy + z_loss, cross_entropy, z_loss, correct


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static: _Static, x, weights, bias, targets, target_weights, scale):
    sums, _ = _scan_chunks(static, x, weights, bias, targets, target_weights, scale, grads=False)
    return _terms(static, sums, scale)


def _fused_forward(static: _Static, x, weights, bias, targets, target_weights, scale):
    sums, grads = _scan_chunks(static, x, weights, bias, targets, target_weights, scale, grads=True)
    assert grads is not None
    dx, dw, db = grads
    # kept in the parameters' dtype, as plain autodiff's cotangents would be
    db = None if db is None or bias is None else db.astype(bias.dtype)
    return _terms(static, sums, scale), (dx, dw.astype(weights.dtype), db)


def _fused_backward(static: _Static, residuals, cotangents):
    dx, dw, db = residuals
    g = cotangents[0]  # only `total` is differentiable: the other terms are metrics
    scaled = jax.tree.map(lambda d: (d * g.astype(d.dtype)).astype(d.dtype), (dx, dw, db))
    return (*scaled, None, None, None)


_fused.defvjp(_fused_forward, _fused_backward)
