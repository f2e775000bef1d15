"""Fuzzing at scale: the properties of tests/test_fuzz.py (model configs, config files of any
bytes, dataset configs through the input pipeline, command lines, byte damage to TFRecords and
to a tokenizer) with `--scale` times the suite's examples, freshly drawn each run.

    python bench/fuzz.py [--scale 10]

Prints each property's example count and outcome (hypothesis's statistics) and a total;
exits 1 if any property failed (hypothesis prints the smallest failing example).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=10, help="times the suite's example counts")
    args = parser.parse_args()
    env = {
        **os.environ,
        "GPT_NEO_FUZZ_SCALE": str(args.scale),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["--hypothesis-show-statistics", "tests/test_fuzz.py"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    total = 0
    chunks = re.split(r"^tests/test_fuzz\.py::(\w+):$", output, flags=re.M)
    for test, body in zip(chunks[1::2], chunks[2::2], strict=True):
        counts = re.findall(r"(\d+) passing, (\d+) failing", body)
        passing = sum(int(p) for p, _ in counts)
        failing = sum(int(f) for _, f in counts)
        total += passing + failing
        print(f"{test}: {passing} passing, {failing} failing examples")
    summary = output.strip().splitlines()[-1] if output.strip() else "no output"
    print(f"examples in all: {total}; pytest: {summary}")
    if result.returncode:
        print(output[-6000:])
    return 1 if result.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
