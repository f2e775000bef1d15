"""Where a run executes: the platform (chosen before JAX starts) and multi-host setup.

- `--tpu NAME`: run on the TPU chips of this TPU VM (all local chips). Launching on every
  worker of a named pod slice is `gpt_neo.launch.pod`'s job.
- `--gpu_ids 0 1 ...` (GPT-Neo wrote `device:GPU:0`): run on those GPUs.
- Several processes: `jax.distributed.initialize`, automatic on multi-host TPU slices and under
  SLURM (one process per node driving all its GPUs: `scripts/slurm/train.sbatch`); explicit
  with `--coordinator_address HOST:PORT --num_processes N --process_id I` or the same in
  `GPT_NEO_COORDINATOR_ADDRESS`, `GPT_NEO_NUM_PROCESSES`, `GPT_NEO_PROCESS_ID` (what the pod
  launcher sets on each TPU worker).
"""

from __future__ import annotations

import glob
import os
import sys

from gpt_neo.errors import PlatformError

ENV = {
    "coordinator_address": "GPT_NEO_COORDINATOR_ADDRESS",
    "num_processes": "GPT_NEO_NUM_PROCESSES",
    "process_id": "GPT_NEO_PROCESS_ID",
    # seconds without a heartbeat before the coordinator declares a process dead (JAX: 100);
    # raised where processes share a loaded machine (the test suite's CPU processes)
    "heartbeat_timeout": "GPT_NEO_HEARTBEAT_TIMEOUT",
}


def select_platform(tpu: str | None, gpu_ids: list[str] | None) -> None:
    """Make JAX use the TPU (`--tpu NAME`) or the GPUs `gpu_ids`. Call before anything uses a
    JAX device (JAX may be imported already: its backends start on first use); then, after
    `initialize_distributed` if the run has several processes, `require_platform`."""
    platform = _platform(tpu, gpu_ids)
    if platform is None:
        _skip_absent_tpu()
        return
    if platform == "cuda" and gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(g.rsplit(":", 1)[-1] for g in gpu_ids)
    os.environ["JAX_PLATFORMS"] = platform
    if "jax" in sys.modules:  # imported already: it read the environment, so set the flag too
        sys.modules["jax"].config.update("jax_platforms", platform)


def _skip_absent_tpu() -> None:
    """On a machine with no accelerator, run on the CPU without asking libtpu first: where
    `jax[tpu]` is installed, JAX otherwise probes for a TPU and libtpu prints a screen of
    metadata-server and hostname errors before falling back. Only where the user has not
    chosen (JAX_PLATFORMS unset) and JAX has not started (a fresh command-line process)."""
    if "JAX_PLATFORMS" in os.environ or "jax" in sys.modules or _tpu_chips_present():
        return
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):  # a GPU: JAX chooses
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def _platform(tpu: str | None, gpu_ids: list[str] | None) -> str | None:
    return "tpu" if tpu else "cuda" if gpu_ids else None


def require_platform(tpu: str | None, gpu_ids: list[str] | None) -> None:
    """One `PlatformError` line when the platform `select_platform` chose is not here."""
    platform = _platform(tpu, gpu_ids)
    if platform is None:
        return
    import jax  # here, not at the top: the platform must be chosen before JAX starts

    asked = f"--tpu {tpu}" if tpu else f"--gpu_ids {' '.join(gpu_ids or [])}"
    fix = {
        "tpu": "run on the TPU VM itself (with `pip install .[tpu]`), or leave out --tpu",
        "cuda": "install JAX for CUDA (`pip install jax[cuda12]`), check nvidia-smi, or leave "
        "out --gpu_ids",
    }[platform]
    if platform == "tpu" and not _tpu_chips_present():
        # asked before libtpu starts: on a machine without chips it would first print a page
        # of metadata-server warnings
        raise PlatformError(
            f"{asked}: JAX finds no TPU on this machine (no /dev/accel* or /dev/vfio devices); "
            f"{fix}"
        )
    try:
        devices = jax.devices()
    except Exception as err:  # RuntimeError for a missing TPU, AssertionError for CUDA
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        detail = detail.split(" (set JAX_PLATFORMS")[0]  # JAX's hint: use whatever is here
        raise PlatformError(
            f"{asked}: JAX finds no {platform.upper()} on this machine ({detail}); {fix}"
        ) from None
    if gpu_ids and len(devices) != len(gpu_ids):
        raise PlatformError(
            f"{asked}: {len(gpu_ids)} GPU(s) asked for, {len(devices)} visible to JAX; name "
            "GPUs that exist (nvidia-smi lists them)"
        )


def _tpu_chips_present() -> bool:
    """TPU VMs expose their chips as /dev/accel* (v4 and older) or /dev/vfio/* (v5e and newer)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _multi_host_environment() -> bool:
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """Join the other processes of this run, if there are any."""
    import jax  # after select_platform

    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"])
    num_processes = num_processes or os.environ.get(ENV["num_processes"])
    process_id = process_id if process_id is not None else os.environ.get(ENV["process_id"])
    explicit = bool(coordinator_address or num_processes)
    if not (explicit or _multi_host_environment()):
        return
    # CPU processes need a collectives library to talk (no effect on TPU/GPU backends); set
    # before anything initialises a backend
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    heartbeat = os.environ.get(ENV["heartbeat_timeout"])
    heartbeat_timeout_seconds = int(heartbeat) if heartbeat else 100  # JAX's default
    if explicit:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=int(num_processes or 0),
            process_id=int(process_id or 0),
            heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        )
    else:  # a TPU pod slice or SLURM: everything comes from the environment
        jax.distributed.initialize(
            local_device_ids=_slurm_node_gpus(), heartbeat_timeout_seconds=heartbeat_timeout_seconds
        )


def _slurm_node_gpus() -> list[int] | None:
    """All GPUs of this SLURM node (`--gpus-per-node`): one process drives a whole node. JAX's
    SLURM default is one process per GPU, which `--ntasks-per-node=1` would leave with one."""
    gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
    return list(range(int(gpus))) if gpus.isdigit() else None
