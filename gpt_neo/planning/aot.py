"""Compiling for a TPU slice that is not here: `--summary --topology v5e:2x2`.

With libtpu installed beside JAX (`pip install .[tpu]`), `jax.experimental.topologies`
describes the devices of any slice on any machine, and `jit(...).lower(...).compile()` against a
mesh of them runs the real TPU compiler. Its `memory_analysis()` is exact for that compiler and
its `cost_analysis()` counts the compiled FLOPs (recomputation included), so "will this config
fit on that slice?" is answered before a slice is rented.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from gpt_neo import axes, hardware
from gpt_neo.config import Config
from gpt_neo.data.batch import Batch
from gpt_neo.errors import ConfigError, first_line
from gpt_neo.inference import sample
from gpt_neo.mesh import (
    activation_sharding,
    data_parallel_size,
    make_mesh,
    mesh_axes,
    padded_vocab,
    slice_count,
)
from gpt_neo.models import context
from gpt_neo.models.attention import resolve_kernel
from gpt_neo.models.gpt import COMPUTE_DTYPES, abstract_params, flops_per_token, layer_decls
from gpt_neo.models.loss import logits_split, loss_chunks
from gpt_neo.models.stack import layer_stacks
from gpt_neo.planning import roofline
from gpt_neo.planning.roofline import duration
from gpt_neo.training.memory import plan
from gpt_neo.training.metrics import FLOP_CONVENTION
from gpt_neo.training.trainer import Trainer

EXAMPLES = "v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x4, v6e:4x4"


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The devices of the TPU slice `name` (e.g. "v5e:2x2"), `num_slices` of them, without a
    TPU. A `ConfigError` for a name the TPU runtime does not know, or without libtpu."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: we are not on a VM
    # compiling only, never running: do not take (or wait for) libtpu's one-process-per-host
    # lock, which a training job on this machine, or another compile, may hold
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--topology compiles with the TPU compiler, which comes with libtpu: "
            "pip install '.[tpu]' (or the test extra)"
        ) from None
    try:
        topology = _megacore_topology(topologies, name, num_slices)
    except Exception as err:  # the runtime raises bare errors for names it does not know
        raise ConfigError(
            f"--topology {name}: the TPU runtime does not know it ({first_line(err, 160)}); give a "
            f"generation and chip grid, e.g. {EXAMPLES}"
        ) from None
    return list(topology.devices)


def _megacore_topology(topologies, name: str, num_slices: int):
    """The slice as a TPU VM sees it. A chip with two TensorCores that its VMs run as one
    device (megacore: v4, v5p; Google's v4 docs: a v4-8 VM lists 4 devices) comes out of
    libtpu's topology description as two devices unless its "megacore" chip configuration is
    asked for; chips without one (v2 and v3, whose VMs list each core, and the single-core
    v5e and v6e) have no such configuration and get the default. libtpu 0.0.x: v4:2x2x1 gives
    8 devices by default, 4 as megacore; v5p:2x2x1 gives 4 either way; v3:2x2 gives 8."""
    try:
        return topologies.get_topology_desc(
            topology_name=name, platform="tpu", num_slices=num_slices, chip_config_name="megacore"
        )
    except Exception as err:
        if "chip_configs_megacore" not in str(err):
            raise
    return topologies.get_topology_desc(topology_name=name, platform="tpu", num_slices=num_slices)


@dataclass(frozen=True)
class Compiled:
    """What the TPU compiler says about one program, per device."""

    arguments: int  # bytes
    temporaries: int
    outputs: int
    aliased: int  # outputs that reuse donated arguments' buffers
    flops: float  # per device, recomputation included
    seconds: float  # lowering + compilation
    # what crosses slices (`dcn_axes`) per step: the operands of the program's transfers over
    # the data-centre network, per kind ("ALL_REDUCE", ...) -> (count, bytes) (`dcn_transfers`)
    dcn: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries + self.outputs - self.aliased


def _slice_mesh(cfg: Config, devices: list):
    sizes = mesh_axes(cfg) or {"x": len(devices)}
    if (needed := math.prod(sizes.values())) != len(devices):
        raise ConfigError(
            f"mesh_shape '{cfg.mesh_shape}' needs {needed} devices, the topology has "
            f"{len(devices)}: pick a mesh_shape whose sizes multiply to {len(devices)}"
        )
    return make_mesh(cfg, devices)


# The TPU scheduler spends free HBM on overlap: it starts buffers early (the output buffers of
# collective matmuls, prefetches) up to a memory limit, by default most of the chip's HBM. So
# a program far below HBM can compile to 3x the memory it needs (6.7B's shape at 8 layers, FSDP
# over 16 chips: 3.72 GiB of temporaries by default, 1.23 GiB at the lowest limit, libtpu
# 0.0.52). Setting the limit to its lowest asks for the least memory the compiler can schedule
# the program in: what "will it fit?" turns on, since the scheduler only fills headroom.
LEAST_MEMORY_OPTIONS = {"xla_tpu_scheduler_percent_shared_memory_limit": 1}


def _analysed(lowered, start: float, flops_scale=None, *, least_memory: bool = False) -> Compiled:
    """Compile `lowered`; `flops_scale(flops, program_text)` corrects XLA's FLOP count;
    `least_memory` compiles under the scheduler's lowest memory limit (LEAST_MEMORY_OPTIONS)."""
    try:
        compiled = lowered.compile(compiler_options=LEAST_MEMORY_OPTIONS if least_memory else None)
    except Exception as err:  # XLA raises bare runtime errors; only running out of HBM is ours
        if (problem := _out_of_memory(err)) is not None:
            raise problem from None
        raise
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    flops = float(cost.get("flops", 0.0))
    text = compiled.as_text()
    return Compiled(
        arguments=memory.argument_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        flops=flops_scale(flops, text) if flops_scale else flops,
        seconds=seconds,
        dcn=dcn_transfers(text),
    )


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def dcn_transfers(program_text: str) -> dict[str, tuple[int, int]]:
    """The transfers across slices per step of a compiled TPU program: libtpu sends them
    through its data-centre network runtime, as host-transfer `send`s marked
    `_xla_megascale_transfer_type`. Per kind, (how many, bytes of their operands), a send
    inside a loop (the scanned layers' backward pass) counted once per trip."""
    computations = _computations(program_text)
    found: dict[str, tuple[int, int]] = {}
    for name, times in _runs_per_step(computations).items():
        for line in computations[name]:
            kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
            operand = re.search(r"= \((\w+)\[([\d,]*)\]", line)
            if kind and operand and " send(" in line:
                dtype, dims = operand.groups()
                size = math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
                count, total = found.get(kind.group(1), (0, 0))
                found[kind.group(1)] = (count + times, total + times * size)
    return found


def _computations(program_text: str) -> dict[str, list[str]]:
    """The program's computations by name ("ENTRY" for the entry one): their lines."""
    computations: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in program_text.splitlines():
        header = re.match(r"(ENTRY )?%([\w.-]+) \(.*\{$", line)
        if header:
            lines = computations.setdefault("ENTRY" if header.group(1) else header.group(2), [])
        elif line.startswith("  "):
            lines.append(line)
    return computations


def _runs_per_step(computations: dict[str, list[str]]) -> dict[str, int]:
    """How often each computation reachable from the entry runs per call of the program: a
    while loop's body as often as the loop's trips (its condition's bound less the counter's
    start, both constants), times the runs of the computation holding the loop."""
    runs: dict[str, int] = {}
    pending = [("ENTRY", 1)]
    while pending:
        name, times = pending.pop()
        if name not in computations or runs.get(name, 0) >= times:
            continue
        runs[name] = times
        lines = computations[name]
        for line in lines:
            loop = re.search(r"while\(%([\w.-]+)\), condition=%([\w.-]+), body=%([\w.-]+)", line)
            if loop:
                init, condition, body = loop.groups()
                pending.append((body, times * _trips(lines, init, computations.get(condition, []))))
            for called in re.findall(r"(?:calls|to_apply)=%([\w.-]+)", line):
                pending.append((called, times))
    return runs


def _trips(lines: list[str], init: str, condition: list[str]) -> int:
    """A while loop's trip count: `counter < bound` in its condition, the counter starting at
    the constant its initial tuple's first element is a (copy of a) constant of; 1 where the
    program is not of that form."""
    bound = next((m for line in condition if (m := re.search(r"constant\((\d+)\)", line))), None)
    if not bound or not any("direction=LT" in line for line in condition):
        return 1
    defined = {
        m.group(1): line for line in lines if (m := re.match(r"  (?:ROOT )?%([\w.-]+) = ", line))
    }
    first = re.search(r" tuple\(%([\w.-]+)", defined.get(init, ""))
    name = first.group(1) if first else ""
    for _ in range(4):  # through copies and bitcasts to the constant
        line = defined.get(name, "")
        if value := re.search(r" constant\((\d+)\)", line):
            return max(int(bound.group(1)) - int(value.group(1)), 1)
        operand = re.search(r" (?:copy|bitcast)\(%([\w.-]+)\)", line)
        if not operand:
            break
        name = operand.group(1)
    return 1


def compile_train_step(cfg: Config, devices: list, *, least_memory: bool = False) -> Compiled:
    """Compile the train step of `cfg` for `devices` (a slice's, from `topology_devices`), on
    the batches its data makes (`abstract_batch`); `least_memory`: under the scheduler's lowest
    memory limit (see LEAST_MEMORY_OPTIONS)."""
    mesh = _slice_mesh(cfg, devices)
    start = time.perf_counter()
    # built outside set_mesh: the optimizer's init makes concrete arrays on this machine
    trainer = Trainer(cfg, mesh)
    state = trainer.abstract_state()
    with jax.set_mesh(mesh):  # the model's kernel choices read the mesh's platform: TPU
        lowered = trainer.step.lower(state, abstract_batch(cfg, trainer))
        micro_batch = trainer.batch_size // trainer.n_micro
        chunks = loss_chunks(cfg, micro_batch, cfg.n_ctx, padded_vocab(cfg))
        dtype = COMPUTE_DTYPES[cfg.precision]
        # XLA counts no FLOPs inside a fused kernel (splash, cuDNN): neither does `repeat_flops`
        if (split := context.context_size(cfg)) > 1:  # the kernel of a split's global blocks
            xla_attention = context.block_kernel(cfg, None, cfg.n_ctx // split) == "xla"
        else:
            xla_attention = resolve_kernel(cfg, dtype, cfg.n_ctx, cfg.attn_dropout > 0) == "xla"
    chunk_flops = head_flops(cfg, micro_batch, mesh) / chunks
    stacks = layer_stacks(cfg)

    def trip_counts(flops: float, program_text: str) -> float:
        # XLA's cost analysis counts a loop's body once. The loss's chunk loop runs `chunks`
        # times, inside the microbatch loop, which runs n_micro times (the optimizer update
        # outside it costs a few FLOPs per parameter: not worth a term). The compiler unrolls
        # some loops: then no loop carries the stacked slices, and nothing is scaled. The
        # scanned layers' loops (forward and backward) run once per repeat of the pattern; the
        # repeats the count leaves out are the model's FLOPs for them (see `repeat_flops`).
        if stacks and _has_loop_over(program_text, stacks.repeats):
            per_repeat = repeat_flops(cfg, micro_batch, len(devices), attention=xla_attention)
            flops += (stacks.repeats - 1) * per_repeat
        if chunks > 1 and _has_loop_over(program_text, chunks):
            flops += (chunks - 1) * chunk_flops
        if trainer.n_micro > 1 and _has_loop_over(program_text, trainer.n_micro):
            flops *= trainer.n_micro
        return flops

    return _analysed(lowered, start, trip_counts, least_memory=least_memory)


def abstract_batch(cfg: Config, trainer: Trainer) -> Batch:
    """The shape of a training batch: tokens, and segment ids where a dataset entry is
    `packed` (what the step compiles for; no data is read)."""
    rows = jax.ShapeDtypeStruct(
        (trainer.batch_size, cfg.n_ctx + 1), jnp.int32, sharding=trainer.batch_sharding
    )
    packed = any(entry.sampling_mode == "packed" for entry in cfg.datasets)
    return Batch(rows, rows if packed else None)


def _has_loop_over(program_text: str, trips: int) -> bool:
    """Whether a while loop of the compiled program carries an array stacked `trips` deep
    (a `lax.scan` over `trips` slices that the compiler kept as a loop)."""
    stacked = re.compile(rf"\[{trips},\d")
    return any(stacked.search(line) for line in program_text.splitlines() if " while(" in line)


def head_flops(cfg: Config, batch: int, mesh) -> float:
    """Per-device FLOPs of the output head's three matmuls (logits, their gradients with
    respect to the hidden states and to the weights) for `batch` sequences."""
    work = 3 * 2 * batch * cfg.n_ctx * padded_vocab(cfg) * cfg.n_embd
    return work / logits_split(cfg, dict(mesh.shape))


def repeat_flops(cfg: Config, batch: int, devices: int, *, attention: bool = True) -> float:
    """Per-device training FLOPs of one repeat of the scanned layers' pattern for `batch`
    sequences, counted as XLA counts a block: per token and layer, two per matrix weight (the
    active ones in an MoE layer) and, with `attention` (XLA's attention, not a fused kernel's),
    four per key a query reads per head dimension (all n_ctx in a global layer, the two
    windows of the blocked local attention); three passes (forward, and the backward's two
    products), four with `recompute_grad`."""
    stacks = layer_stacks(cfg)
    assert stacks is not None
    per_token = 0.0
    pattern = layer_decls(cfg)["blocks"][: stacks.period]
    for kind, block in zip(cfg.attention_types, pattern, strict=False):
        matrices = sum(math.prod(d.shape) for d in jax.tree.leaves(block) if len(d.shape) >= 2)
        if "moe" in block:
            hp = cfg.moe
            idle = hp.moe_num_experts - hp.experts_per_token
            matrices -= idle * 2 * cfg.n_embd * hp.moe_hidden_size
        keys = {"global": cfg.n_ctx, "local": min(cfg.n_ctx, 2 * cfg.local_attention_radius)}
        per_token += 2 * matrices
        if attention:
            per_token += 4 * keys.get(kind, 0) * cfg.n_head * cfg.head_dim
    passes = 4 if cfg.recompute_grad else 3
    return passes * per_token * batch * cfg.n_ctx / devices


def compile_decode(cfg: Config, devices: list) -> Compiled:
    """Compile sampling (`--predict`: prefill half the context, then decode the other half
    with the KV cache, in one while loop) for `devices`, with `predict_batch_size` prompts."""
    mesh = _slice_mesh(cfg, devices)
    start = time.perf_counter()
    batch = -(-cfg.predict_batch_size // data_parallel_size(cfg, mesh)) * data_parallel_size(
        cfg, mesh
    )
    prompt = cfg.n_ctx // 2
    decoder = sample.Decoder(cfg, sample.Sampling(), cfg.n_ctx - prompt, cfg.eos_id)
    dtype = COMPUTE_DTYPES[cfg.precision]
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding),
        abstract_params(cfg, mesh),
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    args = (
        params,
        jax.ShapeDtypeStruct(
            (batch, prompt), jnp.int32, sharding=activation_sharding(mesh, cfg, axes.TOKENS)
        ),
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=replicated),
        jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated),
    )
    with jax.set_mesh(mesh):
        lowered = jax.jit(decoder.run).lower(*args)
    return _analysed(lowered, start)


