"""What the persistent compilation cache saves a restarted run: time from `python main.py` to
its first logged step, with an empty cache (cold) and with the cache the cold start filled
(warm: what a relaunch after a preemption sees), in one invocation.

    python bench/restart_compile_cache.py [--rounds 2] [--devices 8]

Config: 4 layers d256 8 heads n_ctx 256, fp32, batch 8 (bench/train_end_to_end.py's first);
each round starts from a fresh model_path and a fresh cache folder, runs cold, then runs again
with `--new` (same programs, empty model_path) warm. Prints each side's best round, the
ratio, and what JAX's cache events say was saved.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_end_to_end import BATCH, CONFIGS, REPO, VOCAB, write_dataset


def first_step_seconds(model: str, cache: str, devices: int, *flags: str) -> tuple[float, str]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    start = time.perf_counter()
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "main.py"),
            "--model",
            model,
            "--compilation_cache",
            cache,
            *flags,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    seconds, report = None, ""
    for line in process.stdout:
        if seconds is None and line.startswith("step "):
            seconds = time.perf_counter() - start
        if line.startswith("compilation cache"):
            report = line.strip()
    if process.wait() != 0 or seconds is None:
        raise SystemExit(f"main.py failed ({process.returncode})")
    return seconds, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--devices", type=int, default=8)
    args = parser.parse_args()
    shape = CONFIGS["4L-d256-ctx256"]
    cold, warm, reports = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_dataset(Path(tmp) / "data", shape["n_ctx"])
        for round_ in range(args.rounds):
            keys = {
                **shape,
                "n_vocab": VOCAB,
                "train_batch_size": BATCH,
                "train_steps": 2,
                "iterations": 1,
                "precision": "float32",
                "mesh_shape": f"x:{args.devices}",
                "layout": "batch:x",
                "datasets": [[dataset, 1, "documents_random", 1.0]],
                "model_path": f"{tmp}/run-{round_}",
            }
            model = Path(tmp) / f"model-{round_}.json"
            model.write_text(json.dumps(keys))
            cache = f"{tmp}/cache-{round_}"
            cold.append(first_step_seconds(str(model), cache, args.devices)[0])
            seconds, report = first_step_seconds(str(model), cache, args.devices, "--new", "--yes")
            warm.append(seconds)
            reports.append(report)
    print(f"time to the first step, best of {args.rounds} ({args.devices} CPU devices):")
    print(f"  cold (empty cache)   {min(cold):6.1f}s   rounds {[round(s, 1) for s in cold]}")
    print(f"  warm (cache filled)  {min(warm):6.1f}s   rounds {[round(s, 1) for s in warm]}")
    print(f"  warm / cold          {min(warm) / min(cold):6.2f}")
    print(f"  JAX's account of the warm start: {reports[-1]}")


if __name__ == "__main__":
    main()
