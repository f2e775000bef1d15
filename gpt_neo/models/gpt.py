"""GPT-Neo: token + learned position embeddings -> pre-LayerNorm blocks -> ln_f -> tied head.

Parameters are a plain nested dict of float32 arrays:

    wte [vocab, embd]      wpe [pos, embd]      ln_f {scale, bias}
    blocks[i]: ln_1 {scale, bias}, attn {q, k, v [embd, heads, kv], o [heads, kv, embd], o_bias}
               ln_2 {scale, bias}, mlp {fc_kernel, fc_bias, proj_kernel, proj_bias[, act]}

A `none` layer (GPT-Neo's PAR configs) has no ln_1/attn: it is feed-forward only.
"""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from gpt_neo.config import Config, ConfigError
from gpt_neo.mesh import constrain, layout_rules, logical_spec, make_mesh, named_sharding
from gpt_neo.models import attention as attn_lib
from gpt_neo.models.layers import ParamDecl, layer_norm, mlp, mlp_decls, norm_decls, normal
from gpt_neo.models.layers import dropout as dropout_fn

HIDDEN_AXES = ("batch", "seq", "embd")
TOKEN_AXES = ("batch", "seq")
LOGIT_AXES = ("batch", "seq", "vocab")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param_decls(cfg: Config) -> dict:
    """The parameter tree, undeclared values: shapes, logical axes and initializers."""
    blocks = []
    for kind in cfg.attention_types:
        block = {}
        if kind != "none":
            block["ln_1"] = norm_decls(cfg)
            block["attn"] = attn_lib.param_decls(cfg)
        block["ln_2"] = norm_decls(cfg)
        block["mlp"] = mlp_decls(cfg)
        blocks.append(block)
    return {
        "wte": ParamDecl((cfg.n_vocab, cfg.n_embd), ("vocab", "embd"), normal(0.02)),
        "wpe": ParamDecl((cfg.n_ctx, cfg.n_embd), ("pos", "embd"), normal(0.01)),
        "blocks": blocks,
        "ln_f": norm_decls(cfg),
    }


def param_decl_leaves(cfg: Config):
    return jax.tree_util.tree_flatten_with_path(
        param_decls(cfg), is_leaf=lambda x: isinstance(x, ParamDecl)
    )


def param_path(path) -> str:
    """'blocks/3/attn/q' for a tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def tensor_axes(cfg: Config) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of every parameter kind and every constrained activation (layout checks)."""
    axes = {}
    for path, decl in param_decl_leaves(cfg)[0]:
        name = param_path(path)
        if name.startswith("blocks/"):
            name = "blocks/*/" + name.split("/", 2)[2]
        axes[f"parameter {name}"] = decl.axes
    axes |= {
        "activation hidden": HIDDEN_AXES,
        "activation q": attn_lib.Q_AXES,
        "activation k/v": attn_lib.KV_AXES,
        "activation mlp": ("batch", "seq", "mlp"),
        "activation logits": LOGIT_AXES,
    }
    return axes


def param_shardings(cfg: Config, mesh: Mesh):
    """NamedSharding per parameter, from the layout."""
    decls = param_decls(cfg)
    return jax.tree.map(
        lambda d: named_sharding(mesh, cfg, d.axes),
        decls,
        is_leaf=lambda x: isinstance(x, ParamDecl),
    )


def init_params(cfg: Config, seed: int = 0, mesh: Mesh | None = None) -> dict:
    """Initialise parameters (float32), directly sharded over `mesh` per the layout.

    Each parameter's key is the seed's key folded with a hash of its path, so values do not
    depend on the mesh, the layout, or which other parameters exist. Nothing is materialised
    whole on one device: each parameter is produced by a jitted initializer with output
    sharding, compiled once per distinct (shape, sharding) and shared by every layer.
    """
    leaves, treedef = param_decl_leaves(cfg)
    root = jax.random.key(seed)
    values = []
    for path, decl in leaves:
        sharding = None if mesh is None else named_sharding(mesh, cfg, decl.axes)
        make = _initializer(decl.init.kind, decl.shape, sharding)
        salt = np.uint32(zlib.crc32(param_path(path).encode()))
        values.append(make(root, salt, np.float32(decl.init.scale)))
    return jax.tree.unflatten(treedef, values)


