"""Checkpoints of the original GPT-Neo (Mesh-TensorFlow) -> (Config, params), or a checkpoint
of ours that `main.py` continues training:

    python -m gpt_neo.cli.mesh_tf import CKPT_DIR --model gpt_neo_config.json --model_path DIR \\
        [--override mesh_shape=x:8 layout=batch:x train_steps=... ...]

reads the newest `model.ckpt-N` that CKPT_DIR's `checkpoint` file names (or the `model.ckpt-N`
prefix given) with the GPT-Neo config it was trained with, and writes step N under DIR plus
DIR/config.json; `python main.py --model DIR/config.json` then continues from step N. The
optimizer state starts fresh (GPT-Neo's Adam or Adafactor slots are not carried over) and the
data is read from the start. From Python: `cfg, params = import_checkpoint(ckpt, "cfg.json")`
and `checkpoint_step(ckpt)`.

TensorFlow's checkpoint reader reads the files; Mesh-TensorFlow is not needed. GPT-Neo's
variables (under `gpt2/`; `h{i}/` is layer i's scope) -> our parameters:

    wte [vocab, embd]                         wte (zero rows up to mesh.padded_vocab)
    wpe [n_ctx, embd]                         wpe
    axial_wpe_1, axial_wpe_2 [d1|d2, embd]    axial_wpe_1, axial_wpe_2         (axial_pos_emb)
    ln_f/{g,b}                                ln_f.{scale,bias}
    wte_final_linear/conv1d_main/linear_out/{kernel [embd, vocab], bias}
                                              head.{kernel (transposed), bias} (no_weight_tie)
    h{i}/norm_1/{g,b}, h{i}/norm_2/{g,b}      blocks[i].ln_1, ln_2  (scalenorm: scalar g only)
    h{i}/norm_rezero_1/g, norm_rezero_2/g     blocks[i].rezero.{attn,mlp}      (rezero)
    h{i}/attn/{q,k,v} [embd, heads*kv]        blocks[i].attn.{q,k,v} [embd, heads, kv]
    h{i}/attn/o [heads*kv, embd]              blocks[i].attn.o [heads, kv, embd]
    h{i}/attn/compute_output_bias/o_b         blocks[i].attn.o_bias
    h{i}/attn/attention/mem_{k,v} [N, heads, kv]  blocks[i].attn.mem_{k,v}     (num_mem_kv)
    h{i}/mlp/conv1d_main/c_fc/{kernel,bias}   blocks[i].mlp.fc_{kernel,bias}; with mlp_glu
                                              [embd, 8 embd]: columns 0..4e are fc_*, the
                                              rest gate_* (GPT-Neo's split order)
    h{i}/mlp/conv1d_main/c_proj/{kernel,bias} blocks[i].mlp.proj_{kernel,bias}
    h{i}/mlp_macaron/conv1d_main/...          blocks[i].mlp_macaron            (macaron)
    h{i}/{top_2|rand_1}_gating/kernel [embd, E]   blocks[i].moe.router   (moe_layers: Mesh-TF
    h{i}/wi/kernel [E, embd, H], h{i}/wo/kernel [E, H, embd]   .moe.wi, .wo   0.1.18 names)

Skipped: `global_step` (the step) and the optimizer slots: `<var>/adam_m`, `<var>/adam_v`
(GPT-Neo's Adam), `<var>_slot_{vr,vc,v,m}` (Adafactor, mesh_tensorflow/optimize.py). Weights
that a `precision: bfloat16` run stored in bfloat16 are cast to float32. Any other variable, a
missing one, or a shape the config does not give is an error naming the variable.

What GPT-Neo's code did with its config (a `defaultdict(None)`), reproduced here:
- the MLP activation is `activation_fn`, default gelu; the official configs'
  `activation_function` was ignored, and is here too (a line says so when they differ);
- `rotary_emb` and `axial_pos_emb` are on for any non-null value, `false` included; rotary wins
  when both are set;
- `mlp_glu`, `scalenorm`, `rezero`, `macaron`, `share_parameters`, `no_weight_tie` are on only
  when equal to true; any `opt_name` but adam meant Adafactor;
- `no_weight_tie` also skipped ln_f and gave the head a bias: `gpt_neo_untied_head: true`;
- a `none` layer added x to itself (x + x): `gpt_neo_none_layers: true`;
- `share_parameters` used the block scope "", which TensorFlow spells `gpt2//attn/q`; names
  are read with repeated slashes collapsed, so `gpt2/attn/q` works too.
Refused: learnable activations (aria, prelu, parcsinh, psoftplus, proottanh). GPT-Neo named
their scalars `activation-<random hex>`, so nothing tells which layer or role each one had.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jax
import numpy as np

from gpt_neo.config import (
    Config,
    expand_attention_types,
    from_dict,
    parse_overrides,
    read_json_object,
    resolve_config_path,
)
from gpt_neo.errors import ConfigError, DataError
from gpt_neo.mesh import check_layout
from gpt_neo.models.activations import ACTIVATION_PARAMS
from gpt_neo.models.gpt import param_decl_leaves, param_keys, param_shardings
from gpt_neo.models.stack import stacked
from gpt_neo.storage import tf
from gpt_neo.training.checkpoint.imported import save_imported_model

Overrides = Mapping[str, object] | Sequence[str] | None

# --------------------------------------------------------------------------------------------
# The config, as GPT-Neo's code read it

# GPT-Neo tested these with `exists()` (is not None): any value, false included, turned them on.
ON_WHEN_PRESENT = ("rotary_emb", "axial_pos_emb")
# ... and these with `== True`: "true", "yes" or 2 left them off.
ON_WHEN_TRUE = ("mlp_glu", "scalenorm", "rezero", "macaron", "share_parameters", "no_weight_tie")


def _neo_true(value) -> bool:
    """GPT-Neo's `params[key] == True`."""
    return isinstance(value, bool | int | float) and value == 1


