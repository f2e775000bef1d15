"""GPT-Neo: token + learned position embeddings -> pre-LayerNorm blocks -> ln_f -> tied head.

Parameters are a plain nested dict of float32 arrays:

    wte [vocab, embd]      wpe [pos, embd]      ln_f {scale, bias}
    (wte is stored with zero rows past n_vocab when its mesh axes need it: mesh.padded_vocab)
    blocks[i]: ln_1 {scale, bias}, attn {q [embd, heads, kv], k, v [embd, kv_heads, kv],
               o [heads, kv, embd], o_bias}, ln_2 {scale, bias},
               mlp {fc_kernel, fc_bias, proj_kernel, proj_bias[, act]}

GPT-Neo's options change that tree (each documented on its `Config` field):
- positions: `axial_wpe_1`/`axial_wpe_2` instead of wpe (`axial_pos_emb`), none (`rotary_emb`);
- `no_weight_tie`: head {kernel [vocab, embd][, bias]}; `gpt_neo_untied_head` drops ln_f;
- block norms: ln_1/ln_2 {scale []} (`scalenorm`), none but rezero {attn, mlp} (`rezero`);
- the families of today (Llama, Mistral, Qwen): `norm` rmsnorm and `bias` false leave every
  norm a {scale} and drop o_bias and the MLP biases; `qkv_bias` adds attn {q_bias, k_bias,
  v_bias}, `qk_norm` attn {q_norm, k_norm} {scale [kv]}; `n_kv_head` sets kv_heads;
- `mlp_glu`: mlp {gate_kernel, gate_bias} too; `macaron`: an mlp_macaron per block;
- `num_mem_kv`: attn {mem_k, mem_v [slots, heads, kv]} in global layers;
- `share_parameters`: `blocks` holds one block that every layer uses;
- MoE layers hold `moe` instead of `mlp`;
- layers that repeat a pattern are stored as `stacks` instead of `blocks`, one per position
  of the pattern with a leading layers axis, and run by `lax.scan` (`gpt_neo.models.stack`).

A `none` layer (GPT-Neo's PAR configs) has no ln_1/attn: it is feed-forward only (and with
`gpt_neo_none_layers` it first doubles the residual stream, as GPT-Neo did).
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from gpt_neo import axes
from gpt_neo.config import Config
from gpt_neo.mesh import (
    constrain,
    padded_vocab,
    param_sharding,
)
from gpt_neo.models import attention as attn_lib
from gpt_neo.models import context
from gpt_neo.models import loss as loss_lib
from gpt_neo.models import moe as moe_lib
from gpt_neo.models import stack as stack_lib
from gpt_neo.models.blocks import COMPUTE_DTYPES, DecodeCache, Params, run_blocks
from gpt_neo.models.layers import (
    ParamDecl,
    mlp_decls,
    norm,
    norm_decls,
    normal,
    pre_norm_decls,
    zeros,
)
from gpt_neo.models.layers import dropout as dropout_fn
from gpt_neo.models.positions import position_decls, position_embedding, segment_positions

# What the model's signatures pass around (Params: the parameter tree described above).
Tokens = jax.Array  # int32 [batch, seq]
Logits = jax.Array  # float32 [batch, seq, vocab]


def param_decls(cfg: Config) -> dict:
    """The parameter tree as stored (stacked where the layers are scanned), undeclared values:
    shapes, logical axes and initializers."""
    return stack_lib.stacked(cfg, layer_decls(cfg))


def layer_decls(cfg: Config) -> dict:
    """`param_decls` with one block per layer, whatever the stored layout."""
    if cfg.share_parameters:  # one block for all layers (config refuses MoE with it)
        blocks = [block_decls(cfg, cfg.attention_types, moe=False)]
    else:
        blocks = [
            block_decls(cfg, (kind,), moe=index in cfg.moe_layers)
            for index, kind in enumerate(cfg.attention_types)
        ]
    decls: dict[str, Any] = {
        "wte": vocab_decl(cfg, (cfg.n_embd,), normal(0.02)),
        **position_decls(cfg),
    }
    decls["blocks"] = blocks
    if not cfg.gpt_neo_untied_head:
        decls["ln_f"] = norm_decls(cfg)
    if cfg.no_weight_tie:
        decls["head"] = head_decls(cfg)
    return decls


def vocab_decl(cfg: Config, trailing: tuple[int, ...], init) -> ParamDecl:
    """A parameter with one row per token, stored padded when its mesh axes need it."""
    shape = (cfg.n_vocab, *trailing)
    padded = (padded_vocab(cfg), *trailing) if padded_vocab(cfg) != cfg.n_vocab else None
    logical = axes.TOKEN_EMBEDDING if trailing else (axes.VOCAB,)
    return ParamDecl(shape, logical, init, padded)


def head_decls(cfg: Config) -> dict[str, ParamDecl]:
    """`no_weight_tie`'s output head, laid out like wte: GPT-Neo's `linear()` init."""
    std = 0.02 / cfg.n_embd**0.5 if cfg.scale_by_in else 0.02
    decls = {"kernel": vocab_decl(cfg, (cfg.n_embd,), normal(std))}
    if cfg.gpt_neo_untied_head:
        decls["bias"] = vocab_decl(cfg, (), zeros)
    return decls


def block_decls(cfg: Config, kinds: tuple[str, ...], *, moe: bool) -> dict:
    """One block's parameters, for a layer of the given kind (or, shared, of all of them)."""
    block = {}
    attending = [kind for kind in kinds if kind != "none"]
    if attending:
        if (norm := pre_norm_decls(cfg)) is not None:
            block["ln_1"] = norm
        block["attn"] = attn_lib.param_decls(cfg, "global" if "global" in kinds else attending[0])
    if (norm := pre_norm_decls(cfg)) is not None:
        block["ln_2"] = norm
    if cfg.rezero:
        gated = ["mlp"]
        if attending or cfg.gpt_neo_none_layers:
            gated.insert(0, "attn")
        block["rezero"] = {name: ParamDecl((), axes.SCALAR, zeros) for name in gated}
    if cfg.macaron:
        block["mlp_macaron"] = mlp_decls(cfg)
    if moe:
        block["moe"] = moe_lib.param_decls(cfg)
    else:
        block["mlp"] = mlp_decls(cfg)
    return block


