"""`main.py --summary`: parameter count, FLOPs per token, per-device memory, parameter shardings.

Everything here is computed from the config alone (mesh sizes from `mesh_shape`), so a
summary of a TPU-pod config can be read on a laptop.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from gpt_neo import axes, hardware
from gpt_neo.config import Config
from gpt_neo.mesh import dcn_axes, mesh_axes, padded_vocab, pieces, rules, slice_count
from gpt_neo.models.gpt import FLOP_CONVENTIONS, flops_per_token, param_count
from gpt_neo.models.stack import layer_stacks
from gpt_neo.planning import roofline
from gpt_neo.training.memory import (
    context_attention_bytes,
    context_bytes_sent,
    param_rows,
    plan,
)


def _human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: int) -> str:
    for scale, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n} B"


def _loop_reason(cfg: Config) -> str:
    if cfg.scan_layers is False:
        return "scan_layers is false"
    if cfg.share_parameters:
        return "share_parameters: one block"
    return "the layers repeat no pattern"


def _kv_heads(cfg: Config) -> str:
    if cfg.n_kv_head == cfg.n_head:
        return ""
    return f" ({cfg.n_kv_head} key/value head{'s' if cfg.n_kv_head > 1 else ''})"


def print_summary(cfg: Config, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 120), soft_wrap=True)
    total = param_count(cfg)
    kinds = ", ".join(
        f"{cfg.attention_types.count(k)} {k}" for k in dict.fromkeys(cfg.attention_types)
    )
    console.print(
        f"[bold]GPT-Neo model[/bold]: {cfg.n_layer} layers ({kinds}), n_embd {cfg.n_embd}, "
        f"{cfg.n_head} heads x {cfg.head_dim}{_kv_heads(cfg)}, n_ctx {cfg.n_ctx}, "
        f"n_vocab {cfg.n_vocab}, "
        f"activation {cfg.activation_function}, precision {cfg.precision}"
    )
    console.print(
        f"parameters: {total:,} ({_human(total)}); without position embedding "
        f"{param_count(cfg, include_position_embedding=False):,}"
    )
    stacks = layer_stacks(cfg)
    console.print(
        f"layers run as a Python loop ({_loop_reason(cfg)})"
        if stacks is None
        else f"layers run as one lax.scan: {stacks.period} stack(s) of {stacks.repeats} "
        "(scan_layers)"
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
    crossing = dcn_axes(cfg)
    across = f"; {'+'.join(crossing)} across {slice_count(cfg)} slices (DCN)" if crossing else ""
    console.print(f"mesh: {mesh_text} ({devices or '?'} devices{across})")
    console.print(f"layout (activations): {_rules_text(tables.activations)}")
    parameters = _rules_text(tables.parameters) if cfg.param_layout else "as layout"
    console.print(f"param_layout (parameters): {parameters}")
    if sizes and (split := pieces(sizes, tables.activations, axes.SEQ)) > 1:
        chunks = split if cfg.mlm_training else 2 * split
        order = "in order" if cfg.mlm_training else "2 per device, in causal load-balanced order"
        console.print(
            f"context parallelism ({cfg.context_parallel}): each sequence split {split} ways, "
            f"chunks of {cfg.n_ctx // chunks} tokens ({order}); per train step each device "
            f"sends {_bytes(context_bytes_sent(cfg, sizes))} of keys, values and their "
            f"gradients, and one attention layer works in "
            f"{_bytes(context_attention_bytes(cfg, sizes))}"
        )
    if sizes and cfg.train_batch_size:
        cost = roofline.estimate(cfg, hardware.UNKNOWN)  # bytes do not depend on the chip
        across = (
            f", across slices (DCN) {_bytes(int(cost.dcn_bytes))}: gradient shards summed "
            "inside each slice first"
            + (", and a model-parallel split's traffic" if cost.model_across_slices else "")
            if crossing
            else ""
        )
        console.print(
            f"communication per train step per device, estimated: over the chips' links (ICI) "
            f"{_bytes(int(cost.ici_bytes))}{across}"
        )
    if padded_vocab(cfg) != cfg.n_vocab:
        console.print(
            f"vocabulary: {cfg.n_vocab} tokens, embedding padded to {padded_vocab(cfg)} rows so "
            "that its mesh axes divide it (padding is masked out)"
        )
    estimate = plan(cfg)
    remat = "on" if cfg.recompute_grad else "off"
    parts = " + ".join(f"{name} {_bytes(size)}" for name, size in estimate.lines())
    console.print(
        f"per-device memory ({cfg.opt_name}), estimated: {parts} = "
        f"{_bytes(estimate.train_total)} per train step "
        + ("" if cfg.train_batch_size else "(train_batch_size unset: one sequence per replica) ")
        + f"[dim]({cfg.precision} activations, "
        f"recompute_grad {remat}; --topology compiles it for a TPU slice to check)[/dim]"
    )
    console.print(
        f"sampling, estimated: parameters ({cfg.precision}) "
        f"{_bytes(estimate.decode_parameters)}"
        + (
            f" + gathered whole {_bytes(estimate.decode_gathered)}"
            if estimate.decode_gathered
            else ""
        )
        + f" + KV cache {_bytes(estimate.kv_cache)} (twice: "
        f"the decode loop's input and output) + prefill {_bytes(estimate.prefill_working_set)}"
        f" = {_bytes(estimate.decode_total)} per device ({cfg.predict_batch_size} row(s) x n_ctx)"
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
