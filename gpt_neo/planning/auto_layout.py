"""`"mesh_shape": "auto"`, `"layout": "auto"`, `"param_layout": "auto"`: the library chooses
how to split a run over the devices present, or over a TPU slice named by `--topology`.

The search has three steps:
1. **Enumerate** every way to give each mesh axis a job, with the options that go with it:
   - data parallel: the axis splits the batch;
   - tensor parallel, Megatron-style: it splits attention heads, the MLP's hidden layer and the
     vocabulary (and each expert's hidden layer);
   - FSDP or not: weights split over the data axes too, `param_layout: "embd:<data axes>"`;
   - for MoE models, experts over the data axes (expert parallelism) or not;
   - microbatches (`tokens_per_mb_per_replica`), when that key is unset.
   `mesh.check_layout` drops what cannot work (a dimension its axes do not divide).
2. **Rank** by whether the planner's memory fits the chip (its accuracy against the compiler,
   `PLANNER_MARGIN`, separates "fits" from "may fit"), then without a model-parallel split
   across slices before with one, then without a sequence split before with one, then by a
   roofline estimate of the step time (`roofline.estimate`), then by fewer microbatches, fewer bytes
   sent (over the data-centre network, then the chips' links) and less memory.
3. **Confirm** by compiling the best candidate's train step for those devices (a TPU slice's
   ahead of time, or the ones present) and keeping it if the compiler's memory fits the chip;
   else the next one, `CONFIRM_TRIES` at most.

With `mesh_shape: "auto"` the mesh axes are called `data` and `tensor`; with a given
`mesh_shape`, only its axes' jobs are chosen. The result is an ordinary config: the chosen
values are printed, recorded with the run, and can be pinned in the JSON to skip the search.

The step time is `gpt_neo.planning.roofline`'s estimate, not a measurement. Across slices
(`--num_slices`) a chosen mesh starts with a `slice` axis that crosses them (`dcn_axes`); FSDP
splits weights inside a slice only. A tensor, expert or sequence split across slices would put
all of its traffic on the slow data-centre network, so such a split ranks after every other
that fits.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import jax

from gpt_neo import axes, hardware
from gpt_neo.config import Config, auto_keys, layer_period
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import (
    check_layout,
    parse_mesh_shape,
    rules,
    slice_groups,
)
from gpt_neo.planning import aot, roofline
from gpt_neo.planning.roofline import duration
from gpt_neo.training.memory import (
    MemoryPlan,
    num_microbatches,
    plan,
)

DATA_AXIS, TENSOR_AXIS, SEQUENCE_AXIS = "data", "tensor", "context"  # the axes it shapes
SLICE_AXIS = "slice"  # across TPU slices (`dcn_axes`): data parallel unless nothing else fits
JOBS = ("data", "tensor", "sequence")  # what a given mesh axis may do
TENSOR_DIMS = ("heads", "intermediate_expanded", "vocab")  # Megatron's splits, GPT-Neo names
PLANNER_MARGIN = 0.10  # the planner against the compiler (tests/training/test_memory.py)
CONFIRM_TRIES = 3
MAX_MICROBATCHES = 64
SHOWN = 5
GIB = 2**30


@dataclass(frozen=True)
class Split:
    """One way to split a run: the mesh, which axes carry which job, and the options."""

    mesh: tuple[tuple[str, int], ...]  # (axis, size), outermost first
    data: tuple[str, ...]  # axes that split the batch
    tensor: tuple[str, ...]  # axes that split heads, MLP hidden and vocabulary
    fsdp: bool = False
    experts_on_data: bool = False
    microbatches: int = 1
    sequence: tuple[str, ...] = ()  # axes that split each sequence (context parallelism)

    @property
    def data_size(self) -> int:
        """Data-parallel replicas: the product of the data axes' sizes."""
        return math.prod(dict(self.mesh)[a] for a in self.data)

    def describe(self) -> str:
        jobs = [
            f"{name}:{size} {self._job(name)}-parallel"
            for name, size in self.mesh
            if name in self.data + self.tensor + self.sequence
        ]
        text = " + ".join(jobs) or "one device"
        if self.fsdp:
            text += ", FSDP"
        if self.experts_on_data:
            text += ", experts on the data axes"
        if self.microbatches > 1:
            text += f", {self.microbatches} microbatches"
        return text

    def _job(self, axis: str) -> str:
        return "data" if axis in self.data else "tensor" if axis in self.tensor else "sequence"