def neo_config_dict(raw: Mapping, source: str) -> tuple[dict, list[str]]:
    """A GPT-Neo config dict -> (the same model in our keys, notes on what GPT-Neo read
    differently from what the file seems to say)."""
    out, notes = dict(raw), []
    ignored = out.pop("activation_function", None)
    activation = out.pop("activation_fn", "gelu")
    if ignored is not None and ignored != activation:
        notes.append(
            f"activation {activation!r}: GPT-Neo read only 'activation_fn' (default gelu) and "
            f"ignored this file's 'activation_function': {ignored!r}"
        )
    out["activation_function"] = activation
    optimizer = out.get("opt_name")
    if isinstance(optimizer, str) and optimizer.lower() not in ("adam", "adafactor"):
        out["opt_name"] = "adafactor"
        notes.append(f"opt_name {optimizer!r} meant Adafactor in GPT-Neo (all but adam did)")
    if activation == "rrelu":
        notes.append(
            "rrelu: GPT-Neo drew its slope at random every time it built the graph, so the "
            "checkpoint was trained with no single slope; ours is 0.5 (their mean)"
        )

    rotary, axial = (out.pop(key, None) for key in ON_WHEN_PRESENT)
    if rotary is not None:
        out["rotary_emb"] = True
        if rotary is not True:
            notes.append(
                f"rotary_emb {json.dumps(rotary)} turned rotary embeddings ON in GPT-Neo (any "
                "value but null did): imported with rotary_emb true"
            )
        if axial is not None:
            notes.append("axial_pos_emb is ignored: GPT-Neo used rotary when both were set")
    elif axial is not None:
        out["axial_pos_emb"] = axial

    for key in ON_WHEN_TRUE:
        value = out.pop(key, None)
        if _neo_true(value):
            out[key] = True
        elif value not in (None, False, 0):
            notes.append(f"{key} {json.dumps(value)} was off in GPT-Neo (only true turned it on)")
    if out.get("no_weight_tie"):
        out["gpt_neo_untied_head"] = True  # GPT-Neo's untied head: no ln_f, a bias
    if "none" in expand_attention_types(out.get("attention_types") or ["global"], source):
        out["gpt_neo_none_layers"] = True  # GPT-Neo's `none` layer: x = x + x, then the MLP
    return out, notes