@functools.lru_cache(maxsize=256)
def _initializer(kind: str, shape: tuple[int, ...], sharding: NamedSharding | None):
    def make(root, salt, scale):
        if kind == "constant":
            return jnp.full(shape, scale, jnp.float32)
        return scale * jax.random.normal(jax.random.fold_in(root, salt), shape, jnp.float32)

    return jax.jit(make, out_shardings=sharding)


def forward(cfg: Config, params: dict, tokens: jax.Array, rng: jax.Array | None = None):
    """Logits [batch, seq, vocab] float32 for int tokens [batch, seq]. Pure; trace under
    `jax.set_mesh(mesh)` for sharded activations. `rng` enables dropout (training)."""
    _, t = tokens.shape
    if t > cfg.n_ctx:
        raise ValueError(f"sequence length {t} exceeds n_ctx {cfg.n_ctx}")
    dtype = COMPUTE_DTYPES[cfg.precision]
    p = jax.tree.map(lambda a: a.astype(dtype), params)  # float32 master -> compute dtype
    rngs = (
        [None] * (cfg.n_layer + 1) if rng is None else list(jax.random.split(rng, cfg.n_layer + 1))
    )

    x = embed(cfg, p, tokens, p["wpe"][:t])
    x = constrain(dropout_fn(x, cfg.embed_dropout, rngs[-1]), cfg, HIDDEN_AXES)
    for kind, block_params, block_rng in zip(cfg.attention_types, p["blocks"], rngs, strict=False):
        block_fn = functools.partial(block, cfg, kind)
        if cfg.recompute_grad:
            block_fn = jax.checkpoint(block_fn)
        x = block_fn(block_params, x, block_rng)
    return head(cfg, p, x)


def embed(cfg: Config, p: dict, tokens: jax.Array, position_embeddings: jax.Array) -> jax.Array:
    tokens = constrain(tokens, cfg, TOKEN_AXES)
    return jnp.take(p["wte"], tokens, axis=0) + position_embeddings


def head(cfg: Config, p: dict, x: jax.Array) -> jax.Array:
    """ln_f, then the output projection tied to wte: float32 logits."""
    x = layer_norm(x, p["ln_f"])
    logits = jnp.einsum("bte,ve->btv", x, p["wte"], preferred_element_type=jnp.float32)
    return constrain(logits, cfg, LOGIT_AXES)


def forward_with_cache(cfg: Config, params: dict, tokens, positions, cache, slots, key_valid):
    """`forward` for decoding: tokens [batch, new] at `positions` [batch, new] (position
    embedding rows) and cache `slots` [new]; attends to earlier cached keys. Returns (logits,
    updated cache). `cache` is a per-layer list of {"k", "v"} (None for `none` layers)."""
    dtype = COMPUTE_DTYPES[cfg.precision]
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    x = constrain(embed(cfg, p, tokens, jnp.take(p["wpe"], positions, axis=0)), cfg, HIDDEN_AXES)
    new_cache = []
    for kind, bp, layer_cache in zip(cfg.attention_types, p["blocks"], cache, strict=True):
        if kind != "none":
            h, layer_cache = attn_lib.attention_with_cache(
                cfg, kind, bp["attn"], layer_norm(x, bp["ln_1"]), layer_cache, slots, key_valid
            )
            x = constrain(x + h, cfg, HIDDEN_AXES)
        x = constrain(x + mlp(cfg, bp["mlp"], layer_norm(x, bp["ln_2"])), cfg, HIDDEN_AXES)
        new_cache.append(layer_cache)
    return head(cfg, p, x), new_cache