@dataclass(frozen=True)
class Candidate:
    split: Split
    cfg: Config  # the config with the split's values
    memory: MemoryPlan
    cost: roofline.Estimate
    limit: int | None  # bytes per device, None: not limited

    @property
    def tier(self) -> int:
        """0: the planner says it fits; 1: it says not, by less than its own error margin (the
        compiler may disagree); 2: it does not fit."""
        if self.limit is None or self.memory.train_total <= self.limit:
            return 0
        return 1 if self.memory.train_total <= (1 + PLANNER_MARGIN) * self.limit else 2

    @property
    def unrolled(self) -> bool:
        """Whether layers that repeat run unrolled (`scan_layers: false`, `_layer_layouts`)."""
        return self.cfg.scan_layers is False and _repeats(self.cfg)

    def rank_key(self):
        return (
            self.tier,
            # a model-parallel split over the data-centre network only where nothing else fits
            self.cost.model_across_slices,
            # a sequence split only where nothing else fits as well: it adds traffic that the
            # roofline may hide, and per-chunk attention (gpt_neo.models.context)
            bool(self.split.sequence),
            self.cost.seconds,
            self.unrolled,  # the same split scanned compiles faster
            self.split.microbatches,
            self.cost.dcn_bytes,
            self.cost.ici_bytes,
            self.memory.train_total,
        )

    def why(self) -> str:
        total, limit = self.memory.train_total, self.limit
        if limit is None:
            memory = "memory not limited"
        elif self.tier == 0:
            memory = f"fits, {_size(limit - total)} spare"
            if total > (1 - PLANNER_MARGIN) * limit:
                memory += " (tight: within the planner's error)"
        elif self.tier == 1:
            memory = f"may fit: {_size(total - limit)} over, within the planner's error"
        else:
            memory = f"does not fit: needs {_size(total)} of {_size(limit)}"
        return f"{memory}; {self.cost.why()}"


@dataclass
class Choice:
    chosen: Candidate
    ranked: list[Candidate]
    devices: str  # "4 x TPU v5 lite"
    keys: tuple[str, ...]
    compiled: aot.Compiled | None = None  # the chosen train step, when confirmed by compiling
    verdicts: dict[int, str] = field(default_factory=dict)  # index in ranked -> compile result

    @property
    def cfg(self) -> Config:
        return self.chosen.cfg

    def lines(self) -> list[str]:
        limit = self.chosen.limit
        memory = f"{_size(limit)} each" if limit else "memory not limited"
        shown = list(range(min(SHOWN, len(self.ranked))))
        naive = next((i for i, c in enumerate(self.ranked) if _is_naive(c.split)), None)
        if naive is not None and naive not in shown:
            shown.append(naive)
        labels = {
            i: self.ranked[i].split.describe()
            + (", layers unrolled" if self.ranked[i].unrolled else "")
            + (" (naive)" if i == naive else "")
            for i in shown
        }
        width = max(map(len, labels.values()))
        lines = [
            f"auto layout ({', '.join(self.keys)}): {len(self.ranked)} candidates for "
            f"{self.devices} ({memory}); memory from the planner, step time a roofline ESTIMATE",
            f"  {'#':>2}  {'split':<{width}} {'memory':>10} {'step':>9}  why",
        ]
        for i in shown:
            c = self.ranked[i]
            why = c.why() + (f"; {self.verdicts[i]}" if i in self.verdicts else "")
            lines.append(
                f"  {i + 1:>2}  {labels[i]:<{width}} {_size(c.memory.train_total):>10} "
                f"{duration(c.cost.seconds):>9}  {why}"
            )
        keys = (*self.keys, "scan_layers") if self.chosen.unrolled else self.keys
        pinned = ", ".join(f'"{key}": {_json(getattr(self.cfg, key))}' for key in keys)
        lines.append(
            f"chosen #{self.ranked.index(self.chosen) + 1}: {pinned} (set these in the config "
            "to skip the search)"
        )
        return lines


def _json(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value) if isinstance(value, int) else f'"{value}"'


def _size(size: float) -> str:
    if size >= GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size / 1024:.0f} KiB"


def _is_naive(split: Split) -> bool:
    """Every device data-parallel, weights whole on each, one microbatch: the layout a user
    who sets nothing gets."""
    return not (split.tensor or split.fsdp or split.experts_on_data) and split.microbatches == 1


# --------------------------------------------------------------------------------------------
# Enumerate


