"""Where a run executes: platform selection (before jax is imported) and multi-host setup.

- `--tpu NAME`: run on the TPU chips of this TPU VM (all local chips). Launching on every
  worker of a named pod slice is not done from here.
- `--gpu_ids 0 1 ...` (GPT-Neo wrote `device:GPU:0`): run on those GPUs.
- Several processes: `jax.distributed.initialize`, automatic on multi-host TPU slices and under
  SLURM; explicit with `--coordinator_address HOST:PORT --num_processes N --process_id I` or the
  same in `GPT_NEO_COORDINATOR_ADDRESS`, `GPT_NEO_NUM_PROCESSES`, `GPT_NEO_PROCESS_ID`.
"""

from __future__ import annotations

import os

ENV = {"coordinator_address": "GPT_NEO_COORDINATOR_ADDRESS", "num_processes": "GPT_NEO_NUM_PROCESSES",
       "process_id": "GPT_NEO_PROCESS_ID"}  # fmt: skip


def select_platform(tpu: str | None, gpu_ids: list[str] | None) -> None:
    """Must run before jax is imported."""
    if tpu:
        os.environ["JAX_PLATFORMS"] = "tpu"
    elif gpu_ids:
        ids = [g.rsplit(":", 1)[-1] for g in gpu_ids]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        os.environ["JAX_PLATFORMS"] = "cuda"


def _multi_host_environment() -> bool:
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """Join the other processes of this run, if there are any."""
    import jax

    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"])
    num_processes = num_processes or os.environ.get(ENV["num_processes"])
    process_id = process_id if process_id is not None else os.environ.get(ENV["process_id"])
    if coordinator_address or num_processes:
        # CPU processes need a collectives library to talk (no effect on TPU/GPU backends);
        # set before anything initialises a backend
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=int(num_processes),
            process_id=int(process_id),
        )
    elif _multi_host_environment():
        jax.distributed.initialize()  # TPU pod slice or SLURM: everything comes from the environment