def block(cfg: Config, kind: str, p: dict, x: jax.Array, rng: jax.Array | None) -> jax.Array:
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); each branch followed by residual dropout."""
    attn_rng = res_rng = mlp_rng = None
    if rng is not None:
        attn_rng, res_rng, mlp_rng = jax.random.split(rng, 3)
    if kind != "none":
        h = attn_lib.attention(cfg, kind, p["attn"], layer_norm(x, p["ln_1"]), attn_rng)
        x = constrain(x + dropout_fn(h, cfg.res_dropout, res_rng), cfg, HIDDEN_AXES)
    h = mlp(cfg, p["mlp"], layer_norm(x, p["ln_2"]))
    return constrain(x + dropout_fn(h, cfg.res_dropout, mlp_rng), cfg, HIDDEN_AXES)


def param_count(cfg: Config, *, include_position_embedding: bool = True) -> int:
    leaves = param_decl_leaves(cfg)[0]
    total = sum(math.prod(decl.shape) for _, decl in leaves)
    return total if include_position_embedding else total - cfg.n_ctx * cfg.n_embd


# FLOP conventions per token for training (forward + backward), as MFU reports name them.
# N counts every parameter that takes part in a matmul: all but the position embedding (a
# lookup); the token embedding counts because the tied output head multiplies by it.
FLOP_CONVENTIONS = {
    "6N+12LHQT": "PaLM appendix B: every attention layer scores all T keys",
    "6N+6LHQT (causal)": "causal attention computes half the score matrix",
}


def flops_per_token(cfg: Config, convention: str = "6N+12LHQT") -> float:
    """Training FLOPs per token. L counts layers with attention (not `none` layers), H heads,
    Q head dim, T = n_ctx. Local layers are counted like global ones in both conventions."""
    n = param_count(cfg, include_position_embedding=False)
    layers = sum(kind != "none" for kind in cfg.attention_types)
    attention = layers * cfg.n_head * cfg.head_dim * cfg.n_ctx
    if convention == "6N+12LHQT":
        return 6 * n + 12 * attention
    if convention == "6N+6LHQT (causal)":
        return 6 * n + 6 * attention
    raise ValueError(
        f"unknown FLOP convention {convention!r}; known: {', '.join(FLOP_CONVENTIONS)}"
    )


@functools.lru_cache(maxsize=64)
def _compiled_forward(cfg: Config, with_rng: bool):
    if with_rng:
        return jax.jit(lambda params, tokens, rng: forward(cfg, params, tokens, rng))
    return jax.jit(lambda params, tokens: forward(cfg, params, tokens))


def mesh_of(params) -> Mesh | None:
    """The mesh the parameters live on, or None for single-device / unsharded parameters."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
        return sharding.mesh
    return None


def apply(cfg: Config, params: dict, tokens, *, train: bool = False, rng=None) -> jax.Array:
    """Logits [batch, seq, vocab] float32 for tokens [batch, seq] (int).

    Runs on the mesh the parameters were initialised on (`init_params(..., mesh=...)`).
    `train=True` applies dropout, drawn from `rng` (required then).
    """
    if train and rng is None:
        raise ValueError("apply(train=True) needs rng for dropout")
    if isinstance(tokens, jax.core.Tracer):  # inside the caller's jit
        return forward(cfg, params, tokens, rng if train else None)
    tokens = jnp.asarray(tokens, jnp.int32)
    extra = (rng,) if train else ()
    mesh = mesh_of(params)
    if mesh is None:
        return _compiled_forward(cfg, train)(params, tokens, *extra)
    batch_axis = layout_rules(cfg).get("batch")
    if batch_axis and tokens.shape[0] % mesh.shape[batch_axis]:
        raise ConfigError(
            f"batch size {tokens.shape[0]} is not divisible by mesh axis '{batch_axis}' "
            f"(size {mesh.shape[batch_axis]}) that the layout splits 'batch' over"
        )
    with jax.set_mesh(mesh):
        tokens = jax.device_put(tokens, NamedSharding(mesh, logical_spec(cfg, TOKEN_AXES)))
        return _compiled_forward(cfg, train)(params, tokens, *extra)


__all__ = [
    "apply",
    "flops_per_token",
    "forward",
    "init_params",
    "make_mesh",
    "param_count",
    "param_decls",
]
