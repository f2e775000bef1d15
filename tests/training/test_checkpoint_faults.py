"""Faults around checkpoints, with real processes: a disk that fills up, a checkpoint damaged
on disk, two runs on one model_path. Every case ends in one clear line, an intact earlier
checkpoint, and (after the fault is cleared) the same final parameters as an uninterrupted run."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from gpt_neo.errors import EXIT_PREEMPTED, EXIT_STORAGE_FULL, EXIT_USER_ERROR
from tests.support.devices import cpu_flags
from tests.support.helpers import (
    REPO,
    SMALL_RUN,
    built_once,
    restore_params,
    write_config,
    write_text_dataset,
)

STEPS, EVERY = 20, 5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text"), docs=60)


def config(folder, dataset, model_path, steps=STEPS, keep=2):
    keys = {
        **SMALL_RUN,
        "n_embd": 64,
        "n_ctx": 64,
        "local_attention_radius": 16,
        "train_steps": steps,
        "warmup_steps": 5,
        "keep_checkpoints": keep,
        "datasets": [[dataset, 1, "documents_random", 1.0]],
        "model_path": str(model_path),
    }
    return write_config(folder / f"{uuid.uuid4().hex[:8]}.json", keys)


def start(model, *, file_size_limit=None):
    """`python main.py` on 8 simulated devices; `file_size_limit` in bytes (ulimit -f, set by
    the shell: a preexec_fn would fork this multithreaded process)."""
    env = {
        **os.environ,
        "XLA_FLAGS": cpu_flags(8),
        "JAX_PLATFORMS": "cpu",
    }
    command = [sys.executable, str(REPO / "main.py"), "--model", model]
    command += ["--steps_per_checkpoint", str(EVERY)]
    if file_size_limit is not None:
        blocks = max(1, file_size_limit // 1024)  # ulimit -f counts 1 KiB blocks
        command = ["bash", "-c", f'ulimit -f {blocks} && exec "$@"', "bash", *command]
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process, timeout=300):
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def steps_in(run):
    folder = run / "checkpoints"
    return (
        sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    )


def params_at(run, step):
    import jax

    return jax.tree.leaves(restore_params(f"{run}/checkpoints/{step}/state"))


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def error_lines(out):
    return [line for line in out.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset):
    def train(folder):  # the same documents on every worker: `dataset` is deterministic
        code, out = finish(start(config(folder, dataset, folder / "run")))
        assert code == 0, out[-2000:]

    return params_at(built_once(tmp_path_factory, "faults-uninterrupted", train) / "run", STEPS)


def preempt_after_first_checkpoint(model, run):
    """Train until the first checkpoint exists, then SIGTERM: checkpoints up to some step."""
    process = start(model)
    deadline = time.monotonic() + 240
    while EVERY not in steps_in(run):
        assert process.poll() is None, process.communicate()[0][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    code, out = finish(process)
    assert code == EXIT_PREEMPTED, out[-2000:]
    return steps_in(run)[-1]


@contextlib.contextmanager
def small_filesystem(path, size_mib):
    """A real tmpfs of `size_mib` mounted at `path`; None where this user cannot mount one
    (not root), and the caller falls back to a file-size limit."""
    path.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def tree_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.process
def test_a_full_disk_stops_the_run_with_one_line_and_the_last_checkpoint_resumes(
    tmp_path, dataset, uninterrupted
):
    with contextlib.ExitStack() as stack:
        # a real small filesystem where one can be mounted (root), else a file-size limit
        mounted = stack.enter_context(small_filesystem(tmp_path / "small", 64))
        root, kind = (mounted, "tmpfs") if mounted else (tmp_path, "file-size limit")
        run = root / "run"
        model = config(tmp_path, dataset, run)
        saved = preempt_after_first_checkpoint(model, run)
        checkpoint = tree_bytes(run / "checkpoints" / str(saved))
        limit = None
        if kind == "tmpfs":  # leave less room than one more checkpoint needs
            free = os.statvfs(root).f_bavail * os.statvfs(root).f_frsize
            (root / "filler").write_bytes(b"\0" * (free - checkpoint // 3))
        else:  # no file may grow past a third of the checkpoint's largest
            largest = max(f.stat().st_size for f in run.rglob("*") if "checkpoints" in str(f))
            limit = largest // 3
        code, out = finish(start(model, file_size_limit=limit))
        (tmp_path / "out.txt").write_text(out)
        assert code == EXIT_STORAGE_FULL, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        [line] = error_lines(out)
        assert "out of space" in line and str(run) in line, line
        assert f"step {saved} is intact" in line, line
        assert steps_in(run)[-1] == saved  # nothing new looks complete
        leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.isdigit()]
        assert leftovers == []  # the half-written one is gone, its space freed
        with contextlib.suppress(FileNotFoundError):
            (root / "filler").unlink()
        code, out = finish(start(model))
        assert code == 0 and f"training from step {saved}" in out, out[-3000:]
        assert_same(params_at(run, STEPS), uninterrupted)


def flip_bytes(path, offset=None):
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def array_file(step_dir):
    """The largest file of the train state: array data."""
    return max(
        (f for f in (step_dir / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size
    )


DAMAGE = {
    "array data flipped": lambda step_dir: flip_bytes(array_file(step_dir)),
    "metadata flipped": lambda step_dir: flip_bytes(step_dir / "data" / "metadata", offset=0),
    "array file truncated": lambda step_dir: array_file(step_dir).write_bytes(
        array_file(step_dir).read_bytes()[:100]
    ),
}


@pytest.mark.process
def test_damaged_checkpoints_are_set_aside_the_newest_intact_resumes_and_none_is_exit_2(
    tmp_path, dataset
):
    """Each kind of damage on one of the three newest checkpoints: the restart names all three,
    moves them aside (kept, not deleted), resumes from the fourth and makes the same steps
    again; then, with every checkpoint damaged, one error line and exit 2."""
    run = tmp_path / "run"
    model = config(tmp_path, dataset, run, keep=4)
    code, out = finish(start(model))
    assert code == 0, out[-2000:]
    assert steps_in(run) == [5, 10, 15, 20]
    manifest = json.loads((run / "checkpoints/20/checksums.json").read_text())["files"]
    assert any(name.startswith("state/") for name in manifest)
    before = params_at(run, STEPS)
    damaged = dict(zip((20, 15, 10), sorted(DAMAGE), strict=True))
    for step, damage in damaged.items():
        DAMAGE[damage](run / "checkpoints" / str(step))
    code, out = finish(start(model))
    assert code == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if line.startswith("warning: checkpoint")]
    assert len(warnings) == 3, out[-3000:]
    for line, step in zip(warnings, damaged, strict=True):  # newest first
        assert f"checkpoints/{step} is damaged" in line, line
    assert "training from step 5" in out
    aside = sorted(p.name.split("-")[0] for p in (run / "damaged_checkpoints").iterdir())
    assert aside == ["10", "15", "20"]
    assert_same(params_at(run, STEPS), before)  # steps 6-20 made again, the same

    for step in steps_in(run):
        flip_bytes(array_file(run / "checkpoints" / str(step)))
    code, out = finish(start(model))
    assert code == EXIT_USER_ERROR, out[-3000:]
    assert "Traceback" not in out
    [line] = error_lines(out)
    assert "no intact checkpoint" in line and "--new" in line, line


HOLD_THE_LOCK = """
import sys, time
from gpt_neo.training.checkpoint.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.process
def test_a_run_is_refused_while_another_holds_the_lock_and_takes_a_killed_holders_lock(
    tmp_path, dataset, uninterrupted
):
    """Another live process holds model_path's lock: the run is refused, naming it. Once that
    holder is killed with -9 (its lock left behind), the run takes the lock over and trains.
    (bench/chaos.py's restarts take over the locks of killed training runs, again and again.)"""
    run = tmp_path / "run"
    model = config(tmp_path, dataset, run)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, out = finish(start(model))
        assert code == EXIT_USER_ERROR, out[-2000:]
        [line] = error_lines(out)
        assert f"pid {holder.pid}" in line and "in use by another run" in line, line
    finally:
        holder.kill()  # kill -9: the lock stays behind
        holder.communicate()
    assert str(holder.pid) in (run / "run.lock").read_text()
    code, out = finish(start(model))
    assert code == 0, out[-2000:]
    assert not (run / "run.lock").exists()  # released on the way out
    assert_same(params_at(run, STEPS), uninterrupted)


