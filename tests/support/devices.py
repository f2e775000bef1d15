"""Which devices the suite runs on: 8 simulated CPU devices, or, with GPT_NEO_TEST_GPU=1
(bench/gpu_check.sh on a machine with a GPU), the GPU and only the tests marked `gpu`."""

import os

GPU = os.environ.get("GPT_NEO_TEST_GPU") == "1"

# XLA:CPU's LLVM optimizations off, for the suite and every process it starts: its programs are
# tiny and compile-bound, and LLVM's passes were about 30% of a test's time (tests/models/
# test_sharding.py: 50 s -> 34 s). Results change in rounding only (LLVM's vectorised loops sum
# in another order); bit-for-bit comparisons run both sides under the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_flags(devices: int = 8) -> str:
    """XLA_FLAGS for a process the tests start on `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
