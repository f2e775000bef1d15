"""`mesh_shape`, `layout` and `param_layout` -> a `jax.sharding.Mesh` and sharding rules.

Model code names the dimensions of every parameter and large activation with *logical* axes
(`gpt_neo.axes`). Two rule tables map those names to mesh axes; unmapped names are replicated:

- activations follow `layout` (GPT-Neo's key);
- parameters, and with them their gradients and optimizer state, follow `layout` with
  `param_layout`'s rules on top. `"layout": "batch:x", "param_layout": "embd:x"` keeps
  activations data-parallel and splits every weight over the same devices (FSDP / ZeRO-3):
  XLA gathers a weight where a matmul needs it and reduce-scatters its gradient.

A logical name may be split over several mesh axes, `batch:x+z`. Model code never mentions
mesh axes, so changing `mesh_shape`/`layout`/`param_layout` changes where numbers live, never
which numbers are computed.

GPT-Neo's layout names keep their GPT-Neo meaning:

| GPT-Neo layout name      | logical axis | what it splits                                        |
|--------------------------|--------------|-------------------------------------------------------|
| `batch`                  | `batch`      | examples of a batch (data parallel)                   |
| `sequence`               | `seq`        | activations along the sequence                        |
| `memory_length`          | `kv_seq`     | keys/values along the sequence inside attention       |
| `embed_sequence`         | `pos`        | rows of the position embedding                        |
| `embd`                   | `embd`       | the model width, in weights and activations           |
| `heads`                  | `heads`      | attention heads (GPT-Neo's combined heads x head_dim) |
| `features_per_head`      | `kv`         | the head dimension                                    |
| `intermediate_expanded`  | `mlp`        | the 4*n_embd MLP hidden dimension                     |
| `vocab`                  | `vocab`      | embedding rows and output logits                      |
| `experts`                | `experts`    | MoE experts: expert weights and the tokens sent to them (expert parallelism) |
| `expert_hidden`          | `expert_mlp` | each expert's hidden layer (tensor parallelism inside experts) |

Our own logical names may be used directly, too, and one has no GPT-Neo name: `kv_heads`, the
key/value heads of grouped-query attention (`n_kv_head`). Unless the layout names it, it is
split like `heads` where those mesh axes divide n_kv_head, and otherwise kept whole on every
device (each device then computes the key/value heads its query heads need: cheap, since there
are few of them). A vocabulary that its mesh axes do not divide
(GPT-Neo's 50257 on 2 devices) is padded: see `padded_vocab`.
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gpt_neo import axes
from gpt_neo.config import AUTO, LAYOUT_KEYS, Config, auto_keys
from gpt_neo.errors import ConfigError, warn

VOCAB_ALIGNMENT = 128  # default padding multiple: whole MXU tiles / tensor-core tiles
MeshAxes = tuple[str, ...]  # the mesh axes one logical axis is split over, in order


@dataclass(frozen=True)
class Rules:
    """Logical axis -> the mesh axes it is split over, for activations and for parameters."""

    activations: dict[str, MeshAxes]
    parameters: dict[str, MeshAxes]

    def parameter_overrides(self) -> dict[str, MeshAxes]:
        """The parameter rules that `param_layout` changed."""
        return {k: v for k, v in self.parameters.items() if self.activations.get(k) != v}


def parse_mesh_shape(mesh_shape: str, source: str = "config") -> dict[str, int]:
    """`"x:4,y:2"` -> {"x": 4, "y": 2} (ordered)."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in mesh_shape.split(","))):
        name, sep, size = part.partition(":")
        name = name.strip()
        if not sep or not name.isidentifier() or not size.strip().isdigit() or int(size) < 1:
            raise ConfigError(
                f"{source}: mesh_shape '{mesh_shape}': '{part}' is not name:size "
                '(write it like "x:4,y:2")'
            )
        if name in sizes:
            raise ConfigError(f"{source}: mesh_shape '{mesh_shape}' names axis '{name}' twice")
        sizes[name] = int(size)
    if not sizes:
        raise ConfigError(f"{source}: mesh_shape '{mesh_shape}' names no axis (write \"x:8\")")
    return sizes


def mesh_axes(cfg: Config, source: str = "config") -> dict[str, int] | None:
    """The configured mesh axes, or None when `mesh_shape` is unset (sized at `make_mesh`)."""
    _require_chosen(cfg)
    return None if cfg.mesh_shape is None else parse_mesh_shape(cfg.mesh_shape, source)