def hbm_bytes(devices: list) -> int | None:
    """Per-chip HBM that programs may use, or None for a chip `gpt_neo.hardware` does not know."""
    return hardware.memory_limit(devices[0])


def report(
    cfg: Config, topology: str, devices: list, train: Compiled, decode: Compiled | None = None
) -> list[str]:
    """The lines `--summary --topology` prints."""
    gib = 2**30
    kind = devices[0].device_kind
    hbm = hbm_bytes(devices)
    estimate = plan(cfg)

    def fits(total: int) -> str:
        return "?" if hbm is None else ("fits" if total <= hbm else "DOES NOT FIT")

    hbm_text = f"HBM {hbm / gib:.2f} GiB" if hbm else f"HBM unknown for {kind}"
    tokens = (cfg.train_batch_size or 0) * cfg.n_ctx
    model_flops = flops_per_token(cfg, FLOP_CONVENTION) * tokens / len(devices)
    peak = known.peak_flops if (known := hardware.chip(kind)) else None
    lines = [
        f"compiled the train step for {topology} ({len(devices)} x {kind}) in "
        f"{train.seconds:.1f}s; per device: arguments {train.arguments / gib:.2f} GiB, "
        f"temporaries {train.temporaries / gib:.2f} GiB, outputs {train.outputs / gib:.2f} GiB "
        f"({train.aliased / gib:.2f} GiB of them in donated argument buffers)",
        f"per-device memory: estimated {estimate.train_total / gib:.2f} GiB, compiled "
        f"{train.total / gib:.2f} GiB, {hbm_text}: {fits(train.total)}",
        f"FLOPs per step per device: compiled {train.flops:.3e}, model {model_flops:.3e} "
        f"({FLOP_CONVENTION}; compiled/model {train.flops / max(model_flops, 1):.2f}: above 1 "
        "where recomputation adds work, below where Pallas kernels hide theirs)",
    ]
    if peak:
        # the compiler counts no FLOPs inside Pallas kernels (splash attention), so the compiled
        # count can fall below the model's; the estimate takes the larger
        work = max(train.flops, model_flops)
        lines.append(
            f"roofline ESTIMATE (compute-bound at the {peak / 1e12:.0f} TFLOP/s bf16 peak, no "
            f"communication or memory stalls): {work / peak * 1e3:.1f} ms/step, MFU at most "
            f"{100 * model_flops / work:.0f}%"
        )
    if known and cfg.train_batch_size:
        lines += _traffic_lines(cfg, known, train)
    if decode is not None:
        lines.append(
            f"compiled sampling ({cfg.predict_batch_size} prompt(s) of {cfg.n_ctx // 2} tokens, "
            f"{cfg.n_ctx - cfg.n_ctx // 2} new, KV cache) in {decode.seconds:.1f}s; per-device "
            f"memory: estimated {estimate.decode_total / gib:.2f} GiB, compiled "
            f"{decode.total / gib:.2f} GiB, {hbm_text}: {fits(decode.total)}"
        )
    return lines


