"""Where a token is: learned (`wpe`), axial (`axial_pos_emb`) and rotary (`rotary_emb`) positions.

Learned and axial embeddings are added to the token embedding once; rotary turns each query and
key of every attention layer by an angle proportional to its position, so q.k depends on the
distance between them only. There is no position embedding with rotary (as in GPT-Neo).

Rotary follows GPT-Neo and GPT-NeoX (rotate-half): dimension i < r/2 of a head's first r rotary
dimensions pairs with dimension i + r/2 and turns by position * base^(-2i/r); with `rotary_pct`
< 1 the remaining head dimensions pass through unchanged. Positions and angles are float32
whatever the compute precision: GPT-Neo built them in the master dtype, so under bfloat16 it
rounded positions (257 -> 256, 2047 -> 2048; 641 distinct values in 0..2047).

`rope_scaling` changes the frequencies (and, for YaRN, the size of cos and sin) exactly as
transformers computes them (`gpt_neo.config.rope` says what each type does): the frequencies
are float32 NumPy constants built in the same order of operations as transformers', so that an
imported Llama 3 or Qwen model sees the angles it was trained with.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gpt_neo import axes
from gpt_neo.config import Config, rotary_dims
from gpt_neo.models.layers import ParamDecl, normal

AXIAL_TABLE = (None, axes.EMBD)  # d1 or d2 rows: not the n_ctx-long `pos` axis


def position_decls(cfg: Config) -> dict[str, ParamDecl]:
    """`wpe` [n_ctx, embd], or the two axial tables, or nothing with rotary. N(0, 0.01) as
    GPT-Neo initialises every position table."""
    if cfg.rotary_emb:
        return {}
    if cfg.axial_pos_emb is not None:
        d1, d2 = cfg.axial_pos_emb
        return {
            "axial_wpe_1": ParamDecl((d1, cfg.n_embd), AXIAL_TABLE, normal(0.01)),
            "axial_wpe_2": ParamDecl((d2, cfg.n_embd), AXIAL_TABLE, normal(0.01)),
        }
    return {"wpe": ParamDecl((cfg.n_ctx, cfg.n_embd), axes.POSITION_EMBEDDING, normal(0.01))}


def position_embedding(
    cfg: Config, p: dict, positions: jax.Array | None, length: int
) -> jax.Array | float:
    """What is added to the token embeddings at `positions` [batch, seq] (None: 0..length-1);
    0 with rotary."""
    if cfg.rotary_emb:
        return 0.0
    if positions is None:
        if "wpe" in p:
            return p["wpe"][:length]
        positions = jnp.arange(length)
    if cfg.axial_pos_emb is not None:
        # GPT-Neo broadcasts the tables to [d1, d2, embd] and flattens: row p = (i, j) = divmod(p, d2)
        d2 = cfg.axial_pos_emb[1]
        first = jnp.take(p["axial_wpe_1"], positions // d2, axis=0)
        second = jnp.take(p["axial_wpe_2"], positions % d2, axis=0)
        return (first + second) / 2
    return jnp.take(p["wpe"], positions, axis=0)


def segment_begins(segments: jax.Array) -> jax.Array:
    """[batch, seq] bool: where a segment (a contiguous run of one id) begins."""
    first = jnp.ones_like(segments[:, :1], bool)
    return jnp.concatenate([first, segments[:, 1:] != segments[:, :-1]], axis=1)


def segment_starts(segments: jax.Array) -> jax.Array:
    """[batch, seq]: the index where each token's segment begins."""
    index = jnp.arange(segments.shape[1])
    return jax.lax.cummax(jnp.where(segment_begins(segments), index, 0), axis=1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[batch, seq]: each token's position within its segment (contiguous runs of one id), so
    a packed document sees the positions it would alone."""
    return jnp.arange(segment_ids.shape[1])[None, :] - segment_starts(segment_ids)


def rotate(cfg: Config, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary on x [batch, seq, heads, head_dim] at positions [batch, seq] (float32 angles)."""
    r = rotary_dims(cfg)
    inverse_frequency, magnitude = inverse_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequency  # [b, t, r/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, t, 1, r]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if magnitude != 1.0:  # YaRN's attention factor
        cos, sin = cos * magnitude, sin * magnitude
    turned, passed = x[..., :r].astype(jnp.float32), x[..., r:]
    first, second = jnp.split(turned, 2, axis=-1)
    half_turn = jnp.concatenate([-second, first], axis=-1)
    turned = turned * cos + half_turn * sin
    return jnp.concatenate([turned.astype(x.dtype), passed], axis=-1)


def inverse_frequencies(cfg: Config) -> tuple[np.ndarray, float]:
    """(each rotary dimension pair's angle per position [rotary dims / 2] float32, the factor
    cos and sin are multiplied by), with `rope_scaling` applied."""
    r = rotary_dims(cfg)
    base = cfg.rotary_emb_base
    exponents = np.arange(0, r, 2).astype(np.float32) / np.float32(r)
    plain = (1.0 / np.power(np.float32(base), exponents)).astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return plain, 1.0
    factor = scaling.factor
    if scaling.rope_type == "linear":
        return (plain / np.float32(factor)).astype(np.float32), 1.0
    original = scaling.original_max_position_embeddings
    assert original is not None  # config.rope requires it for llama3 and yarn
    if scaling.rope_type == "llama3":
        low, high = scaling.low_freq_factor, scaling.high_freq_factor
        wavelength = (2 * math.pi / plain).astype(np.float32)
        scaled = np.where(wavelength > original / low, plain / np.float32(factor), plain)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = ~(wavelength < original / high) & ~(wavelength > original / low)
        return np.where(medium, blended, scaled).astype(np.float32), 1.0
    return _yarn(scaling, r, base, factor, original)


def _yarn(scaling, r: int, base: float, factor: float, original: int) -> tuple[np.ndarray, float]:
    """YaRN: a linear ramp over dimension pairs from extrapolated (plain) frequencies, for
    those that turn more than `beta_fast` times over the original context, to interpolated
    ones (divided by factor), for those that turn fewer than `beta_slow` times."""

    def pair_turning(turns: float) -> float:  # the dimension that turns `turns` times
        return (r * math.log(original / (turns * 2 * math.pi))) / (2 * math.log(base))

    low, high = pair_turning(scaling.beta_fast), pair_turning(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r - 1)
    if low == high:
        high += 0.001  # as transformers does: no division by zero
    ramp = np.clip((np.arange(r // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolated_share = (1 - ramp).astype(np.float32)
    powers = np.power(np.float32(base), np.arange(0, r, 2).astype(np.float32) / np.float32(r))
    extrapolated = (1.0 / powers).astype(np.float32)
    interpolated = (1.0 / (np.float32(factor) * powers)).astype(np.float32)
    frequencies = interpolated * (1 - extrapolated_share) + extrapolated * extrapolated_share
    magnitude = scaling.attention_factor
    if magnitude is None:
        if scaling.mscale and scaling.mscale_all_dim:
            magnitude = _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(
                factor, scaling.mscale_all_dim
            )
        else:
            magnitude = _yarn_mscale(factor)
    return frequencies.astype(np.float32), float(magnitude)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0
