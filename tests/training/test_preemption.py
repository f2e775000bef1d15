"""Preemption with real processes: SIGTERM, and kill -9 at a random point after the first
checkpoint. After a restart, the final parameters equal an uninterrupted run's bit for bit.
The data is packed (documents split across windows, a look-ahead of pending documents), the
pipeline position with the most to restore. Each sequence is split over 4 devices (context
parallelism, the causal load-balanced order, a local window fetched as a halo), rows over 2."""

import json
import random
import signal
import time

import jax
import numpy as np
import pytest

from gpt_neo.errors import EXIT_PREEMPTED
from tests.support.helpers import (
    SMALL_RUN,
    built_once,
    restore_params,
    start_main,
    write_config,
    write_text_dataset,
)

STEPS, EVERY = 60, 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text"), docs=80)


def config(tmp_path, dataset, name):
    keys = {
        **SMALL_RUN,
        "n_embd": 64,
        "n_ctx": 64,
        "local_attention_radius": 8,  # 7 earlier keys: within a chunk of 8
        "layout": "batch:y,sequence:x",
        "res_dropout": 0.1,
        "train_steps": STEPS,
        "lr": 2e-3,
        "warmup_steps": 5,
        "keep_checkpoints": 2,
        "datasets": [[dataset, 1, "packed", 1.0]],
        "model_path": str(tmp_path / name),
    }
    return write_config(tmp_path / f"{name}.json", keys)


def start(model):
    return start_main("--model", model, "--steps_per_checkpoint", str(EVERY))


def finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def wait_until(condition, process, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended early: {process.communicate()[0][-2000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def logged_steps(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return max((json.loads(line)["step"] for line in lines), default=0)


def checkpoint_steps(run):
    folder = run / "checkpoints"
    if not folder.exists():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def params_at(run, step):
    return jax.tree.leaves(restore_params(f"{run}/checkpoints/{step}/state"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset):
    def train(folder):  # the same documents on every worker: `dataset` is deterministic
        code, out = finish(start(config(folder, dataset, "full")))
        assert code == 0, out[-2000:]

    folder = built_once(tmp_path_factory, "preemption-uninterrupted", train)
    return params_at(folder / "full", STEPS)


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.process
def test_sigterm_saves_and_a_restart_finishes_like_an_uninterrupted_run(
    tmp_path, dataset, uninterrupted
):
    model = config(tmp_path, dataset, "run")
    run = tmp_path / "run"
    process = start(model)
    wait_until(lambda: logged_steps(run) >= 13, process)
    process.send_signal(signal.SIGTERM)
    code, out = finish(process)
    assert code == EXIT_PREEMPTED, out[-2000:]
    saved = checkpoint_steps(run)[-1]
    assert 13 <= saved < STEPS and f"preempted: saved step {saved}" in out
    code, out = finish(start(model))
    assert code == 0 and f"training from step {saved}" in out, out[-2000:]
    assert_same(params_at(run, STEPS), uninterrupted)


@pytest.mark.process
def test_kill_9_at_a_random_point_then_restart_finishes_like_an_uninterrupted_run(
    tmp_path, dataset, uninterrupted
):
    model = config(tmp_path, dataset, "run")
    run = tmp_path / "run"
    process = start(model)
    wait_until(lambda: EVERY in checkpoint_steps(run), process)
    time.sleep(random.uniform(0.0, 1.0))
    process.kill()  # SIGKILL: no chance to clean up
    process.communicate()
    code, out = finish(start(model))
    assert code == 0, out[-2000:]
    resumed_from = int(out.split("training from step ")[1].split()[0])
    assert resumed_from >= EVERY and resumed_from % EVERY == 0
    assert_same(params_at(run, STEPS), uninterrupted)
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.isdigit()]
    assert leftovers == []  # nothing half-written left behind
