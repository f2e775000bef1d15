"""One writer per model_path, locally and on `gs://` (the emulator, where the lock relies on
object generation preconditions): a live holder refuses others, a gone one is taken over."""

import dataclasses
import json
import socket
import subprocess
import sys
import time

import pytest

from gpt_neo import run_lock
from gpt_neo.errors import RunLocked
from tests.gcs_emulator import gcs  # noqa: F401 (the session's emulator)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_holder(lock: run_lock.RunLock, **changes) -> None:
    """Put a lock of another run in place, as that run would have left it."""
    now = time.time()
    holder = run_lock.Holder("elsewhere", 4242, now - 3600, now, "other")
    data = json.dumps(dataclasses.asdict(dataclasses.replace(holder, **changes))).encode()
    run_lock.storage.tf().io.gfile.makedirs(lock.model_path)
    with run_lock.storage.tf().io.gfile.GFile(lock.path, "wb") as handle:
        handle.write(data)


@pytest.fixture(params=["local", "gs"])
def model_path(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    request.getfixturevalue("gcs")
    return f"gs://test-bucket/locks/{tmp_path.name}"


def test_a_held_lock_refuses_a_second_run_until_released(model_path):
    holder = f"host {socket.gethostname()}, pid \\d+, since"
    with run_lock.RunLock(model_path), pytest.raises(RunLocked, match=holder):
        run_lock.RunLock(model_path).acquire()
    with run_lock.RunLock(model_path):  # released: free again
        pass
    assert not run_lock.storage.exists(f"{model_path}/{run_lock.LOCK_NAME}")


def test_a_live_holder_elsewhere_is_respected(model_path):
    lock = run_lock.RunLock(model_path)
    write_holder(lock)  # another host, refreshed just now
    with pytest.raises(RunLocked, match="host elsewhere, pid 4242"):
        lock.acquire()


@pytest.mark.parametrize(
    "gone",
    [
        "its process ended on this host",
        "it has not been refreshed for longer than STALE_SECONDS",
        "its file is half-written",
    ],
)
def test_a_gone_holder_is_taken_over(model_path, gone):
    lock = run_lock.RunLock(model_path)
    if gone.startswith("its process"):
        write_holder(lock, host=socket.gethostname(), pid=dead_pid())
    elif gone.startswith("it has not"):
        write_holder(lock, refreshed=time.time() - run_lock.STALE_SECONDS - 1)
    else:
        write_holder(lock)
        with run_lock.storage.tf().io.gfile.GFile(lock.path, "wb") as handle:
            handle.write(b'{"host": "elsew')
    with lock:
        held = json.loads(run_lock.storage.read_text(lock.path))
        assert held["host"] == socket.gethostname() and held["token"] != "other"


def test_the_lock_is_refreshed_while_held(model_path, monkeypatch):
    monkeypatch.setattr(run_lock, "REFRESH_SECONDS", 0.2)
    with run_lock.RunLock(model_path) as lock:
        first = json.loads(run_lock.storage.read_text(lock.path))["refreshed"]
        deadline = time.monotonic() + 20
        while refreshed_at(lock.path) in (first, None):
            assert time.monotonic() < deadline, "never refreshed"
            time.sleep(0.1)


def refreshed_at(path):
    """The lock's refresh time; None while a rewrite is under way (every 0.2 s here, so the
    emulator may be between an object's generations when this reads it)."""
    try:
        return json.loads(run_lock.storage.read_text(path))["refreshed"]
    except (run_lock.storage.tf().errors.OpError, ValueError):
        return None
