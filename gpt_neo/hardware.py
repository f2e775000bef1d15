"""What one accelerator chip can do, by JAX's `device_kind`: the figures that MFU, "will it
fit?" and the auto layout's roofline estimate are computed from.

They are public spec-sheet figures (dense bfloat16 peak, HBM size and bandwidth, chip-to-chip
bandwidth per direction, and each chip's share of its host's data-centre network), so what they
give is an estimate: the compiler's memory analysis and a profile of a real run are the
measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Chip:
    peak_flops: float  # dense bfloat16 FLOP/s
    hbm_bytes: int | None  # memory programs may use; None: unknown (host memory)
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s out of one chip to its neighbours (ICI, NVLink, PCIe)
    # bytes/s out of one chip to other slices (TPU) or hosts (GPU): the host's network cards
    # shared by its chips. Multi-slice traffic (`dcn_axes`) runs at this, 10-100x below ICI.
    dcn_bandwidth: float


# Data-centre network per chip, from Google's and NVIDIA's pages: v5e and v6e hosts have 8
# chips and 2 x 100 and 4 x 200 Gbps of NIC (6.4 and 25.6 Tbps per 256-chip pod); v5p states
# 50 Gbps per chip; v4 (4 chips per host, 200 Gbps) is inferred the same way; v2 and v3, which
# do not run multi-slice, get v5e's figure. GPUs: one 400 Gbps (H100, H200) or 200 Gbps (A100)
# InfiniBand card per GPU in the usual cluster build; L4 and A10G hosts have Ethernet only.
CHIPS = {
    "TPU v2": Chip(45e12, 8 * GIB, 700e9, 62e9, 3.125e9),
    "TPU v3": Chip(123e12, 16 * GIB, 900e9, 82e9, 3.125e9),
    "TPU v4": Chip(275e12, 32 * GIB, 1228e9, 300e9, 6.25e9),
    "TPU v5 lite": Chip(197e12, int(15.75 * GIB), 819e9, 200e9, 3.125e9),  # v5e
    "TPU v5e": Chip(197e12, int(15.75 * GIB), 819e9, 200e9, 3.125e9),
    "TPU v5p": Chip(459e12, 95 * GIB, 2765e9, 600e9, 6.25e9),
    "TPU v5": Chip(459e12, 95 * GIB, 2765e9, 600e9, 6.25e9),  # v5p's device_kind
    "TPU v6 lite": Chip(918e12, 32 * GIB, 1640e9, 448e9, 12.5e9),  # v6e (Trillium)
    "TPU v6e": Chip(918e12, 32 * GIB, 1640e9, 448e9, 12.5e9),
    "H200": Chip(989e12, 141 * 10**9, 4.8e12, 450e9, 50e9),
    "H100": Chip(989e12, 80 * 10**9, 3.35e12, 450e9, 50e9),
    "A100": Chip(312e12, 80 * 10**9, 2.0e12, 300e9, 25e9),
    "L4": Chip(121e12, 24 * 10**9, 300e9, 32e9, 3.125e9),
    "A10G": Chip(70e12, 24 * 10**9, 600e9, 32e9, 3.125e9),
}
# Anything else (a CPU, a simulated device): a nominal chip, so that estimates still rank
# layouts relative to each other; no memory limit.
UNKNOWN = Chip(1e11, None, 2e10, 1e10, 1e9)


def chip(device_kind: str) -> Chip | None:
    """The figures for `device_kind` (e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3"), or None."""
    for name in sorted(CHIPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
        if name.lower() in device_kind.lower():
            return CHIPS[name]
    return None


def memory_limit(device) -> int | None:
    """Bytes a program may use on `device`: what its runtime reports (a real GPU or TPU), else
    the table's HBM (a TPU slice described ahead of time), else None (host memory)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU devices and topology descriptions have none
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    known = chip(device.device_kind)
    return known.hbm_bytes if known else None
