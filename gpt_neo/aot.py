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
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from gpt_neo.config import Config
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import make_mesh, mesh_axes
from gpt_neo.metrics import FLOP_CONVENTION, PEAK_BF16_FLOPS
from gpt_neo.models.gpt import flops_per_token
from gpt_neo.summary import memory_per_device
from gpt_neo.train import Trainer

# Per-chip HBM that programs may use (bytes), by jax's device_kind.
HBM_BYTES = {
    "TPU v2": 8 * 2**30,
    "TPU v3": 16 * 2**30,
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": int(15.75 * 2**30),
    "TPU v5p": 95 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
}
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
        topology = topologies.get_topology_desc(
            topology_name=name, platform="tpu", num_slices=num_slices
        )
    except Exception as err:  # the runtime raises bare errors for names it does not know
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"--topology {name}: the TPU runtime does not know it ({detail[:160]}); give a "
            f"generation and chip grid, e.g. {EXAMPLES}"
        ) from None
    return list(topology.devices)


@dataclass(frozen=True)
class Compiled:
    """What the TPU compiler says about one program, per device."""

    arguments: int  # bytes
    temporaries: int
    outputs: int
    aliased: int  # outputs that reuse donated arguments' buffers
    flops: float  # per device, recomputation included
    seconds: float  # lowering + compilation

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries + self.outputs - self.aliased


def compile_train_step(cfg: Config, devices: list) -> Compiled:
    """Compile the train step of `cfg` for `devices` (a slice's, from `topology_devices`)."""
    sizes = mesh_axes(cfg) or {"x": len(devices)}
    if (needed := math.prod(sizes.values())) != len(devices):
        raise ConfigError(
            f"mesh_shape '{cfg.mesh_shape}' needs {needed} devices, the topology has "
            f"{len(devices)}: pick a mesh_shape whose sizes multiply to {len(devices)}"
        )
    mesh = make_mesh(cfg, devices)
    start = time.perf_counter()
    # built outside set_mesh: the optimizer's init makes concrete arrays on this machine
    trainer = Trainer(cfg, mesh)
    state = trainer.abstract_state()
    tokens = jax.ShapeDtypeStruct(
        (trainer.batch_size, cfg.n_ctx + 1), jnp.int32, sharding=trainer.batch_sharding
    )
    with jax.set_mesh(mesh):  # the model's kernel choices read the mesh's platform: TPU
        compiled = trainer.step.lower(state, tokens).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX: one dict per program
        cost = cost[0] if cost else {}
    return Compiled(
        arguments=memory.argument_size_in_bytes,
        temporaries=memory.temp_size_in_bytes,
        outputs=memory.output_size_in_bytes,
        aliased=memory.alias_size_in_bytes,
        flops=float(cost.get("flops", 0.0)),
        seconds=seconds,
    )


def report(cfg: Config, topology: str, devices: list, compiled: Compiled) -> list[str]:
    """The lines `--summary --topology` prints."""
    gib = 2**30
    kind = devices[0].device_kind
    hbm = HBM_BYTES.get(kind)
    estimated = sum(memory_per_device(cfg).values())
    fits = "?" if hbm is None else ("fits" if compiled.total <= hbm else "DOES NOT FIT")
    tokens = cfg.train_batch_size * cfg.n_ctx
    model_flops = flops_per_token(cfg, FLOP_CONVENTION) * tokens / len(devices)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k.lower() in kind.lower()), None)
    lines = [
        f"compiled the train step for {topology} ({len(devices)} x {kind}) in "
        f"{compiled.seconds:.1f}s; per device: arguments {compiled.arguments / gib:.2f} GiB, "
        f"temporaries {compiled.temporaries / gib:.2f} GiB, outputs {compiled.outputs / gib:.2f}"
        f" GiB ({compiled.aliased / gib:.2f} GiB of them in donated argument buffers)",
        f"per-device memory: estimated {estimated / gib:.2f} GiB (parameters and optimizer state "
        f"only), compiled {compiled.total / gib:.2f} GiB, HBM "
        + (f"{hbm / gib:.2f} GiB: {fits}" if hbm else f"unknown for {kind}"),
        f"FLOPs per step per device: compiled {compiled.flops:.3e}, model {model_flops:.3e} "
        f"({FLOP_CONVENTION}; compiled/model {compiled.flops / max(model_flops, 1):.2f}: above 1 "
        "where recomputation adds work, below where Pallas kernels hide theirs)",
    ]
    if peak:
        # the compiler counts no FLOPs inside Pallas kernels (splash attention), so the compiled
        # count can fall below the model's; the estimate takes the larger
        work = max(compiled.flops, model_flops)
        lines.append(
            f"roofline ESTIMATE (compute-bound at the {peak / 1e12:.0f} TFLOP/s bf16 peak, no "
            f"communication or memory stalls): {work / peak * 1e3:.1f} ms/step, MFU at most "
            f"{100 * model_flops / work:.0f}%"
        )
    return lines
