"""Where a run executes.

- `platform`: on this machine: the platform (`--tpu`, `--gpu_ids`, chosen before JAX starts)
  and joining the other processes of a multi-host run (`jax.distributed`).
- `pod` (with `gcloud`, `bundle`, `preflight`): from a workstation, the launcher that runs a
  job on every worker of a TPU slice and recreates the slice when it is preempted.
"""
