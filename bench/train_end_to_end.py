"""End-to-end training speed: `main.py` (input pipeline, loop, metrics, checkpoints) against the
bare jitted step on the same config, in one invocation.

    python bench/train_end_to_end.py [--steps 130] [--rounds 2] [--devices 1 8]

Configs (GPT-Neo's side-by-side shapes, fp32, batch 8, vocab 4096, all-global attention):
4 layers d256 8 heads n_ctx 256, and 2 layers d128 4 heads n_ctx 128. The data is a generated
multi-file TFRecord dataset of n_ctx + 1-token records (8 files x 64 records: an epoch every 64
steps, so a run crosses several epoch boundaries). `main.py` logs every 10 steps and saves a
checkpoint every 50. For each config and device count it prints the tokens/s of each side over
the steps after the first 10 (compilation), their ratio, and main.py's slowest 10-step
interval as a fraction of its median (its speed against the median speed) and the steps it
covers, over all intervals and over those without a checkpoint save. Each side runs as its own process (the device count
is fixed when JAX starts), alternating over rounds; each side's best round is kept.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {
    "4L-d256-ctx256": {"n_layer": 4, "n_embd": 256, "n_head": 8, "n_ctx": 256},
    "2L-d128-ctx128": {"n_layer": 2, "n_embd": 128, "n_head": 4, "n_ctx": 128},
}
BATCH, VOCAB, LOG_EVERY, CHECKPOINT_EVERY = 8, 4096, 10, 50
FILES, RECORDS_PER_FILE = 8, 64


def write_dataset(folder: Path, n_ctx: int, record_tokens: int | None = None) -> str:
    """FILES TFRecord files of random records of `record_tokens` tokens (default n_ctx + 1; a
    longer record's first n_ctx + 1 are used), and their dataset config."""
    import numpy as np

    from gpt_neo.data.tfrecords import serialize
    from gpt_neo.storage import tf

    rng = np.random.default_rng(n_ctx)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(FILES):
        path = folder / f"bench_{index}_{RECORDS_PER_FILE}.tfrecords"
        with tf().io.TFRecordWriter(str(path)) as writer:
            for _ in range(RECORDS_PER_FILE):
                tokens = rng.integers(0, VOCAB, record_tokens or n_ctx + 1)
                writer.write(serialize(tokens.tolist()))
    config = {
        "n_vocab": VOCAB,
        "path": str(folder / "bench_*.tfrecords"),
        "mode": "chunks",
        "tokenizer_path": "byte",
    }
    (folder / "dataset.json").write_text(json.dumps(config))
    return str(folder / "dataset.json")


def model_config(folder: Path, shape: dict, devices: int, steps: int, dataset: str, **extra) -> str:
    """The run's config file: `shape` and `extra` over this bench's training keys."""
    keys = {
        **shape,
        "n_vocab": VOCAB,
        "train_batch_size": BATCH,
        "train_steps": steps,
        "iterations": LOG_EVERY,
        "lr": 1e-4,
        "warmup_steps": 10,
        "mesh_shape": f"x:{devices}",
        "layout": "batch:x",
        "datasets": [[dataset, None, "chunks", None]],
        "model_path": str(folder / f"run_{devices}"),
        **extra,
    }
    path = folder / f"model_{devices}.json"
    path.write_text(json.dumps(keys))
    return str(path)


def environment(devices: int) -> dict:
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def end_to_end(model: str, devices: int) -> list[float]:
    """Seconds of each 10-step interval after the first of a fresh main.py run, from
    metrics.jsonl's clock; interval i runs from step 10 * (i + 1)."""
    run = Path(json.loads(Path(model).read_text())["model_path"])
    subprocess.run(["rm", "-rf", str(run)], check=True)
    command = [
        sys.executable,
        str(REPO / "main.py"),
        "--model",
        model,
        "--steps_per_checkpoint",
        str(CHECKPOINT_EVERY),
    ]
    subprocess.run(command, env=environment(devices), check=True, capture_output=True, cwd=REPO)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in records if "loss" in r]
    return [b - a for a, b in itertools.pairwise(stamps)]


def bare(model: str, devices: int) -> list[float]:
    """Seconds of each 10-step interval of the jitted step alone, on one batch already placed."""
    code = f"""
import json, sys, time
import numpy as np, jax
import gpt_neo
from gpt_neo.training.trainer import Trainer
cfg = gpt_neo.load_config({model!r})
trainer = Trainer(cfg, gpt_neo.make_mesh(cfg))
state = trainer.init_state(0)
tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (cfg.train_batch_size, cfg.n_ctx + 1))
intervals = []
with jax.set_mesh(trainer.mesh):
    batch = trainer.place(tokens.astype(np.int32))
    last = time.perf_counter()
    for step in range(1, cfg.train_steps + 1):
        state, metrics = trainer.step(state, batch)
        if step % {LOG_EVERY} == 0:
            jax.block_until_ready(metrics)
            now = time.perf_counter()
            intervals.append(now - last)
            last = now
print(json.dumps(intervals[1:]))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=environment(devices),
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=130, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    print(
        f"{os.cpu_count()} cores; batch {BATCH}, {args.steps} steps, fp32; main.py logs every "
        f"{LOG_EVERY} steps, checkpoints every {CHECKPOINT_EVERY}"
    )
    print(
        f"{'config':<16} {'devices':>7} {'bare tok/s':>11} {'main.py tok/s':>14} {'ratio':>6} "
        f"{'slowest/median (steps)':>26} {'without saves':>14}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            shape = CONFIGS[name]
            folder = Path(tmp) / name
            dataset = write_dataset(folder / "data", shape["n_ctx"])
            tokens = LOG_EVERY * BATCH * shape["n_ctx"]
            for devices in args.devices:
                model = model_config(folder, shape, devices, args.steps, dataset)
                best = {"bare": None, "main.py": None}
                for _ in range(args.rounds):
                    for side, measure in (("bare", bare), ("main.py", end_to_end)):
                        intervals = measure(model, devices)
                        rate = tokens * len(intervals) / sum(intervals)
                        if best[side] is None or rate > best[side][0]:
                            best[side] = (rate, intervals)
                (bare_rate, _), (e2e_rate, intervals) = best["bare"], best["main.py"]
                median = statistics.median(intervals)
                no_save = [
                    t for i, t in enumerate(intervals) if (i + 1) * LOG_EVERY % CHECKPOINT_EVERY
                ]
                slowest = max(range(len(intervals)), key=intervals.__getitem__)
                where = f"{LOG_EVERY * (slowest + 1)}-{LOG_EVERY * (slowest + 2)}"
                print(
                    f"{name:<16} {devices:>7} {bare_rate:>11,.0f} {e2e_rate:>14,.0f} "
                    f"{e2e_rate / bare_rate:>5.2f}x {median / max(intervals):>8.2f} {where:>8} "
                    f"{median / max(no_save):>14.2f}"
                )


if __name__ == "__main__":
    main()