@pytest.mark.parametrize("root", ["local", "ram://manifest-test"])
def test_checksums_name_what_changed(tmp_path, root):
    """gpt_neo.training.checkpoint.manifest on its own, local and through gfile (`ram://` stands in for
    `gs://`): each kind of change is named, an unchanged folder passes."""
    from gpt_neo import storage
    from gpt_neo.training.checkpoint import manifest as checkpoint_manifest

    step = f"{tmp_path if root == 'local' else root}/checkpoints/7"
    storage.makedirs(f"{step}/state/d")
    storage.makedirs(f"{step}/data")
    payload = bytes(range(256)) * 64
    storage.write_bytes_atomic(f"{step}/state/d/array", payload)
    storage.write_text_atomic(f"{step}/data/metadata", '{"epoch": 1}')
    assert checkpoint_manifest.damage(step) is None and not checkpoint_manifest.recorded(step)
    checkpoint_manifest.write(step)
    assert checkpoint_manifest.damage(step) is None

    flipped = bytearray(payload)
    flipped[1000] ^= 1
    storage.write_bytes_atomic(f"{step}/state/d/array", bytes(flipped))
    assert "state/d/array does not match its checksum" in checkpoint_manifest.damage(step)
    storage.write_bytes_atomic(f"{step}/state/d/array", payload[:100])
    assert "state/d/array has 100 bytes, 16384 were written" in checkpoint_manifest.damage(step)
    storage.delete_tree(f"{step}/data/metadata")
    storage.write_bytes_atomic(f"{step}/state/d/array", payload)
    assert "data/metadata is missing" in checkpoint_manifest.damage(step)
    storage.write_text_atomic(f"{step}/{checkpoint_manifest.MANIFEST}", '{"files": ')
    assert "unreadable" in checkpoint_manifest.damage(step)


@pytest.mark.process
def test_chaos_two_kills_one_aimed_at_a_checkpoint_write_a_sigterm_storm_and_a_nan(tmp_path):
    """bench/chaos.py at 2 kills (the closing note of issue 14 reports 20): the run ends
    bit-identical to an uninterrupted one, no checkpoint on disk fails its checksums, and the
    NaN stops the run before its step is saved."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "chaos.py"), "--kills", "2", "--steps", "80"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "kill 2/2 while writing a checkpoint" in out
    assert "NaN injected before step" in out and "exit 3 (3 = diverged)" in out
    assert (
        "kills survived 2/2, bit-identical yes, corrupt checkpoints 0, SIGTERM storm exit 75, "
        "NaN stopped yes" in out
    )
