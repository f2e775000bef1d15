"""A roofline estimate of one train step: how long its matmuls take at the chip's peak, its
HBM traffic at the memory's bandwidth and its communication at each network's bandwidth
(`gpt_neo.hardware`), and which of them bounds the step. The auto layout ranks splits by it;
`--summary --topology` prints it beside what the compiler says.

It is a model, not a measurement: tensor-parallel all-reduces and MoE all-to-alls sit on the
critical path; gradient all-reduces (or FSDP's gathers and reduce-scatters) overlap with compute,
over the chips' own links (ICI) inside a slice and over the data-centre network (DCN) between
slices (`dcn_axes`), which is 10-100x slower per chip. Gradients are summed inside each slice
first, so what crosses is one shard per device (`gradient_bytes`); a tensor, expert or sequence
split across slices puts all of its traffic on the DCN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp

from gpt_neo import axes, hardware
from gpt_neo.config import Config
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import dcn_axes, mesh_axes, pieces, rules
from gpt_neo.models.gpt import COMPUTE_DTYPES, flops_per_token
from gpt_neo.training.memory import (
    context_bytes_sent,
    memory_per_device,
    num_microbatches,
    weights,
)
from gpt_neo.training.metrics import FLOP_CONVENTION


@dataclass(frozen=True)
class Estimate:
    """Seconds of one train step on one device, by what bounds them (the module docstring)."""

    compute: float  # matmuls at the chip's peak, recomputation included
    memory: float  # HBM traffic: weights read per microbatch and pass, the optimizer update
    data: float  # gradient all-reduces / FSDP gathers and reduce-scatters inside a slice
    tensor: float  # tensor-parallel all-reduces of activations: on the critical path
    experts: float  # MoE all-to-alls of tokens: on the critical path
    ici_bytes: float  # sent over the chips' own links (ICI, NVLink)
    context: float = 0.0  # context-parallel keys and values: the ring overlaps them
    context_overlapped: bool = True
    dcn: float = 0.0  # gradient traffic between slices (`dcn_axes`), at the DCN's bandwidth
    dcn_bytes: float = 0.0  # sent between slices: gradients, and any model-parallel traffic
    model_across_slices: bool = False  # a tensor, expert or sequence split crosses slices

    @property
    def seconds(self) -> float:
        # compute, HBM traffic and gradient traffic (over either network) overlap: the slowest
        # bounds the step
        overlapped = [self.compute, self.memory, self.data, self.dcn]
        exposed = self.tensor + self.experts
        if self.context_overlapped:
            overlapped.append(self.context)
        else:
            exposed += self.context
        return max(overlapped) + exposed

    def why(self) -> str:
        overlapped = {
            "compute": self.compute,
            "HBM": self.memory,
            "gradient traffic": self.data,
            "gradients across slices": self.dcn,
        }
        bound = max(overlapped, key=lambda name: overlapped[name])
        hidden = [f"{name} {duration(t)}" for name, t in overlapped.items() if name != bound and t]
        text = f"{bound} {duration(overlapped[bound])}"
        if hidden:
            text += f" (under it: {', '.join(hidden)})"
        where = " (across slices)" if self.model_across_slices else ""
        if self.tensor:
            text += f" + tensor all-reduces {duration(self.tensor)}{where}"
        if self.experts:
            text += f" + expert all-to-alls {duration(self.experts)}{where}"
        if self.context:
            how = "overlapped" if self.context_overlapped else "gathered"
            text += f" + context keys/values {duration(self.context)} ({how}){where}"
        return text


def estimate(cfg: Config, chip: hardware.Chip) -> Estimate:
    """The roofline estimate of one train step of `cfg` (a concrete mesh and layout)."""
    sizes, batch = mesh_axes(cfg), cfg.train_batch_size
    if sizes is None or not batch:
        raise ConfigError("the roofline estimate needs mesh_shape and train_batch_size set")
    n = math.prod(sizes.values())
    tables, crossing = rules(cfg), dcn_axes(cfg)
    acts = tables.activations
    data, tensor = pieces(sizes, acts, axes.BATCH), pieces(sizes, acts, axes.MLP)
    micro = num_microbatches(cfg, batch, data)
    act = jnp.dtype(COMPUTE_DTYPES[cfg.precision]).itemsize
    passes = 3 if cfg.recompute_grad else 2  # forward, (recomputed forward,) backward
    tokens = batch * cfg.n_ctx
    # 6N+12LHQT counts a forward and a backward pass; a recomputed forward adds a third of it
    flops = (
        flops_per_token(cfg, FLOP_CONVENTION) * tokens / n * (4 / 3 if cfg.recompute_grad else 1)
    )
    residual = tokens / data * cfg.n_embd * act  # this device's residual stream, whole step

    # Megatron: two all-reduces of the residual stream per block and pass
    tensor_bytes = cfg.n_layer * 2 * passes * all_reduce_bytes(residual, tensor)
    experts = pieces(sizes, acts, axes.EXPERTS) if cfg.moe_layers else 1
    expert_bytes = 0.0
    if experts > 1:  # dispatch and combine, each pass, of each token's copies
        copies = residual * cfg.moe.experts_per_token
        expert_bytes = len(cfg.moe_layers) * 2 * passes * copies * (experts - 1) / experts
    context_bytes = context_bytes_sent(cfg, sizes, micro)
    used = weights(cfg, every_layer=True).gathered  # what the matmuls read: split by tensor only
    grad_ici, grad_dcn = gradient_bytes(cfg, sizes, crossing, used, micro, passes, act)
    # HBM: each microbatch reads the weights its matmuls use once per pass; the optimizer
    # reads parameters, moments and gradients and writes parameters and moments (float32)
    stored = memory_per_device(cfg)
    update_bytes = 2 * (stored["parameters"] + stored["optimizer state"]) + stored["parameters"]
    hbm_bytes = micro * passes * used * act + update_bytes

    # a tensor, expert or sequence split with an axis across slices: all of its traffic at the
    # DCN's speed (the slowest hop bounds each collective)
    model = {axes.MLP: tensor_bytes, axes.EXPERTS: expert_bytes, axes.SEQ: context_bytes}
    across = {dim: any(a in crossing for a in acts.get(dim, ())) for dim in model}
    model_dcn = sum(b for dim, b in model.items() if across[dim])
    model_ici = sum(model.values()) - model_dcn

    def seconds(dim: str) -> float:
        return model[dim] / (chip.dcn_bandwidth if across[dim] else chip.link_bandwidth)

    return Estimate(
        compute=flops / chip.peak_flops,
        memory=hbm_bytes / chip.hbm_bandwidth,
        tensor=seconds(axes.MLP),
        experts=seconds(axes.EXPERTS),
        data=grad_ici / chip.link_bandwidth,
        ici_bytes=grad_ici + model_ici,
        context=seconds(axes.SEQ),
        context_overlapped=cfg.context_parallel == "ring",
        dcn=grad_dcn / chip.dcn_bandwidth,
        dcn_bytes=grad_dcn + model_dcn,
        model_across_slices=any(b and across[dim] for dim, b in model.items()),
    )


def gradient_bytes(
    cfg: Config,
    sizes: dict[str, int],
    crossing: tuple[str, ...],
    used: float,
    micro: int,
    passes: int,
    act: int,
) -> tuple[float, float]:
    """Bytes one device sends per step to sum the gradients of the `used` weight elements (as
    the matmuls read them) over the devices that hold other tokens (batch and sequence
    splits), as (inside a slice, across slices). Hierarchical, as XLA compiles it: FSDP gathers weights per pass and reduce-scatters gradients over its axes; the
    remaining token axes all-reduce each device's gradient shard, inside the slice first, then
    once over the DCN with what is left (a 1/ICI-ways piece)."""
    tables = rules(cfg)

    def ways(table: dict, dims: tuple[str, ...]) -> tuple[int, int]:
        names = {a for d in dims for a in table.get(d, ()) if a in sizes}
        dcn = math.prod(sizes[a] for a in names if a in crossing)
        return math.prod(sizes[a] for a in names) // dcn, dcn

    token_ici, token_dcn = ways(tables.activations, (axes.BATCH, axes.SEQ))
    fsdp_ici, fsdp_dcn = ways(tables.parameters, (axes.EMBD,)) if cfg.param_layout else (1, 1)
    fsdp_ici, fsdp_dcn = min(fsdp_ici, token_ici), min(fsdp_dcn, token_dcn)
    rest_ici, rest_dcn = token_ici // fsdp_ici, token_dcn // fsdp_dcn
    per_weight = passes * act + 4  # gathered per pass, float32 gradient reduce-scattered
    # inside a slice: float32 gradients (per microbatch, inside the accumulation loop)
    ici = micro * (fsdp_ici - 1) / fsdp_ici * used * per_weight
    ici += micro * all_reduce_bytes(used * 4 / (fsdp_ici * fsdp_dcn), rest_ici)
    # across slices, as the compiled TPU program sends them (tests/test_multi_slice.py): each
    # device's piece in the compute dtype, but the token embedding's in float32 and twice (the
    # lookup's scatter-add and the output head's matmul are reduced apart)
    embedding = weights(cfg, lambda name: name == "wte", every_layer=True).gathered
    dcn = micro * (fsdp_dcn - 1) / fsdp_dcn * used / fsdp_ici * per_weight
    piece = ((used - embedding) * act + 2 * embedding * 4) / (fsdp_ici * fsdp_dcn * rest_ici)
    dcn += micro * all_reduce_bytes(piece, rest_dcn)
    return ici, dcn


def all_reduce_bytes(size: float, ways: int) -> float:
    """Bytes one device sends in a ring all-reduce of `size` bytes over `ways` devices."""
    return 2 * (ways - 1) / ways * size


def duration(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    return f"{seconds * 1e3:.0f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"
