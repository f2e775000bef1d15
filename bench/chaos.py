"""Chaos: one training run killed with -9 again and again, some kills aimed at the moment a
checkpoint is being written, plus a storm of SIGTERMs, then a NaN injected by the test hook
(GPT_NEO_TEST_NAN_AT_STEP) at a checkpoint step; each time the same command restarts it. The
final parameters are compared with an uninterrupted run's, and every checkpoint left on disk
is checked against its recorded checksums.

    python bench/chaos.py [--kills 20] [--steps 1000] [--every 10] [--seed 0]

Prints `kills survived K/N, bit-identical yes/no, corrupt checkpoints C`; exits 1 unless
all kills were survived, the SIGTERM storm saved and stopped (exit 75), the NaN stopped the
run (exit 3) before its step was saved, the parameters are bit-identical and nothing is
corrupt.
`make test` runs 2 kills (tests/training/test_checkpoint_faults.py); every third kill, from the second
on, is aimed at a checkpoint write.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process only reads checkpoints back
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from train_end_to_end import write_dataset  # noqa: E402

EXIT_DIVERGED, EXIT_PREEMPTED = 3, 75
NAN_AT_STEP_ENV = "GPT_NEO_TEST_NAN_AT_STEP"
MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_ctx": 64}


def model_config(folder: Path, dataset: str, model_path: Path, steps: int) -> str:
    keys = {
        **MODEL,
        "attention_types": [[["global", "local"], 1]],
        "local_attention_radius": 16,
        "n_vocab": 4096,
        "train_batch_size": 8,
        "iterations": 1,
        "train_steps": steps,
        "lr": 2e-3,
        "warmup_steps": 5,
        "res_dropout": 0.1,
        "keep_checkpoints": 3,
        "mesh_shape": "x:4,y:2",
        "layout": "batch:x,heads:y",
        "datasets": [[dataset, 1, "chunks", 1.0]],
        "model_path": str(model_path),
    }
    path = folder / f"{model_path.name}.json"
    path.write_text(json.dumps(keys))
    return str(path)


def start(model: str, every: int, nan_at_step: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env.setdefault("JAX_PLATFORMS", "cpu")
    if nan_at_step is not None:
        env[NAN_AT_STEP_ENV] = str(nan_at_step)
    command = [sys.executable, str(REPO / "main.py"), "--model", model]
    return subprocess.Popen(
        [*command, "--steps_per_checkpoint", str(every)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [json.loads(line).get("step", -1) for line in path.read_text().splitlines() if line]
    return max(steps, default=-1)


def writing_checkpoint(run: Path) -> bool:
    folder = run / "checkpoints"
    return folder.exists() and any("orbax-checkpoint-tmp" in p.name for p in folder.iterdir())


def kill_at_random(process, run: Path, rng: random.Random, aim_at_save: bool) -> str | None:
    """Kill -9 once the run trains (at a random moment, or the moment a checkpoint is being
    written); returns where it landed, None if the run ended first."""
    start_step = logged_step(run)
    deadline = time.monotonic() + 600
    while logged_step(run) <= start_step:  # past start-up: training
        if process.poll() is not None:
            return None
        if time.monotonic() > deadline:
            raise TimeoutError("the run never trained")
        time.sleep(0.01)
    if aim_at_save:
        while not writing_checkpoint(run):
            if process.poll() is not None:
                return None
            time.sleep(0.002)
        where = "while writing a checkpoint"
    else:
        time.sleep(rng.uniform(0.0, 2.0))
        where = "at a random moment"
    if process.poll() is not None:
        return None
    process.kill()
    process.communicate()
    return where


def sigterm_storm(model: str, run: Path, every: int) -> int:
    """Several SIGTERMs in a row once training runs: the run must still save once and exit 75."""
    process = start(model, every)
    begun = logged_step(run)
    while logged_step(run) <= begun and process.poll() is None:
        time.sleep(0.01)
    for _ in range(4):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    process.communicate(timeout=300)
    return process.returncode


def saved_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def nan_injection(model: str, run: Path, every: int, steps: int) -> tuple[int, int, list[int]]:
    """Restart with the NaN hook set for the next checkpoint step: (that step, the exit code,
    the checkpoints on disk afterwards; none may be at or past the poisoned step)."""
    at = min((saved_steps(run)[-1] // every + 1) * every, steps)
    process = start(model, every, nan_at_step=at)
    process.communicate(timeout=600)
    return at, process.returncode, saved_steps(run)


def params(run: Path, step: int):
    import jax
    import orbax.checkpoint as ocp

    state = run / "checkpoints" / str(step) / "state"
    tree = ocp.StandardCheckpointer().metadata(str(state)).item_metadata.tree
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), tree)
    return jax.tree.leaves(ocp.StandardCheckpointer().restore(str(state), target)["params"])


def corrupt_checkpoints(run: Path) -> list[str]:
    from gpt_neo.training.checkpoint import manifest as checkpoint_manifest

    folder = run / "checkpoints"
    found = []
    for step_dir in sorted(p for p in folder.iterdir() if p.name.isdigit()):
        if (problem := checkpoint_manifest.damage(str(step_dir))) is not None:
            found.append(f"{step_dir.name}: {problem}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=10, help="steps per checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="default: a temporary folder")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="chaos-"))
    dataset = write_dataset(work / "data", MODEL["n_ctx"])

    reference = work / "reference"
    started = time.monotonic()
    process = start(model_config(work, dataset, reference, args.steps), args.every)
    out, _ = process.communicate()
    if process.returncode != 0:
        print(out[-3000:])
        return 1
    print(f"uninterrupted run: {args.steps} steps in {time.monotonic() - started:.0f}s", flush=True)

    run = work / "chaos"
    model = model_config(work, dataset, run, args.steps)
    survived = 0  # kills after which the next start resumed and trained on
    killed = False
    for kill in range(args.kills):
        process = start(model, args.every)
        where = kill_at_random(process, run, rng, aim_at_save=kill % 3 == 1)
        survived += killed and where is not None  # the previous kill's restart trained
        if where is None:  # it finished (or failed) before the kill
            out, _ = process.communicate()
            if process.returncode != 0:
                print(f"start {kill + 1}: the run failed:\n{out[-3000:]}")
                return 1
            print(f"start {kill + 1}: the run had finished before the kill; --steps is too few")
            return 1
        killed = True
        print(f"kill {kill + 1}/{args.kills} {where}, at step {logged_step(run)}", flush=True)
    storm = sigterm_storm(model, run, args.every)
    print(f"SIGTERM storm (4 in 200 ms): exit {storm} (75 = saved and stopped)", flush=True)
    nan_step, nan_exit, after_nan = nan_injection(model, run, args.every, args.steps)
    nan_stopped = nan_exit == EXIT_DIVERGED and after_nan[-1] < nan_step
    print(
        f"NaN injected before step {nan_step}: exit {nan_exit} (3 = diverged), newest "
        f"checkpoint {after_nan[-1]} ({'before it' if nan_stopped else 'NOT before it'})",
        flush=True,
    )
    process = start(model, args.every)
    out, _ = process.communicate()
    if process.returncode != 0:
        print(f"the final restart failed:\n{out[-3000:]}")
        return 1
    survived += killed  # the last kill's restart (through the storm) reached the end
    same = all(
        (a == b).all()
        for a, b in zip(params(run, args.steps), params(reference, args.steps), strict=True)
    )
    corrupt = corrupt_checkpoints(run)
    for line in corrupt:
        print(f"corrupt checkpoint {line}")
    print(
        f"kills survived {survived}/{args.kills}, bit-identical {'yes' if same else 'no'}, "
        f"corrupt checkpoints {len(corrupt)}, SIGTERM storm exit {storm}, NaN stopped "
        f"{'yes' if nan_stopped else 'no'}"
    )
    ok = same and not corrupt and survived == args.kills and nan_stopped
    return 0 if ok and storm == EXIT_PREEMPTED else 1


if __name__ == "__main__":
    sys.exit(main())