def neo_config(config_path, overrides: Overrides = None) -> Config:
    """Our `Config` for a GPT-Neo config file, as GPT-Neo's code read it (`neo_config_dict`,
    whose notes are printed); `overrides` (our keys) apply last. Raises `ConfigError`."""
    path = resolve_config_path(config_path)
    values, notes = neo_config_dict(read_json_object(path), str(path))
    cfg = from_dict({**values, **parse_overrides(overrides)}, source=str(path))
    check_layout(cfg, str(path))
    if ACTIVATION_PARAMS.get(cfg.activation_function):
        raise ConfigError(
            f"{path}: activation_fn {cfg.activation_function!r} has learnable scalars, which "
            "GPT-Neo created under random names (activation-<hex>) that do not say which layer "
            "or which role each belongs to, so such a checkpoint cannot be imported faithfully"
        )
    for note in notes:
        print(f"{path}: {note}")
    return cfg


# --------------------------------------------------------------------------------------------
# The checkpoint files

# Optimizer slots, named `var.name + suffix`: Adam by GPT-Neo's optimizers.py, Adafactor by
# mesh_tensorflow/optimize.py (0.1.18).
SLOT_SUFFIXES = {
    "/adam_m": "Adam",
    "/adam_v": "Adam",
    "_slot_vr": "Adafactor",
    "_slot_vc": "Adafactor",
    "_slot_v": "Adafactor",
    "_slot_m": "Adafactor",
}
STEP = "global_step"


def checkpoint_prefix(ckpt) -> str:
    """The `.../model.ckpt-N` prefix to read: the newest checkpoint a directory's `checkpoint`
    file names, or `ckpt` itself (a prefix, or one of its files). Raises `DataError`."""
    t = tf()
    path = str(ckpt).rstrip("/")
    if t.io.gfile.isdir(path):
        if prefix := t.train.latest_checkpoint(path):
            return prefix
        raise DataError(
            f"{path}: no TensorFlow checkpoint here (no 'checkpoint' file naming a model.ckpt-N "
            "whose .index exists). Pass the directory GPT-Neo's model_path named, or a "
            "model.ckpt-N prefix"
        )
    path = re.sub(r"\.(index|meta|data-\d+-of-\d+)$", "", path)
    if not t.io.gfile.exists(f"{path}.index"):
        raise DataError(
            f"{ckpt}: neither a directory holding a TensorFlow checkpoint nor a model.ckpt-N "
            f"prefix ({path}.index does not exist)"
        )
    return path


def _reader(prefix: str):
    t = tf()
    try:
        return t.train.load_checkpoint(prefix)
    except (t.errors.OpError, ValueError) as err:
        raise DataError(f"{prefix}: not a readable TensorFlow checkpoint ({err})") from None


def checkpoint_step(ckpt) -> int:
    """The training step (`global_step`) of the checkpoint `checkpoint_prefix(ckpt)` names."""
    prefix = checkpoint_prefix(ckpt)
    reader = _reader(prefix)
    if not reader.has_tensor(STEP):
        raise DataError(f"{prefix} has no {STEP}: not a checkpoint written by GPT-Neo's main.py")
    return int(reader.get_tensor(STEP))


