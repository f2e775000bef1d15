"""`mesh_shape` and `layout` -> a `jax.sharding.Mesh` and logical-axis sharding rules.

Model code names the dimensions of every parameter and large activation with *logical* axes
(`batch`, `embd`, `heads`, ...). A config's `layout` maps some of them to mesh axes; unmapped
axes are replicated. Model code never mentions mesh axes, so changing `mesh_shape`/`layout`
changes where numbers live, never which numbers are computed.

GPT-Neo's layout names are accepted with their GPT-Neo meaning:

| GPT-Neo layout name      | logical axis | what it shards                                        |
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
| `experts`, `expert_hidden` | `experts`, `expert_mlp` | mixture-of-experts dims (no effect until MoE exists) |

Our own logical names may be used in `layout` directly, too.
"""

from __future__ import annotations

import difflib
import functools
import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gpt_neo.config import Config, ConfigError

GPT_NEO_DIMS = {
    "batch": "batch",
    "sequence": "seq",
    "memory_length": "kv_seq",
    "embed_sequence": "pos",
    "embd": "embd",
    "heads": "heads",
    "features_per_head": "kv",
    "intermediate_expanded": "mlp",
    "vocab": "vocab",
    "experts": "experts",
    "expert_hidden": "expert_mlp",
}
LOGICAL_AXES = frozenset(GPT_NEO_DIMS.values())


def parse_mesh_shape(mesh_shape: str, source: str = "<config>") -> dict[str, int]:
    """`"x:4,y:2"` -> {"x": 4, "y": 2} (ordered)."""
    axes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in mesh_shape.split(","))):
        name, sep, size = part.partition(":")
        name = name.strip()
        if not sep or not name.isidentifier() or not size.strip().isdigit() or int(size) < 1:
            raise ConfigError(
                f"{source}: mesh_shape '{mesh_shape}': '{part}' is not name:size "
                '(write it like "x:4,y:2")'
            )
        if name in axes:
            raise ConfigError(f"{source}: mesh_shape '{mesh_shape}' names axis '{name}' twice")
        axes[name] = int(size)
    if not axes:
        raise ConfigError(f"{source}: mesh_shape '{mesh_shape}' names no axis (write \"x:8\")")
    return axes


def mesh_axes(cfg: Config, source: str = "<config>") -> dict[str, int] | None:
    """The configured mesh axes, or None when `mesh_shape` is unset (sized at `make_mesh`)."""
    return None if cfg.mesh_shape is None else parse_mesh_shape(cfg.mesh_shape, source)


@functools.lru_cache(maxsize=256)
def layout_rules(cfg: Config, source: str = "<config>") -> dict[str, str]:
    """Logical axis -> mesh axis, from `layout` (default: batch on the first mesh axis)."""
    axes = mesh_axes(cfg, source)
    first_axis = next(iter(axes)) if axes else "x"
    layout = cfg.layout if cfg.layout is not None else f"batch:{first_axis}"
    rules: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in layout.split(","))):
        dim, sep, mesh_axis = (s.strip() for s in part.partition(":"))
        if not sep or not dim or not mesh_axis:
            raise ConfigError(
                f"{source}: layout '{layout}': '{part}' is not dim:mesh_axis "
                '(write it like "batch:x,heads:y")'
            )
        logical = GPT_NEO_DIMS.get(dim, dim if dim in LOGICAL_AXES else None)
        if logical is None:
            known = sorted(set(GPT_NEO_DIMS) | LOGICAL_AXES)
            close = difflib.get_close_matches(dim, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: layout '{layout}': unknown tensor dimension '{dim}'.{hint} "
                f"Known: {', '.join(known)}."
            )
        known_axes = list(axes) if axes else [first_axis]
        if mesh_axis not in known_axes:
            raise ConfigError(
                f"{source}: layout '{layout}' maps '{dim}' to mesh axis '{mesh_axis}', which "
                f"mesh_shape '{cfg.mesh_shape or first_axis}' does not define "
                f"(its axes: {', '.join(known_axes)})."
            )
        if logical in rules:
            raise ConfigError(
                f"{source}: layout '{layout}' maps '{dim}' twice; a tensor dimension may be "
                "split over one mesh axis only."
            )
        rules[logical] = mesh_axis
    return rules


def logical_dim_sizes(cfg: Config) -> dict[str, int | None]:
    """The size of each logical axis under `cfg` (None: depends on the call, e.g. batch)."""
    return {
        "batch": cfg.train_batch_size,
        "seq": cfg.n_ctx,
        "kv_seq": cfg.n_ctx,
        "pos": cfg.n_ctx,
        "embd": cfg.n_embd,
        "heads": cfg.n_head,
        "kv": cfg.head_dim,
        "mlp": cfg.d_mlp,
        "vocab": cfg.n_vocab,
    }


def check_layout(cfg: Config, source: str = "<config>") -> None:
    """Reject a layout that cannot work, before anything is compiled. Raises `ConfigError`."""
    from gpt_neo.models.gpt import tensor_axes  # models import mesh; avoid the cycle

    rules = layout_rules(cfg, source)
    for tensor, axes in tensor_axes(cfg).items():
        used: dict[str, str] = {}
        for axis in axes:
            mesh_axis = rules.get(axis)
            if mesh_axis is None:
                continue
            if mesh_axis in used:
                raise ConfigError(
                    f"{source}: layout '{cfg.layout}' maps both '{used[mesh_axis]}' and '{axis}' "
                    f"of tensor {tensor} {list(axes)} to mesh axis '{mesh_axis}'; one tensor "
                    "can be split over a mesh axis along one dimension only."
                )
            used[mesh_axis] = axis
    sizes = mesh_axes(cfg, source)
    if sizes is None:
        return
    dims = logical_dim_sizes(cfg)
    for logical, mesh_axis in rules.items():
        size = dims.get(logical)
        if size is not None and size % sizes[mesh_axis]:
            raise ConfigError(
                f"{source}: layout maps '{logical}' (size {size}) to mesh axis '{mesh_axis}' of "
                f"size {sizes[mesh_axis]}, which does not divide it. Change mesh_shape, the "
                f"layout, or the size of '{logical}'."
            )


def logical_spec(cfg: Config, axes: tuple[str | None, ...]) -> PartitionSpec:
    """PartitionSpec for a tensor whose dimensions carry the logical names `axes`."""
    rules = layout_rules(cfg)
    return PartitionSpec(*(rules.get(a) if a else None for a in axes))


def named_sharding(mesh: Mesh, cfg: Config, axes: tuple[str | None, ...]) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(cfg, axes))


def make_mesh(cfg: Config, devices=None) -> Mesh:
    """A `Mesh` over `devices` (default: all) shaped by `mesh_shape`. Raises `ConfigError`."""
    devices = list(jax.devices() if devices is None else devices)
    axes = mesh_axes(cfg) or {"x": len(devices)}
    size = math.prod(axes.values())
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
    layout_rules(cfg)  # raise layout errors before any compilation
    shape, names = tuple(axes.values()), tuple(axes)
    auto = (AxisType.Auto,) * len(names)
    try:
        return jax.make_mesh(shape, names, axis_types=auto, devices=devices)
    except ValueError:  # a device order the helper cannot tile: keep the given order
        return Mesh(np.asarray(devices).reshape(shape), names, axis_types=auto)


def constrain(x: jax.Array, cfg: Config, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding to the layout, when traced under a mesh (`jax.set_mesh`)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(cfg, axes))