def splits(cfg: Config, n_devices: int, slices: int = 1) -> list[Split]:
    """Every split the search considers for `cfg` on `n_devices` in `slices` TPU slices (before
    `check_layout`). A chosen mesh starts with a `slice` axis across slices (`dcn_axes`); an
    axis across slices may carry any job, and `Candidate.rank_key` puts data parallelism there
    first."""
    keys = auto_keys(cfg)
    if "mesh_shape" in keys:
        meshes = []
        per_slice = n_devices // slices
        across = ((SLICE_AXIS, slices),) if slices > 1 else ()
        slice_jobs = ("data", "tensor") if across else ("data",)
        for second, size, slice_job in itertools.product(
            (TENSOR_AXIS, SEQUENCE_AXIS), _divisors(per_slice), slice_jobs
        ):
            if second == SEQUENCE_AXIS and size == 1:
                continue  # the same mesh as tensor:1
            shape = {DATA_AXIS: per_slice // size, second: size}
            inside = tuple((a, s) for a, s in shape.items() if s > 1)
            mesh = (*across, *inside) or ((DATA_AXIS, 1),)
            named = dict(mesh)
            data, tensor, sequence = (
                (a,) if a in named else () for a in (DATA_AXIS, TENSOR_AXIS, SEQUENCE_AXIS)
            )
            if slice_job == "data":
                data = (*(a for a, _ in across), *data)
            else:
                tensor = (*(a for a, _ in across), *tensor)
            meshes.append((mesh, data, tensor, sequence))
    else:
        sizes = parse_mesh_shape(cfg.mesh_shape) if cfg.mesh_shape else {"x": n_devices}
        mesh = tuple(sizes.items())
        if "layout" in keys:  # every assignment of data/tensor/sequence to the given axes
            meshes = []
            for jobs in itertools.product(JOBS, repeat=len(mesh)):
                data, tensor, sequence = (
                    tuple(a for (a, _), j in zip(mesh, jobs, strict=True) if j == job)
                    for job in JOBS
                )
                meshes.append((mesh, data, tensor, sequence))
        else:  # only param_layout: the layout's batch and sequence axes stay as they are
            current = rules(cfg.replace(param_layout=None)).activations
            data, sequence = current.get(axes.BATCH, ()), current.get(axes.SEQ, ())
            meshes = [(mesh, data, (), sequence)]
    choose_fsdp = "param_layout" in keys
    choose_experts = "layout" in keys and bool(cfg.moe_layers)
    result = []
    for mesh, data, tensor, sequence in meshes:
        for fsdp, experts, micro in itertools.product(
            (False, True) if choose_fsdp and (data or sequence) else (False,),
            (False, True) if choose_experts and data else (False,),
            _microbatch_options(cfg, Split(mesh, data, tensor).data_size),
        ):
            result.append(Split(mesh, data, tensor, fsdp, experts, micro, sequence))
    return result


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def required_batch(cfg: Config) -> int:
    """`train_batch_size`, which the search needs (`choose_layout` checks it is set)."""
    if not cfg.train_batch_size:
        raise ConfigError("auto layout needs train_batch_size in the config")
    return cfg.train_batch_size


def _microbatch_options(cfg: Config, data_size: int) -> list[int]:
    """Microbatch counts to try: powers of two dividing each replica's batch, or the one that
    `tokens_per_mb_per_replica` gives when the config sets it."""
    batch = required_batch(cfg)
    per_replica = batch // data_size
    if "tokens_per_mb_per_replica" not in auto_keys(cfg) or per_replica < 1:
        return [num_microbatches(cfg, batch, data_size)]
    options, m = [], 1
    while m <= min(per_replica, MAX_MICROBATCHES) and per_replica % m == 0:
        options.append(m)
        m *= 2
    return options


def split_config(cfg: Config, split: Split) -> Config:
    """`cfg` with the values of `split` for the keys the search chooses."""
    keys = auto_keys(cfg)
    changes: dict = {"mesh_shape": ",".join(f"{a}:{s}" for a, s in split.mesh)}
    if "mesh_shape" in keys:
        changes["dcn_axes"] = SLICE_AXIS if SLICE_AXIS in dict(split.mesh) else None
    crossing = changes.get("dcn_axes", cfg.dcn_axes) or ""
    data, tensor = "+".join(split.data), "+".join(split.tensor)
    if "layout" in keys:
        parts = [f"batch:{data}"] if data else []
        if tensor:
            parts += [f"{dim}:{tensor}" for dim in TENSOR_DIMS]
            if cfg.moe_layers:
                parts.append(f"expert_hidden:{tensor}")
        if split.experts_on_data:
            parts.append(f"experts:{data}")
        if split.sequence:
            parts.append(f"sequence:{'+'.join(split.sequence)}")
        changes["layout"] = ",".join(parts) or f"batch:{split.mesh[0][0]}"
    if "param_layout" in keys:  # FSDP: weights split over every axis that splits tokens,
        # inside a slice: gathered over its interconnect, never over the data-centre network
        fsdp_axes = "+".join(a for a in split.data + split.sequence if a not in crossing.split("+"))
        changes["param_layout"] = f"embd:{fsdp_axes}" if split.fsdp and fsdp_axes else None
    if "tokens_per_mb_per_replica" in keys and split.microbatches > 1:
        per_replica = required_batch(cfg) // split.data_size
        changes["tokens_per_mb_per_replica"] = per_replica // split.microbatches * cfg.n_ctx
    return cfg.replace(**changes)


# --------------------------------------------------------------------------------------------
# Rank


def rank(
    cfg: Config, n_devices: int, chip: hardware.Chip, limit: int | None, slices: int = 1
) -> list[Candidate]:
    """The candidates for `cfg` on `n_devices` chips of `limit` bytes in `slices` TPU slices,
    best first."""
    candidates = []
    for split in splits(cfg, n_devices, slices):
        candidate_cfg = split_config(cfg, split)
        try:
            check_layout(candidate_cfg)
        except ConfigError:
            continue
        for layers_cfg in _layer_layouts(candidate_cfg):
            candidates.append(
                Candidate(
                    split, layers_cfg, plan(layers_cfg), roofline.estimate(layers_cfg, chip), limit
                )
            )
    return sorted(candidates, key=Candidate.rank_key)


def _layer_layouts(cfg: Config) -> list[Config]:
    """`cfg`, and where `scan_layers` is unset and the layers would be scanned, the same with
    them unrolled: scanning compiles faster but needs more memory (gpt_neo.training.memory),
    so where only the unrolled program fits, it is the one chosen."""
    if cfg.scan_layers is None and _repeats(cfg):
        return [cfg, cfg.replace(scan_layers=False)]
    return [cfg]


def _repeats(cfg: Config) -> bool:
    """Whether the layers repeat a pattern, which `scan_layers` unset would scan."""
    return layer_period(cfg) is not None and not cfg.share_parameters


# --------------------------------------------------------------------------------------------
# Confirm


def choose(
    cfg: Config,
    devices: list,
    *,
    compile_step: Callable | None = aot.compile_train_step,
    limit: int | str | None = "device",
) -> Choice:
    """The best split of `cfg` over `devices`, confirmed by `compile_step(cfg, devices)` (a
    `gpt_neo.planning.aot.Compiled`; None: rank only). `limit`: bytes per device (default: what the
    devices have). Raises `ConfigError` when nothing fits."""
    keys = auto_keys(cfg)
    kind = devices[0].device_kind
    if limit == "device":
        limit = hardware.memory_limit(devices[0])
    assert not isinstance(limit, str)
    slices = len(slice_groups(devices) or [devices])
    ranked = rank(cfg, len(devices), hardware.chip(kind) or hardware.UNKNOWN, limit, slices)
    where = f"{len(devices)} x {kind}" + (f" in {slices} slices" if slices > 1 else "")
    if not ranked:
        raise ConfigError(
            f"auto layout: no split of this model over {where} passes the layout checks "
            "(heads, MLP width, vocabulary or batch not divisible by the mesh axes); set "
            "mesh_shape and layout yourself, or change train_batch_size"
        )
    if ranked[0].tier == 2:
        best = min(c.memory.train_total for c in ranked)
        raise ConfigError(
            f"auto layout: nothing fits on {where}: the smallest of {len(ranked)} candidates "
            f"needs {_size(best)} per device, the chips have {_size(limit or 0)}. Use more "
            'chips, a smaller train_batch_size, or "recompute_grad": true'
        )
    choice = Choice(ranked[0], ranked, where, keys)
    if compile_step is None:
        return choice
    for i, candidate in enumerate(ranked[:CONFIRM_TRIES]):
        if candidate.tier == 2:
            break
        try:
            compiled = compile_step(candidate.cfg, devices)
        except aot.DoesNotFit:
            choice.verdicts[i] = "compiled: does not fit"
            continue
        if limit is not None and compiled.total > limit:
            choice.verdicts[i] = f"compiled: {_size(compiled.total)}, does not fit"
            continue
        choice.verdicts[i] = f"compiled: {_size(compiled.total)} in {compiled.seconds:.0f}s"
        choice.chosen, choice.compiled = candidate, compiled
        return choice
    raise ConfigError(
        f"auto layout: the compiler found that none of the {min(CONFIRM_TRIES, len(ranked))} "
        f"best candidates fits on {where}. Use more chips, a smaller train_batch_size, or "
        '"recompute_grad": true'
    )


def choose_layout(cfg: Config, devices=None, *, confirm: bool = True, log=print) -> Config:
    """`cfg` with its "auto" keys chosen for `devices` (default: all of them), the ranking
    logged (by process 0). `confirm`: compile the winner's train step first."""
    if not auto_keys(cfg):
        return cfg
    choice = choose(
        cfg,
        list(jax.devices() if devices is None else devices),
        compile_step=aot.compile_train_step if confirm else None,
    )
    if jax.process_index() == 0:
        for line in choice.lines():
            log(line)
    return choice.cfg
