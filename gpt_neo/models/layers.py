"""Building blocks: parameter declarations, the norms (LayerNorm, RMSNorm), dropout, the MLP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.mesh import constrain
from gpt_neo.models.activations import ACTIVATION_PARAMS, ACTIVATIONS


@dataclass(frozen=True)
class Init:
    """How a parameter starts: `normal` with std `scale`, `truncated_normal` (redrawn beyond
    two standard deviations, as TensorFlow's initializer) with std `scale` before truncation,
    or `constant` equal to `scale`.
    Data, not a closure, so that parameters of one shape share one compiled initializer."""

    kind: str
    scale: float


@dataclass(frozen=True)
class ParamDecl:
    """A parameter before it exists: shape, logical axis per dimension, float32 initializer.

    `padded_shape`, when given, is how it is stored: the extra rows are zeros, so that a mesh
    axis divides it (the vocabulary, see `gpt_neo.mesh.padded_vocab`)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: Init
    padded_shape: tuple[int, ...] | None = None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return self.padded_shape or self.shape


def normal(std: float) -> Init:
    return Init("normal", float(std))


def truncated_normal(std: float) -> Init:
    return Init("truncated_normal", float(std))


def constant(value: float) -> Init:
    return Init("constant", float(value))


zeros = constant(0.0)
ones = constant(1.0)


def norm_decls(cfg: Config) -> dict[str, ParamDecl]:
    """The `norm`'s parameters (ln_f, and the blocks' norms by default): a scale, and a bias
    for a LayerNorm with `bias`."""
    decls = {"scale": ParamDecl((cfg.n_embd,), axes.NORM, ones)}
    if cfg.norm == "layernorm" and cfg.bias:
        decls["bias"] = ParamDecl((cfg.n_embd,), axes.NORM, zeros)
    return decls


def pre_norm_decls(cfg: Config) -> dict[str, ParamDecl] | None:
    """The norm before a block's attention or MLP: a LayerNorm, GPT-Neo's `scalenorm` (one
    scalar gain), or none at all with `rezero`."""
    if cfg.rezero:
        return None
    if cfg.scalenorm:
        return {"scale": ParamDecl((), axes.SCALAR, ones)}
    return norm_decls(cfg)


def pre_norm(cfg: Config, p: dict | None, x: jax.Array) -> jax.Array:
    if cfg.rezero:
        return x
    assert p is not None  # every norm but rezero's has parameters
    if cfg.scalenorm:  # GPT-Neo's scale_norm(): its norm() times a scalar, no bias
        return layer_norm(x, {"scale": p["scale"]}, cfg.norm_eps)
    return norm(cfg, p, x)


def norm(cfg: Config, p: dict, x: jax.Array) -> jax.Array:
    """The configured `norm` of the residual stream x over its last axis (ln_f, and the
    blocks' by default)."""
    if cfg.norm == "rmsnorm":
        return rms_norm(x, p["scale"], cfg.norm_eps)
    return layer_norm(x, p, cfg.norm_eps)


def layer_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32 whatever the activation dtype; `p`
    holds a scale and, unless `bias` is off, a bias."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
    y = y * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) in float32, back to x's dtype,
    then times `scale` (the order Llama and Qwen use, which matters under bfloat16)."""
    x32 = x.astype(jnp.float32)
    y = (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)).astype(x.dtype)
    return y * scale.astype(x.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; a no-op when rate is 0 or there is no rng (evaluation)."""
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def mlp_decls(cfg: Config) -> dict:
    """GPT-Neo's `linear()` init: N(0, 0.02), times 1/sqrt(n_layer) on the output projection
    with `scale_by_depth`, times 1/sqrt(fan_in) on both with `scale_by_in`."""
    d, m = cfg.n_embd, cfg.d_mlp
    fc_std = proj_std = 0.02
    if cfg.scale_by_depth:
        proj_std /= cfg.n_layer**0.5
    if cfg.scale_by_in:
        fc_std /= d**0.5
        proj_std /= m**0.5
    decls: dict[str, Any] = {
        "fc_kernel": ParamDecl((d, m), axes.MLP_IN, normal(fc_std)),
        "proj_kernel": ParamDecl((m, d), axes.MLP_OUT, normal(proj_std)),
    }
    if cfg.mlp_glu:  # GPT-Neo's 8d-wide c_fc, split: its second half is the gate
        decls["gate_kernel"] = ParamDecl((d, m), axes.MLP_IN, normal(fc_std))
    if cfg.bias:
        decls["fc_bias"] = ParamDecl((m,), axes.MLP_IN_BIAS, zeros)
        decls["proj_bias"] = ParamDecl((d,), axes.MLP_OUT_BIAS, zeros)
        if cfg.mlp_glu:
            decls["gate_bias"] = ParamDecl((m,), axes.MLP_IN_BIAS, zeros)
    learnable = ACTIVATION_PARAMS.get(cfg.activation_function)
    if learnable:
        decls["act"] = {
            name: ParamDecl((), axes.SCALAR, constant(v)) for name, v in learnable.items()
        }
    return decls


def mlp(cfg: Config, p: dict, x: jax.Array) -> jax.Array:
    """[batch, seq, embd] -> [batch, seq, embd] through the `intermediate_size` hidden layer;
    with `mlp_glu` the activation gates the hidden layer: act(x W_gate) * (x W_fc), which with
    silu is Llama's down(silu(gate(x)) * up(x)). Biases unless `bias` is off."""
    h = constrain(_linear(x, p, "fc"), cfg, axes.MLP_HIDDEN)
    activation = ACTIVATIONS[cfg.activation_function]
    if cfg.mlp_glu:
        gate = constrain(_linear(x, p, "gate"), cfg, axes.MLP_HIDDEN)
        h = h * activation(gate, p.get("act", {}))
    else:
        h = activation(h, p.get("act", {}))
    return _linear(h, p, "proj")


def _linear(x: jax.Array, p: dict, name: str) -> jax.Array:
    """x [..., in] times `p[name_kernel]` [in, out], plus `p[name_bias]` where the model has
    biases; as one 2-D matmul, XLA:CPU's fast path (a 3-D einsum is 35% slower there, measured
    on the MLP of bench/hf_families.py; the same on TPU and GPU)."""
    kernel = p[f"{name}_kernel"]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel).reshape(*x.shape[:-1], kernel.shape[-1])
    return y + p[f"{name}_bias"] if f"{name}_bias" in p else y