@functools.lru_cache(maxsize=256)
def dcn_axes(cfg: Config, source: str = "config") -> MeshAxes:
    """The mesh axes that cross slices (`dcn_axes`), checked against `mesh_shape`; () for one
    slice."""
    if not cfg.dcn_axes:
        return ()
    sizes = mesh_axes(cfg, source) or {}
    names = tuple(a.strip() for a in cfg.dcn_axes.split("+"))
    for name in names:
        if name not in sizes:
            raise ConfigError(
                f"{source}: dcn_axes '{cfg.dcn_axes}' names mesh axis '{name}', which "
                f"mesh_shape '{cfg.mesh_shape}' does not define; name one of "
                f"{', '.join(sizes)} (write several joined by '+')."
            )
    if len(set(names)) < len(names):
        raise ConfigError(f"{source}: dcn_axes '{cfg.dcn_axes}' names a mesh axis twice")
    return names


def _require_chosen(cfg: Config) -> None:
    if keys := [k for k in LAYOUT_KEYS if getattr(cfg, k) == AUTO]:
        raise ConfigError(
            f"{' and '.join(keys)} 'auto' must be chosen for the devices before a mesh is made: "
            "cfg = gpt_neo.choose_layout(cfg) (the command line does this for you)"
        )


def _parse_rules(text: str, key: str, known: list[str], source: str) -> dict[str, MeshAxes]:
    """`"batch:x+z,heads:y"` -> {"batch": ("x", "z"), "heads": ("y",)}."""
    rules: dict[str, MeshAxes] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        dim, sep, target = (s.strip() for s in part.partition(":"))
        if not sep or not dim or not target:
            raise ConfigError(
                f"{source}: {key} '{text}': '{part}' is not dim:mesh_axis "
                '(write it like "batch:x,heads:y", or "batch:x+z" for two mesh axes)'
            )
        logical = axes.GPT_NEO_NAMES.get(dim, dim if dim in axes.LOGICAL else None)
        if logical is None:
            names = sorted(set(axes.GPT_NEO_NAMES) | axes.LOGICAL)
            close = difflib.get_close_matches(dim, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: {key} '{text}': unknown tensor dimension '{dim}'.{hint} "
                f"Known: {', '.join(names)}."
            )
        mesh_list = tuple(a.strip() for a in target.split("+"))
        for mesh_axis in mesh_list:
            if mesh_axis not in known:
                raise ConfigError(
                    f"{source}: {key} '{text}' maps '{dim}' to mesh axis '{mesh_axis}', which "
                    f"the mesh does not define (its axes: {', '.join(known)}). Name one of them, "
                    "or add the axis to mesh_shape."
                )
        if len(set(mesh_list)) < len(mesh_list):
            raise ConfigError(f"{source}: {key} '{text}': '{part}' names a mesh axis twice")
        if logical in rules:
            raise ConfigError(
                f"{source}: {key} '{text}' maps '{dim}' twice; to split one dimension over "
                f"several mesh axes write them joined by '+' ({dim}:x+y)."
            )
        rules[logical] = mesh_list
    return rules


@functools.lru_cache(maxsize=256)
def rules(cfg: Config, source: str = "config") -> Rules:
    """The rule tables of `cfg` (default layout: `batch` on the first mesh axis)."""
    sizes = mesh_axes(cfg, source)  # refuses "auto" values
    known = list(sizes) if sizes else ["x"]
    layout = cfg.layout if cfg.layout is not None else f"batch:{'+'.join(_default_batch(cfg))}"
    activations = _parse_rules(layout, "layout", known, source)
    overrides = (
        _parse_rules(cfg.param_layout, "param_layout", known, source) if cfg.param_layout else {}
    )
    parameters = {**activations, **overrides}
    if axes.SEQ in activations and axes.KV_SEQ not in activations:
        # keys and values stay with the tokens they come from (context parallelism)
        activations[axes.KV_SEQ] = activations[axes.SEQ]
    return Rules(_with_kv_heads(cfg, activations, sizes), _with_kv_heads(cfg, parameters, sizes))


def _default_batch(cfg: Config) -> MeshAxes:
    """The mesh axes `batch` takes when `layout` is unset: the first one; with `dcn_axes`,
    those (data parallel across slices) and the first axis inside a slice."""
    known = list(mesh_axes(cfg) or {"x": 1})
    crossing = dcn_axes(cfg)
    inside = [a for a in known if a not in crossing]
    return (*crossing, *inside[:1]) if crossing else (known[0],)


