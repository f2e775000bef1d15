"""One writer per model_path, locally and on `gs://` (the emulator, where the lock relies on
object generation preconditions): a live holder refuses others, a gone one is taken over."""

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import pytest

from gpt_neo.errors import RunLocked
from gpt_neo.training.checkpoint import run_lock
from tests.support.gcs_emulator import gcs  # noqa: F401 (the session's emulator)


def dead_pid() -> int:
    """A process id no process of this host has (from the top of the pid range, down)."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def write_holder(lock: run_lock.RunLock, **changes) -> None:
    """Put a lock of another run in place, as that run would have left it."""
    now = time.time()
    holder = run_lock.Holder("elsewhere", 4242, now - 3600, now, "other")
    data = json.dumps(dataclasses.asdict(dataclasses.replace(holder, **changes))).encode()
    run_lock.storage.tf().io.gfile.makedirs(lock.model_path)
    with run_lock.storage.tf().io.gfile.GFile(lock.path, "wb") as handle:
        handle.write(data)


@pytest.fixture(params=["local", pytest.param("gs", marks=pytest.mark.emulator)])
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


# --------------------------------------------------------------------------------------------
# Runs the pod launcher starts: a recreated TPU VM is another host, and its killed process
# cannot be asked about, so the launch run's own attempts take over from each other.

RUN = run_lock.node_path("proj", "us-central2-b", "pod")


def launched(monkeypatch, attempt: str, run: str = RUN) -> None:
    """This process is worker 0 of `attempt` of the launch run on `run`, as the launcher's
    worker command sets it up."""
    monkeypatch.setenv(run_lock.LAUNCH_RUN_ENV, run)
    monkeypatch.setenv(run_lock.LAUNCH_ATTEMPT_ENV, attempt)


def held_by_attempt(attempt: str, run: str = RUN) -> dict:
    """A live holder on a VM that no longer exists (another host, refreshed just now)."""
    return {"host": "t1v-n-0badf00d-w-0", "pid": 7, "launch": run_lock.Launch(run, attempt)}


def test_a_later_attempt_of_the_launch_run_takes_over_from_an_earlier_one(
    model_path, monkeypatch, capsys
):
    lock = run_lock.RunLock(model_path)
    write_holder(lock, **held_by_attempt("20261206-120000-aaaaaa-1"))
    launched(monkeypatch, "20261206-120000-aaaaaa-2")
    with lock:
        held = run_lock.peek(model_path)
        assert held.launch == run_lock.Launch(RUN, "20261206-120000-aaaaaa-2")
        assert held.host == socket.gethostname()
    said = capsys.readouterr().out
    assert "took over" in said and "an earlier attempt of this launch run" in said
    assert "the pod launcher's run on TPU pod (us-central2-b, project proj)" in said


def test_an_attempt_started_twice_and_other_runs_are_refused(model_path, monkeypatch):
    lock = run_lock.RunLock(model_path)
    write_holder(lock, **held_by_attempt("20261206-120000-aaaaaa-2"))
    launched(monkeypatch, "20261206-120000-aaaaaa-2")  # the same attempt again
    with pytest.raises(RunLocked, match="attempt 20261206-120000-aaaaaa-2: host t1v-n-0badf00d"):
        lock.acquire()
    launched(monkeypatch, "x-1", run=run_lock.node_path("proj", "europe-west4-a", "other"))
    with pytest.raises(RunLocked, match=r"is in use by another run .*TPU pod"):
        lock.acquire()
    monkeypatch.delenv(run_lock.LAUNCH_RUN_ENV)  # a run started by hand
    with pytest.raises(RunLocked, match=r"the lock is free after \d\d:\d\d:\d\d"):
        lock.acquire()
    write_holder(lock)  # a run started by hand holds it: a launched worker is refused
    launched(monkeypatch, "20261206-120000-aaaaaa-3")
    with pytest.raises(RunLocked, match="host elsewhere, pid 4242"):
        lock.acquire()


def test_a_holder_the_launcher_found_gone_is_taken_over_by_its_token(model_path, monkeypatch):
    lock = run_lock.RunLock(model_path)
    write_holder(lock)  # live, another host: only the launcher's word frees it
    monkeypatch.setenv(run_lock.TAKEOVER_ENV, "a-different-token")
    with pytest.raises(RunLocked):
        lock.acquire()
    monkeypatch.setenv(run_lock.TAKEOVER_ENV, "other")
    with lock:
        assert run_lock.peek(model_path).token != "other"


def test_a_lock_written_before_launch_runs_existed_still_reads(tmp_path):
    lock = run_lock.RunLock(str(tmp_path))
    write_holder(lock)
    data = json.loads(run_lock.storage.read_text(lock.path))
    del data["launch"]
    run_lock.storage.write_text_atomic(lock.path, json.dumps(data))
    assert run_lock.peek(str(tmp_path)) == run_lock.Holder(**data)