def param_decl_leaves(cfg: Config, *, per_layer: bool = False):
    """(path, ParamDecl) of every parameter as stored, or with one block per layer."""
    return jax.tree_util.tree_flatten_with_path(
        layer_decls(cfg) if per_layer else param_decls(cfg),
        is_leaf=lambda x: isinstance(x, ParamDecl),
    )


def param_keys(path) -> tuple:
    """A tree path as plain keys: ("blocks", 3, "attn", "q")."""
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def param_path(path) -> str:
    """'blocks/3/attn/q' for a tree path."""
    return "/".join(map(str, param_keys(path)))


def param_shardings(cfg: Config, mesh: Mesh):
    """NamedSharding per parameter, from the parameter rules (`layout` + `param_layout`)."""
    return jax.tree.map(
        lambda d: param_sharding(mesh, cfg, d.axes),
        param_decls(cfg),
        is_leaf=lambda x: isinstance(x, ParamDecl),
    )


def abstract_params(cfg: Config, mesh: Mesh):
    """Shapes, dtypes and shardings of the parameters (a restore target; nothing allocated)."""
    return jax.tree.map(
        lambda d: jax.ShapeDtypeStruct(
            d.stored_shape, jnp.float32, sharding=param_sharding(mesh, cfg, d.axes)
        ),
        param_decls(cfg),
        is_leaf=lambda x: isinstance(x, ParamDecl),
    )


def init_params(cfg: Config, seed: int = 0, mesh: Mesh | None = None) -> Params:
    """Initialise parameters (float32), directly sharded over `mesh` per the layout.

    Each parameter's key is the seed's key folded with a hash of its path in the per-layer
    layout, so values do not depend on the mesh, the layout, the vocabulary padding, whether
    the layers are stacked, or which other parameters exist. Nothing is materialised whole on
    one device: each parameter (or stack) is produced by a jitted initializer with output
    sharding, compiled once per distinct (shape, sharding) and shared by every layer.
    """
    leaves, treedef = param_decl_leaves(cfg)
    stacks = stack_lib.layer_stacks(cfg)
    root = jax.random.key(seed)
    values = []
    for path, decl in leaves:
        keys = param_keys(path)
        names = [keys]
        if keys[0] == stack_lib.STACKS:
            assert stacks is not None  # a stored stack implies the scanned layout
            names = [(stack_lib.BLOCKS, layer, *keys[2:]) for layer in stacks.layers(keys[1])]
        sharding = None if mesh is None else param_sharding(mesh, cfg, decl.axes)
        make = _initializer(
            decl.init.kind, decl.shape, decl.stored_shape, sharding, stacked=len(names) > 1
        )
        salts = np.array([zlib.crc32(param_path(name).encode()) for name in names], np.uint32)
        values.append(
            make(root, salts if len(names) > 1 else salts[0], np.float32(decl.init.scale))
        )
    return jax.tree.unflatten(treedef, values)


