"""`main.py --summary`: parameter count, FLOPs per token, per-device memory, parameter shardings.

Everything here is computed from the config alone (mesh sizes from `mesh_shape`), so a
summary of a TPU-pod config can be read on a laptop.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from gpt_neo.config import Config
from gpt_neo.mesh import mesh_axes, padded_vocab, param_spec, rules, split_size
from gpt_neo.models.gpt import (
    FLOP_CONVENTIONS,
    flops_per_token,
    param_count,
    param_decl_leaves,
    param_path,
)

BYTES_PER_PARAM = 4  # float32 master copies, whatever the compute precision


@dataclass(frozen=True)
class ParamRow:
    name: str  # blocks/*/attn/q style, layers folded together
    layers: int  # how many parameters share the row
    shape: tuple[int, ...]  # as stored (the vocabulary padded, if it is)
    axes: tuple[str | None, ...]
    spec: str  # mesh axes per dimension, "-" where replicated
    device_shape: tuple[int, ...]


def _device_shape(cfg: Config, shape, dims) -> tuple[int, ...]:
    """The per-device shape of a parameter under the parameter rules (mesh sizes from
    mesh_shape; unknown sizes count as 1)."""
    sizes = mesh_axes(cfg) or {}
    table = rules(cfg).parameters
    return tuple(
        size // split_size(sizes, tuple(a for a in table.get(dim, ()) if a in sizes))
        for size, dim in zip(shape, dims, strict=True)
    )


def param_rows(cfg: Config) -> list[ParamRow]:
    grouped: dict[str, list] = defaultdict(list)
    for path, decl in param_decl_leaves(cfg)[0]:
        grouped[re.sub(r"^blocks/\d+/", "blocks/*/", param_path(path))].append(decl)
    rows = []
    for name, decls in grouped.items():
        decl = decls[0]
        spec = param_spec(cfg, decl.axes)
        rows.append(
            ParamRow(
                name,
                len(decls),
                decl.stored_shape,
                decl.axes,
                ",".join(_mesh_text(a) for a in spec) or "-",
                _device_shape(cfg, decl.stored_shape, decl.axes),
            )
        )
    return rows


def _mesh_text(entry) -> str:
    """One PartitionSpec entry as text: `x`, `x+z`, or `-` for replicated."""
    if entry is None:
        return "-"
    return entry if isinstance(entry, str) else "+".join(entry)


ADAFACTOR_MIN_DIM_TO_FACTOR = 128  # optax.scale_by_factored_rms's default


def optimizer_state_elements(cfg: Config, shape: tuple[int, ...], device_shape) -> int:
    """Optimizer-state floats per device for one parameter of `shape` (`device_shape` on one
    device). Moments shaped like the parameter are split like it (gpt_neo.optim.state_shardings);
    Adafactor's factored statistics are replicated."""
    if cfg.opt_name.lower() == "adam":
        return 2 * math.prod(device_shape)  # first and second moments
    # Adafactor (optax): factors the two largest dims when both reach 128, keeping a row and a
    # column statistic plus a 1-element placeholder; else the full v and two placeholders.
    largest = sorted(range(len(shape)), key=lambda d: shape[d])[-2:]
    if len(shape) < 2 or shape[largest[0]] < ADAFACTOR_MIN_DIM_TO_FACTOR:
        return math.prod(device_shape) + 2
    size = math.prod(shape)
    return size // shape[largest[1]] + size // shape[largest[0]] + 1


def memory_per_device(cfg: Config) -> dict[str, int]:
    """Bytes per device of float32 parameters and optimizer state, under the configured mesh."""
    params = optimizer = 0
    for row in param_rows(cfg):
        params += row.layers * math.prod(row.device_shape)
        optimizer += row.layers * optimizer_state_elements(cfg, row.shape, row.device_shape)
    return {"parameters": params * BYTES_PER_PARAM, "optimizer state": optimizer * BYTES_PER_PARAM}


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: int) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n} B"


def print_summary(cfg: Config, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 120), soft_wrap=True)
    total = param_count(cfg)
    kinds = ", ".join(
        f"{cfg.attention_types.count(k)} {k}" for k in dict.fromkeys(cfg.attention_types)
    )
    console.print(
        f"[bold]GPT-Neo model[/bold]: {cfg.n_layer} layers ({kinds}), n_embd {cfg.n_embd}, "
        f"{cfg.n_head} heads x {cfg.head_dim}, n_ctx {cfg.n_ctx}, n_vocab {cfg.n_vocab}, "
        f"activation {cfg.activation_function}, precision {cfg.precision}"
    )
    console.print(
        f"parameters: {total:,} ({_human(total)}); without position embedding "
        f"{param_count(cfg, include_position_embedding=False):,}"
    )
    if cfg.moe_layers:
        hp = cfg.moe
        active = param_count(cfg, active=True)
        console.print(
            f"mixture of experts: layers {list(cfg.moe_layers)}, {hp.moe_num_experts} experts x "
            f"{hp.moe_hidden_size} hidden, {hp.moe_gating} routing ({hp.experts_per_token} "
            f"expert{'s' if hp.experts_per_token > 1 else ''} per token), activation "
            f"{cfg.moe_activation}; parameters total {total:,} ({_human(total)}), active per "
            f"token {active:,} ({_human(active)}). FLOPs below count active parameters."
        )
    for convention, meaning in FLOP_CONVENTIONS.items():
        console.print(
            f"training FLOPs/token, {convention}: {_human(flops_per_token(cfg, convention), 'FLOP')} "
            f"[dim]({meaning})[/dim]"
        )
    sizes = mesh_axes(cfg)
    mesh_text = cfg.mesh_shape or "all devices on axis x"
    devices = math.prod(sizes.values()) if sizes else None
    tables = rules(cfg)
    console.print(f"mesh: {mesh_text} ({devices or '?'} devices)")
    console.print(f"layout (activations): {_rules_text(tables.activations)}")
    parameters = _rules_text(tables.parameters) if cfg.param_layout else "as layout"
    console.print(f"param_layout (parameters): {parameters}")
    if padded_vocab(cfg) != cfg.n_vocab:
        console.print(
            f"vocabulary: {cfg.n_vocab} tokens, embedding padded to {padded_vocab(cfg)} rows so "
            "that its mesh axes divide it (padding is masked out)"
        )
    memory = memory_per_device(cfg)
    console.print(
        f"per-device memory ({cfg.opt_name}): parameters {_bytes(memory['parameters'])} + "
        f"optimizer state {_bytes(memory['optimizer state'])} = "
        f"{_bytes(sum(memory.values()))} [dim](float32; activations not included)[/dim]"
    )
    table = Table(title="parameters and their sharding (- = replicated)", box=None)
    for column in ("parameter", "count", "shape", "logical axes", "mesh axes", "per device"):
        table.add_column(column, no_wrap=True)
    for row in param_rows(cfg):
        table.add_row(
            row.name,
            str(row.layers),
            _dims(row.shape),
            ",".join(a or "-" for a in row.axes) or "-",
            row.spec,
            _dims(row.device_shape),
        )
    console.print(table)


def _rules_text(table: dict) -> str:
    return ", ".join(f"{k}->{'+'.join(v)}" for k, v in table.items()) or "replicated"


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"
