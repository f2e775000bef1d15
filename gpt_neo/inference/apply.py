"""`gpt_neo.apply`: logits for a batch of tokens, on the mesh the parameters live on, compiled
once per config (the model itself, `gpt_neo.models.gpt.forward`, is pure: no jit, no device
placement)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.core import Tracer
from jax.sharding import Mesh, NamedSharding

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import activation_sharding, batch_axes, data_parallel_size
from gpt_neo.models.gpt import Logits, Params, Tokens, forward


def real_logits(
    cfg: Config,
    params: Params,
    tokens: Tokens,
    rng: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> Logits:
    """`forward`'s logits cut to the real vocabulary: [batch, seq, n_vocab] float32."""
    logits = forward(cfg, params, tokens, rng=rng, segment_ids=segment_ids).logits
    return logits[..., : cfg.n_vocab]


@functools.lru_cache(maxsize=64)
def _compiled_logits(cfg: Config):
    return jax.jit(functools.partial(real_logits, cfg))


def mesh_of(params) -> Mesh | None:
    """The mesh the parameters live on, or None for single-device / unsharded parameters."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
        return sharding.mesh if sharding.mesh.size > 1 else None
    return None


def apply(
    cfg: Config, params: Params, tokens, *, train: bool = False, rng=None, segment_ids=None
) -> Logits:
    """Logits [batch, seq, n_vocab] float32 for tokens [batch, seq] (int).

    Runs on the mesh the parameters were initialised on (`init_params(..., mesh=...)`).
    `train=True` applies dropout, drawn from `rng` (required then). `segment_ids` [batch,
    seq] (int) packs several documents per row: equal ids are one document (contiguous), 0 is
    padding; each document's logits are those it would have alone.
    """
    if train and rng is None:
        raise ValueError("apply(train=True) needs rng for dropout")
    rng = rng if train else None
    if isinstance(tokens, Tracer):  # inside the caller's jit
        return real_logits(cfg, params, tokens, rng, segment_ids)
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if segment_ids.shape != tokens.shape:
            raise ValueError(
                f"segment_ids {segment_ids.shape} must have the tokens' shape {tokens.shape}"
            )
    mesh = mesh_of(params)
    if mesh is None:
        return _compiled_logits(cfg)(params, tokens, rng, segment_ids)
    data_parallel = data_parallel_size(cfg, mesh)
    if tokens.shape[0] % data_parallel:
        raise ConfigError(
            f"batch size {tokens.shape[0]} is not divisible by the {data_parallel} pieces that "
            f"the layout splits 'batch' into (mesh axes {'+'.join(batch_axes(cfg))})"
        )
    with jax.set_mesh(mesh):
        tokens, segment_ids = jax.device_put(
            (tokens, segment_ids), activation_sharding(mesh, cfg, axes.TOKENS)
        )
        return _compiled_logits(cfg)(params, tokens, rng, segment_ids)