@functools.lru_cache(maxsize=256)
def _initializer(
    kind: str,
    shape: tuple,
    stored_shape: tuple,
    sharding: NamedSharding | None,
    stacked: bool = False,
):
    """A jitted initializer of one parameter, or of a stack given one salt per layer (each
    layer's values those of its own initializer)."""
    make = functools.partial(_initial_value, kind, shape, stored_shape)
    if stacked:
        make = functools.partial(_initial_value, kind, shape[1:], stored_shape[1:])
        make = jax.vmap(make, (None, 0, None))
    return jax.jit(make, out_shardings=sharding)


def _initial_value(kind: str, shape: tuple, stored_shape: tuple, root, salt, scale):
    key = jax.random.fold_in(root, salt)
    if kind == "constant":
        value = jnp.full(shape, scale, jnp.float32)
    elif kind == "truncated_normal":
        value = scale * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    else:
        value = scale * jax.random.normal(key, shape, jnp.float32)
    if stored_shape == shape:
        return value
    return jnp.pad(value, [(0, s - d) for d, s in zip(shape, stored_shape, strict=True)])


class Output(NamedTuple):
    """What `forward` returns: logits [batch, seq, padded vocab] float32 (rows past n_vocab, if
    the vocabulary is padded, hold a huge negative number: never predicted or sampled), the
    cache it extended (None without one), and {MoE layer index: MoeStats}."""

    logits: Logits
    cache: DecodeCache | None
    moe_stats: dict[int, moe_lib.MoeStats]


def forward(cfg: Config, params: Params, tokens: Tokens, **options) -> Output:
    """The whole model, for training, scoring and decoding alike; `trunk` documents `options`
    (positions, rng, cache, train). Training's loss fuses the head (`trunk` + `head_inputs`
    + `loss.head_loss`) so that it never holds [batch, seq, vocab] logits."""
    x, cache, moe_stats = trunk(cfg, params, tokens, **options)
    return Output(head(cfg, params, x), cache, moe_stats)


def trunk(
    cfg: Config,
    params: Params,
    tokens: Tokens,
    *,
    positions: jax.Array | None = None,
    rng: jax.Array | None = None,
    cache: DecodeCache | None = None,
    train: bool | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, DecodeCache | None, dict[int, moe_lib.MoeStats]]:
    """The model up to the output head: (the residual stream after the last block [batch,
    seq, embd] in the compute dtype, cache, {MoE layer index: MoeStats}).

    `positions` [batch, seq] picks position-embedding rows (default 0..seq-1). `rng` enables
    dropout. `train` (default: whether `rng` is given) picks MoE layers' training capacity and
    routing policies. With `cache`, attention reads and extends it (decoding); the updated
    cache is returned. `segment_ids` [batch, seq] int32 packs several documents in a row
    (equal ids = one document, contiguous; 0 = padding): no attention crosses a segment and
    positions restart at 0 in each (unless `positions` are given). Pure; trace under `jax.set_mesh(mesh)` for sharded activations.
    Each block casts its own weights to the compute dtype (inside its remat scope, when
    `recompute_grad`), so unrolled, no compute-dtype copy of the whole model is ever live at
    once. (Scanned, the TPU compiler hoists the casts of the stacks out of its loops:
    `gpt_neo.training.memory.SCAN_BYTES_PER_PARAMETER`.)"""
    t = tokens.shape[1]
    if positions is None and t > cfg.n_ctx:
        raise ValueError(f"sequence length {t} exceeds n_ctx {cfg.n_ctx}")
    train = rng is not None if train is None else train
    if segment_ids is not None:
        segment_ids = constrain(jnp.asarray(segment_ids, jnp.int32), cfg, axes.TOKENS)
        if positions is None:
            positions = segment_positions(segment_ids)
    keys = None if rng is None else jax.random.split(rng, cfg.n_layer + 1)
    balance = cache is None and context.balanced(cfg)
    if balance:  # context parallelism: each device holds two opposite chunks (models.context)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
        tokens, positions = context.to_balanced(cfg, tokens), context.to_balanced(cfg, positions)
        if segment_ids is not None:
            segment_ids = context.to_balanced(cfg, segment_ids)
    x = embed(cfg, params, tokens, position_embedding(cfg, params, positions, t))
    if positions is None:
        positions = jnp.arange(t)[None, :]
    x = constrain(
        dropout_fn(x, cfg.embed_dropout, None if keys is None else keys[-1]), cfg, axes.HIDDEN
    )
    layer_keys = None if keys is None else keys[:-1]
    x, cache, moe_stats = run_blocks(
        cfg, params, x, layer_keys, cache, positions, train, segment_ids
    )
    return (context.to_contiguous(cfg, x) if balance else x), cache, moe_stats


