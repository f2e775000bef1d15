"""Where a training run's wall time goes: `main.py`'s training, in this process, with timers on
the parts of the loop, and optionally a jax.profiler trace.

    python bench/profile_training.py CONFIG.json [--steps_per_checkpoint 50] [--trace DIR]

Prints, per part, the seconds spent and the share of the run's wall time: reading batches
(the input pipeline, and within it re-opening file groups at epoch boundaries), placing them
on the devices, dispatching steps, waiting for the devices (the host-device syncs that read
metrics), logging, checkpointing. Parts that run on a background thread (the device feed) are
marked: on a CPU host they still take cores from the step. `--trace DIR` also records a
jax.profiler trace of the whole run (TensorBoard's profile tab, or Perfetto).
"""

import argparse
import functools
import gc
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax

from gpt_neo.cli.main import main
from gpt_neo.data import pipeline, records
from gpt_neo.training import loop, metrics, trainer
from gpt_neo.training.checkpoint import checkpointer as checkpoint

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)
LONGEST: dict[str, float] = defaultdict(float)
THREADS: dict[str, set] = defaultdict(set)


def add(part: str, seconds: float) -> None:
    SECONDS[part] += seconds
    CALLS[part] += 1
    LONGEST[part] = max(LONGEST[part], seconds)
    THREADS[part].add(threading.current_thread().name)


def time_garbage_collection() -> None:
    """Python's collector stops every thread; its pauses are a part of their own."""
    started = {}

    def callback(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            add(
                f"garbage collection (generation {info['generation']})",
                time.perf_counter() - started.pop("t"),
            )

    gc.callbacks.append(callback)


def timed(owner, name: str, part: str) -> None:
    """Wrap `owner.name` so that its calls add to SECONDS[part] (outermost calls only)."""
    inner = getattr(owner, name)
    depth = threading.local()

    @functools.wraps(inner)
    def wrapper(*args, **kwargs):
        depth.n = getattr(depth, "n", 0) + 1
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            depth.n -= 1
            if depth.n == 0:
                add(part, time.perf_counter() - start)

    setattr(owner, name, wrapper)


PARTS = [
    (pipeline.InputPipeline, "next_batch", "input pipeline: next batch"),
    (records.RecordReader, "_open", "  of which: open a file group (epoch boundaries)"),
    (trainer.Trainer, "place", "place the batch on the devices"),
    (metrics.Metrics, "log_train", "log metrics (console, jsonl, TensorBoard)"),
    (metrics.Metrics, "log_eval", "log eval"),
    (loop, "evaluate", "evaluate"),
    (checkpoint.Checkpointer, "save", "checkpoint: save (host copy)"),
    (checkpoint.Checkpointer, "wait", "checkpoint: wait for writes"),
    (jax, "device_get", "wait for the devices (read metrics)"),
]


def main_with_timers(argv: list[str], trace: str | None) -> None:
    for owner, name, part in PARTS:
        if hasattr(owner, name):
            timed(owner, name, part)
    step = trainer.Trainer.__init__

    def init(self, *args, **kwargs):  # time the jitted step's dispatch, per Trainer
        step(self, *args, **kwargs)
        dispatch = self.step

        def timed_step(*a, **k):
            start = time.perf_counter()
            out = dispatch(*a, **k)
            add("dispatch the step", time.perf_counter() - start)
            return out

        self.step = timed_step

    trainer.Trainer.__init__ = init
    time_garbage_collection()
    if trace:
        jax.profiler.start_trace(trace)
    start = time.perf_counter()
    code = main(argv)
    wall = time.perf_counter() - start
    if trace:
        jax.profiler.stop_trace()
    print(f"\nmain.py exited {code}; wall time {wall:.1f}s (startup and compilation included)")
    print(f"{'part':<52} {'calls':>6} {'seconds':>8} {'share':>6} {'longest':>8}  thread")
    for part, seconds in sorted(SECONDS.items(), key=lambda kv: -kv[1]):
        thread = ", ".join(sorted(THREADS[part]))
        print(
            f"{part:<52} {CALLS[part]:>6} {seconds:>8.2f} {100 * seconds / wall:>5.1f}% "
            f"{LONGEST[part]:>8.3f}  {thread}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps_per_checkpoint", default="50")
    parser.add_argument("--trace", metavar="DIR")
    args = parser.parse_args()
    main_with_timers(
        ["--model", args.config, "--steps_per_checkpoint", args.steps_per_checkpoint], args.trace
    )
