"""Where a token is: learned (`wpe`), axial (`axial_pos_emb`) and rotary (`rotary_emb`) positions.

Learned and axial embeddings are added to the token embedding once; rotary turns each query and
key of every attention layer by an angle proportional to its position, so q.k depends on the
distance between them only. There is no position embedding with rotary (as in GPT-Neo).

Rotary follows GPT-Neo and GPT-NeoX (rotate-half): dimension i < r/2 of a head's first r rotary
dimensions pairs with dimension i + r/2 and turns by position * base^(-2i/r); with `rotary_pct`
< 1 the remaining head dimensions pass through unchanged. Positions and angles are float32
whatever the compute precision: GPT-Neo built them in the master dtype, so under bfloat16 it
rounded positions (257 -> 256, 2047 -> 2048; 641 distinct values in 0..2047).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
    inverse_frequency = cfg.rotary_emb_base ** (-jnp.arange(0, r, 2, dtype=jnp.float32) / r)
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequency  # [b, t, r/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, t, 1, r]
    turned, passed = x[..., :r].astype(jnp.float32), x[..., r:]
    first, second = jnp.split(turned, 2, axis=-1)
    half_turn = jnp.concatenate([-second, first], axis=-1)
    turned = turned * jnp.cos(angles) + half_turn * jnp.sin(angles)
    return jnp.concatenate([turned.astype(x.dtype), passed], axis=-1)