def embed(cfg: Config, params: Params, tokens: Tokens, position_rows) -> jax.Array:
    """Token rows plus position rows, in the compute dtype (only the rows used are cast)."""
    dtype = COMPUTE_DTYPES[cfg.precision]
    tokens = constrain(tokens, cfg, axes.TOKENS)
    rows = jnp.take(params["wte"], tokens, axis=0).astype(dtype)
    return rows + jnp.asarray(position_rows).astype(dtype)


def head_inputs(cfg: Config, params: Params, x: jax.Array):
    """What the output head multiplies: (ln_f(x), weights [vocab, embd], bias or None), in
    the compute dtype. Tied to wte unless `no_weight_tie`; GPT-Neo's own untied head had no
    ln_f and a bias."""
    dtype = COMPUTE_DTYPES[cfg.precision]
    if not cfg.gpt_neo_untied_head:
        x = norm(cfg, params["ln_f"], x)
    weights = params["head"]["kernel"] if cfg.no_weight_tie else params["wte"]
    bias = params["head"]["bias"] if cfg.gpt_neo_untied_head else None
    return x, weights.astype(dtype), bias


def head(cfg: Config, params: Params, x: jax.Array) -> Logits:
    """The output head: float32 logits [batch, seq, padded vocab], padding rows masked."""
    logits = loss_lib.logits(*head_inputs(cfg, params, x), cfg.n_vocab)
    return constrain(logits, cfg, axes.LOGITS)


def param_count(
    cfg: Config, *, include_position_embedding: bool = True, active: bool = False
) -> int:
    """Parameters of the model; `active`: only those one token's forward pass uses (an MoE
    layer's router and the weights of the experts a token goes to)."""
    leaves = param_decl_leaves(cfg)[0]
    positions = set(position_decls(cfg))
    total = sum(
        math.prod(decl.shape)
        for path, decl in leaves
        if include_position_embedding or param_path(path) not in positions
    )
    if active and cfg.moe_layers:
        hp = cfg.moe
        idle_experts = hp.moe_num_experts - hp.experts_per_token
        total -= len(cfg.moe_layers) * idle_experts * 2 * cfg.n_embd * hp.moe_hidden_size
    return total


def block_param_count(cfg: Config) -> int:
    """Parameters of one block (the shared one with `share_parameters`)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(layer_decls(cfg)["blocks"][0]))


# FLOP conventions per token for training (forward + backward), as MFU reports name them.
# N counts every parameter that takes part in a matmul: all but the position embedding (a
# lookup); the token embedding counts because the tied output head multiplies by it.
FLOP_CONVENTIONS = {
    "6N+12LHQT": "PaLM appendix B: every attention layer scores all T keys",
    "6N+6LHQT (causal)": "causal attention computes half the score matrix",
}


def flops_per_token(cfg: Config, convention: str = "6N+12LHQT") -> float:
    """Training FLOPs per token. N counts active parameters (an MoE layer's experts that a
    token goes to, not all of them), L layers with attention (not `none` layers), H heads,
    Q head dim, T = n_ctx. Local layers are counted like global ones in both conventions."""
    n = param_count(cfg, include_position_embedding=False, active=True)
    if cfg.share_parameters:  # each layer multiplies by the shared block's weights
        n += (cfg.n_layer - 1) * block_param_count(cfg)
    layers = sum(kind != "none" for kind in cfg.attention_types)
    attention = layers * cfg.n_head * cfg.head_dim * cfg.n_ctx
    if convention == "6N+12LHQT":
        return 6 * n + 12 * attention
    if convention == "6N+6LHQT (causal)":
        return 6 * n + 6 * attention
    raise ValueError(
        f"unknown FLOP convention {convention!r}; known: {', '.join(FLOP_CONVENTIONS)}"
    )


__all__ = [
    "Output",
    "flops_per_token",
    "forward",
    "init_params",
    "param_count",
    "param_decls",
    "trunk",
]