def _with_kv_heads(cfg: Config, table: dict[str, MeshAxes], sizes) -> dict[str, MeshAxes]:
    """`table` with a rule for `kv_heads` when it names none: `heads`' mesh axes where they
    divide n_kv_head (always when there is no grouping), else none (replicated)."""
    heads = table.get(axes.HEADS)
    if axes.KV_HEADS in table or not heads:
        return table
    divides = cfg.n_kv_head == cfg.n_head or (
        sizes is not None and cfg.n_kv_head % split_size(sizes, heads) == 0
    )
    return {**table, axes.KV_HEADS: heads} if divides else table


def logical_dim_sizes(cfg: Config) -> dict[str, int | None]:
    """The size of each logical axis under `cfg` (None: depends on the call)."""
    return {
        axes.BATCH: cfg.train_batch_size,
        axes.SEQ: cfg.n_ctx,
        axes.KV_SEQ: cfg.n_ctx,
        axes.POS: cfg.n_ctx,
        axes.EMBD: cfg.n_embd,
        axes.HEADS: cfg.n_head,
        axes.KV_HEADS: cfg.n_kv_head,
        axes.KV: cfg.head_dim,
        axes.MLP: cfg.d_mlp,
        axes.VOCAB: padded_vocab(cfg),
        axes.EXPERTS: cfg.moe.moe_num_experts if cfg.moe_layers else None,
        axes.EXPERT_MLP: cfg.moe.moe_hidden_size if cfg.moe_layers else None,
    }


def split_size(sizes: dict[str, int], mesh_list: MeshAxes) -> int:
    """How many pieces a dimension split over `mesh_list` is cut into."""
    return math.prod(sizes[a] for a in mesh_list)


def pieces(sizes: dict[str, int], table: dict[str, MeshAxes], dim: str | None) -> int:
    """How many pieces `table` (a rule table of `rules`) cuts logical dimension `dim` into on a
    mesh of `sizes`; mesh axes the mesh does not have count as 1."""
    return split_size(sizes, tuple(a for a in table.get(dim, ()) if a in sizes)) if dim else 1