def _traffic_lines(cfg: Config, chip: hardware.Chip, train: Compiled) -> list[str]:
    """The roofline's communication figures, inside a slice and across slices, and what the
    compiled program sends across slices."""
    cost = roofline.estimate(cfg, chip)
    mib = 2**20
    lines = [
        f"communication per step per device, ESTIMATED: {cost.ici_bytes / mib:,.1f} MiB over the "
        f"chips' links (ICI, {chip.link_bandwidth / 1e9:.0f} GB/s), {cost.dcn_bytes / mib:,.1f} "
        f"MiB across slices (DCN, {chip.dcn_bandwidth / 1e9:.3g} GB/s per chip)",
        f"step time ESTIMATE with communication (the planner's roofline: {FLOP_CONVENTION}, "
        f"recomputation counted): {duration(cost.seconds)}, bound by {cost.why()}",
    ]
    if train.dcn:
        sends = ", ".join(f"{n} {kind.lower()}" for kind, (n, _) in train.dcn.items())
        total = sum(size for _, size in train.dcn.values())
        slices = slice_count(cfg)
        sent = roofline.all_reduce_bytes(total, slices)
        lines.append(
            f"across slices in the compiled program: {sends} ({total / mib:,.1f} MiB of "
            f"operands; a ring over {slices} slices sends {sent / total:.2g}x that per device, "
            f"{sent / mib:,.1f} MiB)"
        )
    return lines


class DoesNotFit(ConfigError):
    """The TPU compiler ran out of the chip's HBM."""


def _out_of_memory(error: Exception) -> DoesNotFit | None:
    """The TPU compiler's out-of-memory error as one line that names the fixes, or None."""
    text = str(error)
    if not any(m in text for m in ("RESOURCE_EXHAUSTED", "HbmOom", "exceeds available HBM")):
        return None
    # "... the total memory required for HLO temporaries (42.88G) exceeds available HBM (15.75G)."
    detail = re.search(r"required for ([^(]*)\(([^)]*)\) exceeds available HBM \(([^)]*)\)", text)
    what = (
        f": XLA needs {detail.group(2)} for {detail.group(1).strip()} per chip, which has "
        f"{detail.group(3)}"
        if detail
        else ""
    )
    return DoesNotFit(
        f'does not fit in the chips\' memory{what}. Let the library search ("layout": "auto"), '
        "split the weights over more chips (FSDP: "
        '"param_layout": "embd:x"), set "recompute_grad": true, lower train_batch_size or set '
        "tokens_per_mb_per_replica (microbatches), or use a bigger slice"
    )
