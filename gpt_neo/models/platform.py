"""The platform a program is being built for: the devices of the mesh it is traced under
(`jax.set_mesh`), else JAX's default backend.

Kernel and layer-path choices (splash vs XLA attention, the CPU-only LayerNorm gradient,
ragged_dot vs tiled expert matmuls) ask this rather than `jax.default_backend()`, so that
compiling ahead of time for a TPU slice on a CPU machine (`--summary --topology v5e:2x2`)
builds the program the TPU would run, not the CPU variant.
"""

from __future__ import annotations

import jax


def target_platform() -> str:
    """ "tpu", "gpu", "cpu": of the mesh being traced under, else of this process's backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()