def padded_vocab(cfg: Config) -> int:
    """Embedding rows: n_vocab, padded up to a multiple of `vocab_pad_multiple` when that is
    set, else, when `vocab` is split over mesh axes that do not divide n_vocab, to the
    smallest multiple of 128 that they divide (50257 split 2 ways -> 50304)."""
    multiple = cfg.vocab_pad_multiple
    if multiple is None:
        split = _vocab_split(cfg)
        if cfg.n_vocab % split == 0:
            return cfg.n_vocab
        multiple = math.lcm(VOCAB_ALIGNMENT, split)
    return -(-cfg.n_vocab // multiple) * multiple


def _vocab_split(cfg: Config) -> int:
    """Pieces the vocabulary is cut into, by either rule table (1 while mesh sizes are unknown)."""
    sizes = mesh_axes(cfg)
    if sizes is None:
        return 1
    tables = rules(cfg)
    return math.lcm(
        *(split_size(sizes, t.get(axes.VOCAB, ())) for t in (tables.activations, tables.parameters))
    )


def check_layout(cfg: Config, source: str = "config", sizes: dict[str, int] | None = None) -> None:
    """Refuse a layout that cannot work, before anything is compiled: unknown names or mesh
    axes, one tensor split twice over a mesh axis, a dimension its mesh axes do not divide.
    `sizes` are the mesh's axis sizes (default: from `mesh_shape`). "auto" keys pass: the search
    (`gpt_neo.planning.auto_layout`) checks each candidate. Raises `ConfigError`."""
    if auto_keys(cfg):
        return
    tables = rules(cfg, source)
    param_key = "param_layout (on top of layout)" if cfg.param_layout else "layout"
    _check_tensors(tables.activations, axes.ACTIVATIONS, "layout", source)
    _check_tensors(tables.parameters, axes.PARAMETERS, param_key, source)
    sizes = sizes or mesh_axes(cfg, source)
    if sizes is None:
        return
    dims = logical_dim_sizes(cfg)
    for key, table in (
        ("layout", tables.activations),
        ("param_layout", tables.parameter_overrides()),
    ):
        for logical, mesh_list in table.items():
            size, pieces = dims.get(logical), split_size(sizes, mesh_list)
            if size is None or size % pieces == 0:
                continue
            where = (
                f"'{logical}' (size {size}) to mesh axes {'+'.join(mesh_list)} ({pieces} pieces)"
            )
            if logical == axes.EXPERTS:
                raise ConfigError(
                    f"{source}: {key} maps {where}, which does not divide moe_num_experts. "
                    "Pick a moe_num_experts that the mesh axes divide, or map 'experts' to "
                    "other mesh axes."
                )
            if logical == axes.KV_HEADS:
                raise ConfigError(
                    f"{source}: {key} maps {where}, which does not divide n_kv_head. Leave "
                    "kv_heads out of the layout (key/value heads are then split like heads "
                    "where that divides them, else kept whole on each device), or pick an "
                    f"n_kv_head that is a multiple of {pieces}."
                )
            if logical == axes.VOCAB:
                raise ConfigError(
                    f"{source}: {key} splits {where}, which do not divide the padded vocabulary. "
                    f"Set vocab_pad_multiple to a multiple of {pieces}"
                    + (
                        " or set mesh_shape, so the padding can be chosen"
                        if cfg.mesh_shape is None
                        else ""
                    )
                    + "."
                )
            raise ConfigError(
                f"{source}: {key} maps {where}, which does not divide it. Change mesh_shape, "
                f"{key}, or the size of '{logical}'."
            )
    _check_sequence_split(cfg, sizes, source)


# What a split over the data-centre network costs, per logical dimension a layout may put there
# (data parallelism, `batch`, sends gradients across once a step: the intended use).
_DCN_COSTS = {
    axes.HEADS: "two all-reduces of activations per block and pass",
    axes.MLP: "two all-reduces of activations per block and pass",
    axes.VOCAB: "an all-reduce of the logits' statistics per step",
    axes.EXPERTS: "two all-to-alls of tokens per MoE layer and pass",
    axes.SEQ: "every layer's keys and values, each pass",
    axes.EMBD: "every weight gathered (FSDP) in each pass",
}


@functools.lru_cache(maxsize=64)
def _warn_model_parallel_across_slices(cfg: Config) -> None:
    """A warning (once per config) for each dimension other than `batch` that the layout or
    `param_layout` splits over a mesh axis crossing slices: allowed, but its traffic then
    crosses the data-centre network, an order of magnitude slower than a slice's own links."""
    crossing = set(dcn_axes(cfg))
    if not crossing:
        return
    tables = rules(cfg)
    overrides = tables.parameter_overrides()
    for key, table in (("layout", tables.activations), ("param_layout", overrides)):
        for logical, mesh_list in table.items():
            if logical in _DCN_COSTS and (over := crossing.intersection(mesh_list)):
                warn(
                    f"{key} splits '{logical}' over {'+'.join(sorted(over))}, which "
                    f"crosses slices (dcn_axes): {_DCN_COSTS[logical]} go over the data-centre "
                    "network, about 10x slower than within a slice. Keep model-parallel splits "
                    "inside a slice unless nothing else fits."
                )


def _check_sequence_split(cfg: Config, sizes: dict[str, int], source: str) -> None:
    """Refuse a sequence split that context parallelism (`gpt_neo.models.context`) cannot run."""
    seq_axes = rules(cfg, source).activations.get(axes.SEQ, ())
    split = split_size(sizes, seq_axes) if seq_axes else 1
    if split == 1:
        return
    where = f"layout splits 'sequence' {split} ways (mesh axes {'+'.join(seq_axes)})"
    chunks = split if cfg.mlm_training else 2 * split
    if cfg.n_ctx % chunks:
        order = "" if cfg.mlm_training else " (2 chunks per device, for causal load balance)"
        raise ConfigError(
            f"{source}: {where}, which needs n_ctx to be a multiple of {chunks}{order}; "
            f"n_ctx is {cfg.n_ctx}. Pick an n_ctx that {chunks} divides, or split 'sequence' "
            "fewer ways."
        )
    if cfg.attn_dropout > 0:
        raise ConfigError(
            f"{source}: {where}, and context-parallel attention has no attention dropout; set "
            "attn_dropout to 0 or do not split the sequence."
        )
    if cfg.num_mem_kv:
        raise ConfigError(
            f"{source}: {where}, and context-parallel attention has no memory slots "
            "(num_mem_kv); remove num_mem_kv or do not split the sequence."
        )
    if cfg.attention_kernel == "cudnn":
        raise ConfigError(
            f"{source}: {where}, and attention_kernel 'cudnn' computes whole sequences only; "
            "set attention_kernel to 'auto' or 'xla' (context-parallel attention walks the "
            "sequence's chunks itself)."
        )
    chunk = cfg.n_ctx // chunks
    if cfg.attention_kernel == "splash" and (cfg.mlm_training or chunk % 128):
        why = "mlm_training" if cfg.mlm_training else f"chunks of {chunk} tokens"
        raise ConfigError(
            f"{source}: {where}, and attention_kernel 'splash' runs a split sequence's causal "
            f"chunks only when they are multiples of 128 tokens (this model has {why}); set "
            "attention_kernel to 'auto', or pick an n_ctx that 256 times the split divides."
        )
    if axes.KV in rules(cfg, source).activations:
        raise ConfigError(
            f"{source}: {where} and also 'features_per_head'; context-parallel attention needs "
            "each head's features on one device. Remove features_per_head from the layout."
        )
    if cfg.context_parallel == "ring" and cfg.mlm_training:
        raise ConfigError(
            f"{source}: context_parallel 'ring' runs causal attention only, and this model has "
            "mlm_training; set context_parallel to 'all_gather'."
        )
    window = cfg.local_attention_radius
    if cfg.context_parallel == "ring" and "local" in cfg.attention_types and window - 1 > chunk:
        raise ConfigError(
            f"{source}: context_parallel 'ring' over chunks of {chunk} tokens (n_ctx "
            f"{cfg.n_ctx} / {chunks}), shorter than the local window's {window - 1} earlier "
            "keys: a local layer would need more than its neighbour's chunk. Set "
            "context_parallel to 'all_gather', or split 'sequence' fewer ways."
        )


def _check_tensors(table: dict[str, MeshAxes], tensors: dict, key: str, source: str) -> None:
    for tensor, dims in tensors.items():
        used: dict[str, str] = {}
        for dim in dims:
            for mesh_axis in table.get(dim, ()):
                if mesh_axis in used:
                    raise ConfigError(
                        f"{source}: {key} maps both '{used[mesh_axis]}' and '{dim}' of tensor "
                        f"{tensor} {list(dims)} to mesh axis '{mesh_axis}'; one tensor can be "
                        "split over a mesh axis along one dimension only."
                    )
                used[mesh_axis] = dim


# --------------------------------------------------------------------------------------------
# Shardings


def _spec(table: dict[str, MeshAxes], dims: tuple[str | None, ...]) -> PartitionSpec:
    def entry(dim):
        mesh_list = table.get(dim, ()) if dim else ()
        return None if not mesh_list else mesh_list[0] if len(mesh_list) == 1 else mesh_list

    return PartitionSpec(*(entry(d) for d in dims))


def activation_spec(cfg: Config, dims: tuple[str | None, ...]) -> PartitionSpec:
    return _spec(rules(cfg).activations, dims)


def param_spec(cfg: Config, dims: tuple[str | None, ...]) -> PartitionSpec:
    return _spec(rules(cfg).parameters, dims)


def activation_sharding(mesh: Mesh, cfg: Config, dims) -> NamedSharding:
    return NamedSharding(mesh, activation_spec(cfg, dims))


def param_sharding(mesh: Mesh, cfg: Config, dims) -> NamedSharding:
    return NamedSharding(mesh, param_spec(cfg, dims))


def batch_axes(cfg: Config) -> MeshAxes:
    """The mesh axes a batch is split over (data parallelism)."""
    return rules(cfg).activations.get(axes.BATCH, ())


def data_parallel_size(cfg: Config, mesh: Mesh) -> int:
    return split_size(dict(mesh.shape), batch_axes(cfg))


def make_mesh(cfg: Config, devices=None) -> Mesh:
    """A `Mesh` over `devices` (default: all) shaped by `mesh_shape`. Raises `ConfigError`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_axes(cfg) or {"x": len(devices)}
    size = math.prod(sizes.values())
    if size != len(devices):
        platform = devices[0].platform if devices else "none"
        hint = (
            " On CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{size} (set before jax is imported)."
            if platform == "cpu"
            else ""
        )
        raise ConfigError(
            f"mesh_shape '{cfg.mesh_shape}' needs {size} devices but {len(devices)} "
            f"{platform} device(s) are available. Set mesh_shape so that the sizes multiply to "
            f"{len(devices)} (e.g. --set mesh_shape=x:{len(devices)}).{hint}"
        )
    check_layout(cfg, sizes=sizes)  # with the real sizes, also when mesh_shape is unset
    # where a run uses the layout, not where the auto layout's search tries it
    _warn_model_parallel_across_slices(cfg)
    shape, names = tuple(sizes.values()), tuple(sizes)
    auto = (AxisType.Auto,) * len(names)
    if crossing := dcn_axes(cfg):
        return Mesh(_across_slices(cfg, sizes, crossing, devices), names, axis_types=auto)
    if len(groups := slice_groups(devices) or [devices]) > 1:
        raise ConfigError(
            f"the devices span {len(groups)} TPU slices and dcn_axes is unset: name the mesh "
            f'axis that crosses them (e.g. mesh_shape "slice:{len(groups)},x:'
            f'{len(devices) // len(groups)}" with dcn_axes "slice").'
        )
    try:
        return jax.make_mesh(shape, names, axis_types=auto, devices=devices)
    except ValueError:  # a device order the helper cannot tile: keep the given order
        return Mesh(np.asarray(devices).reshape(shape), names, axis_types=auto)


def slice_count(cfg: Config) -> int:
    """How many slices the mesh spans: the product of the `dcn_axes` sizes (1 without)."""
    sizes = mesh_axes(cfg) or {}
    return math.prod(sizes[a] for a in dcn_axes(cfg))


def slice_groups(devices: list) -> list[list] | None:
    """The devices grouped by TPU slice (`slice_index`, in order), or None for one slice and
    where the index says nothing of slices: off a TPU (CPU devices of several processes carry
    slice_index 0 all alike)."""
    if not devices or devices[0].platform != "tpu":
        return None
    if any(getattr(d, "slice_index", None) is None for d in devices):
        return None
    indices = sorted({d.slice_index for d in devices})
    if len(indices) == 1:
        return None
    return [[d for d in devices if d.slice_index == i] for i in indices]


@dataclass(frozen=True)
class _InSlice:
    """A device presented to JAX's hybrid-mesh helper as part of slice `slice_index`: for
    devices whose index says nothing of slices (simulated slices on CPU, hosts off a TPU)."""

    device: object
    slice_index: int

    def __getattr__(self, name: str):
        return getattr(self.device, name)


def _across_slices(cfg: Config, sizes: dict[str, int], crossing: MeshAxes, devices: list):
    """The devices arranged by JAX's hybrid (ICI x DCN) mesh helper: each axis in `crossing`
    steps from slice to slice, every other one within a slice (its devices in the helper's
    interconnect order). Slices are the TPU's (`slice_index`); on other platforms, equal runs of
    consecutive hosts (process ids numbered slice by slice, as the pod launcher does), else (one
    host: tests on CPU) consecutive equal groups of devices stand for slices."""
    dcn = [sizes[a] if a in crossing else 1 for a in sizes]
    ici = [1 if a in crossing else sizes[a] for a in sizes]
    count = math.prod(dcn)
    where = f"dcn_axes '{cfg.dcn_axes}' ({count} slices)"
    groups = slice_groups(devices)
    if groups is None and devices and devices[0].platform == "tpu" and count > 1:
        raise ConfigError(
            f"{where}, but the TPU devices are one slice. Run on {count} slices "
            "(--num_slices), or remove dcn_axes."
        )
    if groups is None:
        hosts = sorted({d.process_index for d in devices})
        if len(hosts) > 1 and len(hosts) % count:
            raise ConfigError(
                f"{where}, and the devices are on {len(hosts)} hosts: give each slice the "
                "same number of hosts, or set dcn_axes to match."
            )
        if len(hosts) > 1:  # consecutive processes per slice, as the pod launcher numbers them
            per_slice = len(hosts) // count
            slice_of = {h: i // per_slice for i, h in enumerate(hosts)}
            groups = [[d for d in devices if slice_of[d.process_index] == s] for s in range(count)]
        else:
            per = len(devices) // count
            groups = [devices[i * per : (i + 1) * per] for i in range(count)]
        devices = [_InSlice(d, i) for i, group in enumerate(groups) for d in group]
    if len(groups) != count:
        raise ConfigError(
            f"{where}, but the devices come from {len(groups)} slices. Make the dcn_axes "
            f"sizes in mesh_shape multiply to {len(groups)} (or run on {count} slices)."
        )
    arranged = mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, allow_split_physical_axes=True
    )
    return np.vectorize(lambda d: getattr(d, "device", d), otypes=[object])(arranged)


def constrain(x: jax.Array, cfg: Config, dims: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding to the layout, when traced under a mesh (`jax.set_mesh`)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(cfg, dims))