def _variables(prefix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (the name stored, shape) for every variable. Names have repeated slashes
    collapsed: share_parameters' scope "" makes TensorFlow write `gpt2//attn/q`."""
    shapes = _reader(prefix).get_variable_to_shape_map()
    return {re.sub("/+", "/", name): (name, tuple(shape)) for name, shape in shapes.items()}


def _slot_kind(name: str) -> str | None:
    return next((kind for suffix, kind in SLOT_SUFFIXES.items() if name.endswith(suffix)), None)


def optimizer_slots(prefix: str) -> dict[str, int]:
    """How many optimizer slot variables the checkpoint holds, per optimizer."""
    counts: dict[str, int] = {}
    for name in _variables(prefix):
        if kind := _slot_kind(name):
            counts[kind] = counts.get(kind, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------
# GPT-Neo's variable behind each of our parameters


@dataclass(frozen=True)
class Source:
    """Where one of our parameters comes from: GPT-Neo's variable `name` of `shape`, and how
    its value becomes ours."""

    name: str
    shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray] = np.asarray


UNTIED_HEAD = "gpt2/wte_final_linear/conv1d_main/linear_out/"
TOP_LEVEL = {
    ("wte",): "gpt2/wte",
    ("wpe",): "gpt2/wpe",
    ("axial_wpe_1",): "gpt2/axial_wpe_1",
    ("axial_wpe_2",): "gpt2/axial_wpe_2",
    ("ln_f", "scale"): "gpt2/ln_f/g",
    ("ln_f", "bias"): "gpt2/ln_f/b",
    ("head", "bias"): UNTIED_HEAD + "bias",
}
NORMS = {"ln_1": "norm_1", "ln_2": "norm_2", "scale": "g", "bias": "b"}
REZERO = {"attn": "norm_rezero_1/g", "mlp": "norm_rezero_2/g"}
GATINGS = ("top_2", "rand_1")  # Mesh-TF 0.1.18 scopes its router `<gating>_gating`


def _source(cfg: Config, path: tuple, shape: tuple[int, ...], held: Mapping) -> Source:
    """The GPT-Neo variable behind our parameter at `path` (declared `shape`); `held` is the
    checkpoint's variables (the router's scope depends on the gating it was trained with)."""
    if path[0] == "blocks":
        scope = "gpt2/" if cfg.share_parameters else f"gpt2/h{path[1]}/"
        if source := _block_source(cfg, scope, path[2:], shape, held):
            return source
    elif path == ("head", "kernel"):
        return Source(UNTIED_HEAD + "kernel", shape[::-1], np.transpose)
    elif path in TOP_LEVEL:
        return Source(TOP_LEVEL[path], shape)
    raise ConfigError(
        f"the config gives the model parameter {'/'.join(map(str, path))}, which no GPT-Neo "
        "checkpoint holds (a feature GPT-Neo did not have); remove the key that adds it"
    )


def _block_source(cfg: Config, scope: str, leaf: tuple, shape, held) -> Source | None:
    match leaf:
        case ("ln_1" | "ln_2" as norm, "scale" | "bias" as part):
            return Source(f"{scope}{NORMS[norm]}/{NORMS[part]}", shape)
        case ("rezero", "attn" | "mlp" as branch):
            return Source(scope + REZERO[branch], shape)
        case ("attn", "q" | "k" | "v" as proj):  # [embd, heads*kv], heads-major columns
            return Source(f"{scope}attn/{proj}", (shape[0], shape[1] * shape[2]), _reshape(shape))
        case ("attn", "o"):  # [heads*kv, embd], heads-major rows
            return Source(f"{scope}attn/o", (shape[0] * shape[1], shape[2]), _reshape(shape))
        case ("attn", "o_bias"):
            return Source(f"{scope}attn/compute_output_bias/o_b", shape)
        case ("attn", "mem_k" | "mem_v" as memory):  # made inside attn's "attention" scope
            return Source(f"{scope}attn/attention/{memory}", shape)
        case ("mlp" | "mlp_macaron" as mlp, part):
            return _mlp_source(cfg, f"{scope}{mlp}/conv1d_main/", part, shape)
        case ("moe", "router"):
            names = [f"{scope}{gating}_gating/kernel" for gating in GATINGS]
            return Source(next((n for n in names if n in held), names[0]), shape)
        case ("moe", "wi" | "wo" as weight):
            return Source(f"{scope}{weight}/kernel", shape)
    return None


def _mlp_source(cfg: Config, prefix: str, part: str, shape) -> Source | None:
    layer, _, kind = part.partition("_")  # fc|gate|proj, kernel|bias
    if layer == "proj":
        return Source(f"{prefix}c_proj/{kind}", shape)
    if not cfg.mlp_glu:
        return Source(f"{prefix}c_fc/{kind}", shape) if layer == "fc" else None
    # mlp_glu: one c_fc of twice the width, split as GPT-Neo's mtf.split did: [value, gate]
    width = shape[-1]
    half = slice(0, width) if layer == "fc" else slice(width, 2 * width)
    return Source(f"{prefix}c_fc/{kind}", (*shape[:-1], 2 * width), lambda a: a[..., half])


def _reshape(shape):
    return lambda a: a.reshape(shape)


# --------------------------------------------------------------------------------------------
# Import


def _model_weights(prefix: str, variables: Mapping) -> set[str]:
    names = {n for n in variables if n != STEP and not _slot_kind(n)}
    if not any(n.startswith("gpt2/") for n in names):
        raise DataError(f"{prefix} holds no gpt2/ variables: not a checkpoint of GPT-Neo's model")
    return names


def _layer_hint(cfg: Config, names) -> str:
    layers = {int(m[1]) for n in names if (m := re.match(r"gpt2/h(\d+)/", n))}
    if layers and max(layers) + 1 != cfg.n_layer:
        return (
            f" The checkpoint holds {max(layers) + 1} layers (h0..h{max(layers)}); the config's "
            f"n_layer is {cfg.n_layer}."
        )
    return ""


def _listed(names: list[str]) -> str:
    more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def _check_names(prefix: str, cfg: Config, needed: set[str], weights: set[str]) -> None:
    fix = " Pass the GPT-Neo config the checkpoint was trained with."
    if missing := sorted(needed - weights):
        raise ConfigError(
            f"{prefix} has no variable {_listed(missing)}, which the config needs."
            + _layer_hint(cfg, weights)
            + fix
        )
    if unknown := sorted(weights - needed):
        raise ConfigError(
            f"{prefix} holds the variable {_listed(unknown)}, which the config has no parameter "
            "for (a checkpoint of another model, or of a GPT-Neo feature this importer does "
            "not read)." + _layer_hint(cfg, weights) + fix
        )


def read_params(prefix: str, cfg: Config) -> dict:
    """Our parameter tree (float32 numpy, vocabulary rows padded as declared) from the GPT-Neo
    checkpoint at `prefix`, for `cfg`. Raises `ConfigError` where they disagree."""
    variables = _variables(prefix)
    leaves, treedef = param_decl_leaves(cfg, per_layer=True)
    sources = [(_source(cfg, param_keys(path), d.shape, variables), d) for path, d in leaves]
    _check_names(prefix, cfg, {s.name for s, _ in sources}, _model_weights(prefix, variables))
    reader = _reader(prefix)
    values = []
    for source, decl in sources:
        stored, shape = variables[source.name]
        if shape != source.shape:
            raise ConfigError(
                f"{prefix}: {source.name} has shape {list(shape)}, but the config needs "
                f"{list(source.shape)} (n_embd {cfg.n_embd}, n_head {cfg.n_head}, n_vocab "
                f"{cfg.n_vocab}, n_ctx {cfg.n_ctx}). Pass the GPT-Neo config the checkpoint "
                "was trained with."
            )
        value = source.convert(np.asarray(reader.get_tensor(stored), np.float32))
        pad = [(0, s - d) for d, s in zip(decl.shape, decl.stored_shape, strict=True)]
        values.append(np.pad(value, pad) if any(p for _, p in pad) else value)
    return stacked(cfg, jax.tree.unflatten(treedef, values))


def _place(cfg: Config, params: dict, mesh):
    if mesh is not None:
        return jax.device_put(params, param_shardings(cfg, mesh))
    return jax.tree.map(jax.numpy.asarray, params)


def import_checkpoint(ckpt_dir, config_path, *, overrides: Overrides = None, mesh=None):
    """A GPT-Neo checkpoint (a directory: its newest; or a `model.ckpt-N` prefix) and the
    GPT-Neo config it was trained with -> (Config, float32 params).

    `overrides` sets our config keys last (mesh_shape, layout, model_path, ...); with `mesh`,
    parameters are placed sharded per the layout. Raises `ConfigError` / `DataError`.
    """
    cfg = neo_config(config_path, overrides)
    return cfg, _place(cfg, read_params(checkpoint_prefix(ckpt_dir), cfg), mesh)


# --------------------------------------------------------------------------------------------
# Import into a checkpoint that training continues


@dataclass(frozen=True)
class Imported:
    """What `import_to_checkpoint` did."""

    cfg: Config
    checkpoint: str  # the model.ckpt-N prefix read
    step: int  # GPT-Neo's global_step, the step of the checkpoint written
    config_path: str  # model_path/config.json
    slots_left: dict[str, int]  # optimizer slot variables not carried over, per optimizer


def import_to_checkpoint(ckpt_dir, config_path, model_path: str, overrides: Overrides = None):
    """A GPT-Neo checkpoint -> our checkpoint at the same step under `model_path` (fresh
    optimizer state, data from the start) and `model_path/config.json`, which
    `python main.py --model` continues training from. Returns what was done (`Imported`)."""
    cfg = neo_config(config_path, {"model_path": model_path, **parse_overrides(overrides)})
    prefix = checkpoint_prefix(ckpt_dir)
    step = checkpoint_step(prefix)
    config_out = save_imported_model(cfg, read_params(prefix, cfg), step)
    return Imported(cfg, prefix, step, config_out, optimizer_slots(prefix))
