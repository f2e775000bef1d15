"""The TPU pod launcher (`main.py --tpu NAME --zone Z --accelerator_type T`) against a fake
`gcloud` (tests/support/fake_gcloud.py) that simulates a slice of 2 workers as local processes.

Most tests give the fake VM image a stand-in `python3` (a bash script) so that the launcher's
decisions are tested in seconds; the end-to-end test runs the real main.py on 2 workers x 4
simulated devices and preempts the slice mid-run.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt_neo import storage
from gpt_neo.training.checkpoint import run_lock
from tests.support.devices import cpu_flags
from tests.support.fake_gcloud import install
from tests.support.gcs_emulator import gcs  # noqa: F401 (the session's emulator)
from tests.support.helpers import REPO, SMALL_RUN, restore_params, write_config, write_text_dataset

ZONE, TYPE = "us-central2-b", "v4-16"  # v4-16: 2 worker VMs, as the fake simulates
LAUNCHED: list[subprocess.Popen] = []  # this test's launchers, killed at its end


@pytest.fixture
def fake(tmp_path):
    """(environment with the fake gcloud first on PATH, its state folder)."""
    state = tmp_path / "gcloud"
    bin_dir = install(tmp_path / "bin", state)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_GCLOUD_STATE": str(state),
        "FAKE_GCLOUD_WORKERS": "2",
        # a killed ssh client closes its output at once, as a real one does
        "FAKE_GCLOUD_SSH_RELAY": "1",
        "FAKE_GCLOUD_SSH_RETRY_SECONDS": "0.2",  # gcloud's 5 s between reruns of an ssh
        "XDG_CACHE_HOME": str(tmp_path / "cache"),  # the launcher's claim on a slice
    }
    yield env, state
    for launcher in LAUNCHED:  # a test that failed may leave its launcher running
        launcher.kill()
        launcher.wait()
    LAUNCHED.clear()
    subprocess.run([bin_dir / "gcloud", "fake", "kill-all"], env=env, capture_output=True)


def vm_image(env, tmp_path, python3=None, devices=4, extra: dict | None = None) -> None:
    """What the fake's worker VMs have: this venv's Python (or a stand-in `python3` script) on
    PATH, simulated CPU devices, and `extra` (the GCS emulator's settings, standing in for a
    VM's access to Cloud Storage)."""
    bin_dir = tmp_path / "vm-bin"
    bin_dir.mkdir(exist_ok=True)
    if python3 is not None:
        stub = bin_dir / "python3"
        stub.write_text(python3)
        stub.chmod(0o755)
    env["FAKE_GCLOUD_VM_ENV"] = json.dumps(
        {
            "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
            "XLA_FLAGS": cpu_flags(devices),
            "JAX_PLATFORMS": "cpu",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **(extra or {}),
        }
    )


def stub(body: str) -> str:
    """A stand-in for main.py on a worker: records its pid and attempt, exits 75 on SIGTERM
    (as main.py does after saving), then runs `body`."""
    return (
        "#!/bin/bash\n"
        'echo $$ >> "$HOME/pids"\n'
        'attempt=$(( $(cat "$HOME/attempts" 2>/dev/null || echo 0) + 1 ))\n'
        'echo $attempt > "$HOME/attempts"\n'
        "trap 'echo TERM >> \"$HOME/signals\"; exit 75' TERM\n" + body
    )


FINISH = 'for i in 1 2 3 4; do echo "step $i/4 | loss 1.0"; sleep 0.1; done\n'


def model_config(tmp_path, **keys) -> str:
    return write_config(
        tmp_path / "model.json", {**SMALL_RUN, "model_path": str(tmp_path / "run"), **keys}
    )


def launch(env, tmp_path, *flags, model=None, name="pod", shared_filesystem=True):
    command = launch_command(tmp_path, *flags, model=model, name=name)
    if not shared_filesystem:
        command.remove("--shared_filesystem")
    launcher = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    LAUNCHED.append(launcher)
    return launcher


def launch_command(tmp_path, *flags, model=None, name="pod") -> list[str]:
    return [
        sys.executable,
        str(REPO / "main.py"),
        "--model",
        model or model_config(tmp_path),
        "--tpu",
        name,
        "--zone",
        ZONE,
        "--accelerator_type",
        TYPE,
        "--shared_filesystem",  # the fake's workers are local processes: they share a disk
        "--poll_seconds",
        "1",
        "--create_retry_seconds",
        "0.2",
        "--worker_setup",
        'echo setup >> "$HOME/setup.log"',
        "--launch_logs",
        str(tmp_path / "logs" / name),
        *flags,
    ]


def finish(process, timeout=120) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out


def calls(state) -> list[list[str]]:
    """Each gcloud call's arguments, in order (none before the first call)."""
    log = state / "calls.jsonl"
    return (
        [json.loads(line)["argv"] for line in log.read_text().splitlines()] if log.exists() else []
    )


def verbs(state) -> list[str]:
    """Each gcloud call as its verb: create, delete, ssh, scp, describe, fake preempt..."""
    known = ("create", "delete", "describe", "ssh", "scp", "list", "preempt", "stall")
    return [next((w for w in argv if w in known), argv[0]) for argv in calls(state)]


def disk(state, worker: int, name="pod") -> Path:
    return state / "disks" / name / f"worker-{worker}"


def gcloud(env, *args) -> str:
    return subprocess.run(
        ["gcloud", *args], env=env, capture_output=True, text=True, check=True
    ).stdout


def started(process, state, workers=(0, 1)) -> None:
    """Wait until the stand-in main.py runs on `workers` (it records its pid first)."""
    deadline = time.monotonic() + 60
    while not all((disk(state, w) / "pids").exists() for w in workers):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)


def running_on(env, worker: int, name="pod") -> set[int]:
    """The process ids that run on a worker VM (ids as the VM counts them), zombies left out."""
    listing = gcloud(
        env, "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={ZONE}", f"--worker={worker}",
        "--command=ps -e -o pid=,stat=",
    )  # fmt: skip
    return {int(pid) for pid, stat in map(str.split, listing.splitlines()) if "Z" not in stat}


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing created


def test_no_gcloud_on_path(tmp_path, fake):
    env, _ = fake
    env["PATH"] = str(tmp_path / "empty")  # no gcloud (the machine's real one is not there)
    code, out = finish(launch(env, tmp_path))
    assert code == 2, out
    assert out.strip().splitlines()[-1].startswith("error: the TPU launcher needs the gcloud CLI")


@pytest.mark.parametrize(
    "setting, flags, message",
    [
        ({"FAKE_GCLOUD_LOGGED_OUT": "1"}, [], "gcloud is not logged in: run `gcloud auth login`"),
        ({}, ["--zone", "mars-north1-a"], "--zone mars-north1-a: gcloud cannot list TPU types"),
        ({}, ["--accelerator_type", "v9-1024"], "--accelerator_type v9-1024 is not offered"),
    ],
)
def test_bad_launch_input_creates_nothing(tmp_path, fake, setting, flags, message):
    env, state = fake
    env.update(setting)
    code, out = finish(launch(env, tmp_path, *flags))
    assert code == 2, out
    assert message in out.strip().splitlines()[-1]
    assert "create" not in verbs(state)


def test_multi_host_slice_needs_model_path_on_gs(tmp_path, fake):
    env, state = fake
    code, out = finish(launch(env, tmp_path, shared_filesystem=False))
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert "model_path is" in last and "2 worker VMs" in last and "gs://" in last
    assert "create" not in verbs(state)


@pytest.mark.parametrize(
    ("keys", "shared", "message"),
    [
        ({}, True, "the mesh 'x:4,y:2' does not say which axis crosses the slices"),
        (
            {"mesh_shape": "slice:4,x:2", "dcn_axes": "slice", "layout": "batch:slice+x"},
            True,
            "dcn_axes 'slice' spans 4 slices in mesh_shape 'slice:4,x:2', but --num_slices is 2",
        ),
        (
            {"mesh_shape": "slice:2,x:4", "dcn_axes": "slice", "layout": "batch:slice+x"},
            False,
            "model_path is",  # ... a local path, but the slices have 4 worker VMs
        ),
    ],
    ids=["no dcn_axes", "dcn_axes size", "local model_path"],
)
def test_bad_multi_slice_input_creates_nothing(tmp_path, fake, keys, shared, message):
    env, state = fake
    model = model_config(tmp_path, **keys)
    process = launch(env, tmp_path, "--num_slices", "2", model=model, shared_filesystem=shared)
    code, out = finish(process)
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert message in last and (shared or "4 worker VMs" in last)
    assert "create" not in verbs(state)


def test_a_failed_queued_resource_is_one_error_and_not_deleted(tmp_path, fake):
    """The TPU API could not grant the request (here: a VM took the node's name while it
    waited). Recreating it would fail the same way: one line, exit 2, and the queued resource
    stays for the user to look at."""
    env, state = fake
    env["FAKE_GCLOUD_QR_WAITING_DESCRIBES"] = "3"
    process = launch(env, tmp_path, "--queued")
    deadline = time.monotonic() + 60
    while "create" not in verbs(state):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.1)
    gcloud(env, "compute", "tpus", "tpu-vm", "create", "pod", f"--zone={ZONE}",
           f"--accelerator-type={TYPE}", "--version=tpu-ubuntu2204-base")  # fmt: skip
    code, out = finish(process)
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert "queued resource pod is FAILED" in last and "--force` and rerun" in last
    assert "delete" not in verbs(state)


def test_bucket_must_exist(tmp_path, fake, gcs):  # noqa: F811
    env, state = fake
    env.update(gcs.subprocess_env(env))
    model = model_config(tmp_path, model_path="gs://no-such-bucket/run")
    code, out = finish(launch(env, tmp_path, model=model))
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert "bucket gs://no-such-bucket does not exist" in last and "buckets create" in last
    assert "create" not in verbs(state)


def test_a_bucket_this_account_cannot_write_is_refused(gcs, monkeypatch):  # noqa: F811
    """The emulator has no permissions, so the denial the real service would send is
    injected where google-cloud-storage raises it."""
    from google.api_core import exceptions
    from google.cloud import storage

    from gpt_neo.launch import preflight
    from gpt_neo.launch.gcloud import LaunchError

    def denied(*args, **kwargs):
        raise exceptions.Forbidden("caller does not have storage.objects.create access")

    monkeypatch.setattr(storage.Blob, "upload_from_string", denied)
    with pytest.raises(LaunchError, match=r"cannot write to gs://test-bucket .*objectAdmin"):
        preflight.check_bucket("gs://test-bucket/run", None)
    monkeypatch.undo()
    preflight.check_bucket("gs://test-bucket/run", None)  # writable: no error, no probe left
    assert not gcs.list_objects("gs://test-bucket/run/.gpt-neo-write-check")


def test_launcher_refuses_modes_other_than_training(tmp_path, fake):
    env, state = fake
    code, out = finish(launch(env, tmp_path, "--predict"))
    assert code == 2 and "the pod launcher runs training" in out, out
    assert not (state / "calls.jsonl").exists() or "create" not in verbs(state)


# --------------------------------------------------------------------------------------------
# The state machine, with a stand-in main.py


def test_capacity_errors_on_create_are_retried_with_backoff(tmp_path, fake):
    env, state = fake
    env["FAKE_GCLOUD_CREATE_FAILURES"] = "2"
    vm_image(env, tmp_path, stub(FINISH))
    code, out = finish(launch(env, tmp_path))
    assert code == 0, out
    assert verbs(state).count("create") == 3
    assert out.count("no capacity") == 2 and "try 3 in" in out
    assert "[worker 0] step 4/4 | loss 1.0" in out
    # the code and the setup reached both workers, the setup ran once on each
    for worker in (0, 1):
        assert (disk(state, worker) / "setup.log").read_text() == "setup\n"


def test_the_default_worker_setup_installs_the_project_in_a_venv_once(tmp_path, fake):
    """The VM image's python3 stands in for venv creation (a pip that logs its arguments) and
    for main.py; the launcher's own default --worker_setup runs against it."""
    env, state = fake
    python3 = (
        "#!/bin/bash\n"
        'if [ "$1 $2" = "-m venv" ]; then\n'
        '  mkdir -p "$3/bin"; touch "$3/bin/activate"\n'
        """  printf '#!/bin/bash\\necho "$PWD: pip $*" >> "$HOME/pip.log"\\n' > "$3/bin/pip"\n"""
        '  chmod +x "$3/bin/pip"; exit 0\n'
        "fi\n" + FINISH
    )
    vm_image(env, tmp_path, python3)
    command = launch_command(tmp_path)
    del command[command.index("--worker_setup") : command.index("--worker_setup") + 2]
    for _ in range(2):  # the second launch finds the slice and the setup done: no pip again
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    assert verbs(state).count("create") == 1
    for worker in (0, 1):
        pip = (disk(state, worker) / "pip.log").read_text().splitlines()
        code_dir = disk(state, worker) / "gpt-neo"
        assert [line.split(": ", 1)[1] for line in pip] == [
            "pip install --quiet --upgrade pip",
            "pip install --quiet .[tpu]",
        ]
        assert pip[0].startswith(str(code_dir))  # run in the shipped code's folder
        assert (code_dir / "venv" / "bin" / "pip").exists()


@pytest.mark.parametrize("exit_code", [2, 3])
def test_bad_input_and_divergence_are_not_retried(tmp_path, fake, exit_code):
    env, state = fake
    vm_image(env, tmp_path, stub(f'echo "error: the run cannot go on"; exit {exit_code}\n'))
    code, out = finish(launch(env, tmp_path))
    assert code == exit_code, out
    assert "not retried" in out and "error: the run cannot go on" in out
    assert (disk(state, 0) / "attempts").read_text().strip() == "1"
    assert "delete" not in verbs(state)


def test_failures_have_their_own_budget(tmp_path, fake):
    env, state = fake
    vm_image(env, tmp_path, stub('echo "Traceback: a bug"; exit 1\n'))
    code, out = finish(launch(env, tmp_path, "--max_failures", "2"))
    assert code == 1, out
    assert "giving up: 3 failures, more than --max_failures 2" in out
    assert (disk(state, 0) / "attempts").read_text().strip() == "3"
    assert "delete" not in verbs(state)  # a crash of the run is not a reason to recreate


def test_hung_worker_is_caught_by_the_heartbeat_and_relaunched(tmp_path, fake):
    """Attempt 1 logs one step, then hangs (alive, silent); the launcher kills it by its
    recorded pid and relaunches on the same slice."""
    env, state = fake
    hang_once = 'if [ "$attempt" = 1 ]; then echo "step 1/4 | loss 1.0"; sleep 600; fi\n'
    vm_image(env, tmp_path, stub(hang_once + FINISH))
    code, out = finish(launch(env, tmp_path, "--heartbeat_timeout", "3"))
    assert code == 0, out
    assert "no step logged for" in out and "kill it and relaunch" in out
    assert "killed the previous run process" in out
    for worker in (0, 1):
        pids = [int(p) for p in (disk(state, worker) / "pids").read_text().split()]
        assert len(pids) == 2 and running_on(env, worker).isdisjoint(pids)
    assert "delete" not in verbs(state)


def test_ctrl_c_asks_the_workers_to_save_and_stops_them(tmp_path, fake):
    env, state = fake
    forever = 'i=0; while true; do i=$((i+1)); echo "step $i/1000 | loss 1.0"; sleep 0.1; done\n'
    vm_image(env, tmp_path, stub(forever))
    process = launch(env, tmp_path)
    started(process, state)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    code, out = finish(process)
    assert code == 130, out
    assert "asking the workers to save a checkpoint and stop" in out
    for worker in (0, 1):
        assert (disk(state, worker) / "signals").read_text() == "TERM\n"  # main.py saves on it
        pids = [int(p) for p in (disk(state, worker) / "pids").read_text().split()]
        assert running_on(env, worker).isdisjoint(pids)


def test_queued_resource_preempted_is_force_deleted_and_recreated(tmp_path, fake):
    env, state = fake
    # attempt 1 runs until the test preempts the slice; on the fresh disks, it finishes
    marker = tmp_path / "preempted"
    body = f'if [ ! -e "{marker}" ]; then sleep 600; fi\n' + FINISH
    vm_image(env, tmp_path, stub(body))
    process = launch(env, tmp_path, "--queued", "--spot", "--delete_when_done")
    started(process, state)
    marker.touch()
    gcloud(env, "fake", "preempt", "pod")
    code, out = finish(process)
    assert code == 0, out
    calls = [json.loads(line)["argv"] for line in (state / "calls.jsonl").read_text().splitlines()]
    queued = [c for c in calls if "queued-resources" in c and c[3] in ("create", "delete")]
    assert [c[3] for c in queued] == ["create", "delete", "create", "delete"]
    assert "--force" in queued[1] and "--spot" in queued[0]
    assert "is SUSPENDED" in out and "deleted TPU pod" in out


# --------------------------------------------------------------------------------------------
# What the workers' shell reports: a death by a signal is not ssh's 255, which gcloud would rerun


def test_a_worker_killed_by_a_signal_is_relaunched_with_the_others_never_rerun_alone(
    tmp_path, fake
):
    """`gcloud ... ssh` reruns a command on one worker when ssh says 255, which an exec'd
    main.py killed by a signal makes it say: the shell reports 137 instead, and the launcher
    relaunches every worker."""
    env, state = fake
    oom_once = (  # worker 1 is killed; worker 0's next collective then fails
        'if [ "$attempt" = 1 ] && [ "$GPT_NEO_PROCESS_ID" = 1 ]; then kill -KILL $$; fi\n'
        'if [ "$attempt" = 1 ]; then sleep 1; exit 1; fi\n'
    )
    vm_image(env, tmp_path, stub(oom_once + FINISH))
    code, out = finish(launch(env, tmp_path, "--max_failures", "1"))
    assert code == 0, out
    assert "worker exit codes [1, 137] (worker 0 exited 1, worker 1 was killed by SIGKILL" in out
    assert "relaunch every worker (failures 1/1)" in out
    assert "Retrying: SSH command error" not in out
    for worker in (0, 1):  # twice each: attempt 1 and attempt 2, nothing rerun behind our back
        assert (disk(state, worker) / "attempts").read_text().strip() == "2"


def test_a_lost_connection_relaunches_every_worker_and_gcloud_cannot_start_a_second_copy(
    tmp_path, fake
):
    """The connection to worker 0 drops while its run goes on: gcloud runs the command again
    there, the shell refuses to start that attempt twice, and the launcher relaunches every
    worker after killing the first attempt's processes."""
    env, state = fake
    forever_once = 'if [ "$attempt" = 1 ]; then echo "step 1/4 | loss 1.0"; sleep 600; fi\n'
    vm_image(env, tmp_path, stub(forever_once + FINISH))
    process = launch(env, tmp_path)
    started(process, state)
    first = {w: int((disk(state, w) / "pids").read_text()) for w in (0, 1)}
    gcloud(env, "fake", "disconnect", "pod", "--worker=0")
    code, out = finish(process)
    assert code == 0, out
    assert "Retrying: SSH command error" in out  # gcloud did run it again...
    assert "was started on this worker already" in out  # ...and the shell refused
    assert "worker exit codes [254, 255], TPU is READY: the connection to worker 0" in out
    assert "relaunch every worker on the same slice" in out
    for worker in (0, 1):
        assert (disk(state, worker) / "attempts").read_text().strip() == "2"
        assert first[worker] not in running_on(env, worker)  # the orphan was killed


def test_a_second_launcher_for_the_same_slice_is_refused(tmp_path, fake):
    env, state = fake
    forever = 'while true; do echo "step 1/9 | loss 1.0"; sleep 0.2; done\n'
    vm_image(env, tmp_path, stub(forever))
    first = launch(env, tmp_path)
    started(first, state)
    code, out = finish(launch(env, tmp_path))
    assert code == 2, out
    assert (
        out.strip().splitlines()[-1].startswith(f"error: another launcher (pid {first.pid}, since ")
    )
    assert "drives TPU pod" in out
    first.send_signal(signal.SIGINT)
    assert finish(first)[0] == 130
    assert (disk(state, 0) / "attempts").read_text().strip() == "1"  # never disturbed


# --------------------------------------------------------------------------------------------
# The run lock across attempts, with a stand-in main.py that takes the real lock


def locking_worker(tmp_path) -> str:
    """A stand-in main.py that does with the run lock what a training run does: process 0
    takes it (with the environment the launcher's worker command sets) and logs a step."""
    program = tmp_path / "locking_worker.py"
    program.write_text(
        "import os, sys\n"
        "sys.path.insert(0, os.getcwd())  # the shipped code\n"
        "from gpt_neo.errors import UserError\n"
        "from gpt_neo.training.checkpoint.run_lock import RunLock\n"
        "if os.environ['GPT_NEO_PROCESS_ID'] == '0':\n"
        "    try:\n"
        "        RunLock(sys.argv[1]).acquire()\n"
        "    except UserError as err:\n"
        "        sys.exit(f'error: {err}')\n"
        "print('step 1/1 | loss 1.0')\n"
    )
    model_path = tmp_path / "run"
    return stub(f'"{sys.executable}" "{program}" "{model_path}" || exit 2\n')


def hold_lock(tmp_path, **holder) -> None:
    """model_path's lock as another run left it: live (refreshed just now) unless told."""
    now = time.time()
    fields = {"host": "t1v-n-0badf00d-w-0", "pid": 9, "since": now, "refreshed": now}
    fields |= {"token": "theirs", **holder}
    lock = run_lock.RunLock(str(tmp_path / "run"))
    Path(lock.path).parent.mkdir(parents=True, exist_ok=True)
    Path(lock.path).write_bytes(run_lock._encode(run_lock.Holder(**fields)))


def test_two_independent_runs_collide_and_the_second_is_refused_before_anything_is_created(
    tmp_path, fake
):
    env, state = fake
    vm_image(env, tmp_path, locking_worker(tmp_path))
    with run_lock.RunLock(str(tmp_path / "run")):  # a run on this workstation trains there
        code, out = finish(launch(env, tmp_path))
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"error: model_path {tmp_path / 'run'} is in use by another run (host")
    assert f"pid {os.getpid()}" in last and "is free after" in last
    assert "create" not in verbs(state)

    # another launcher's run on a slice that is READY
    gcloud(env, "compute", "tpus", "tpu-vm", "create", "other", f"--zone={ZONE}",
           "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base")  # fmt: skip
    other = run_lock.Launch(run_lock.node_path("fake-project", ZONE, "other"), "x-4")
    hold_lock(tmp_path, launch=other)
    code, out = finish(launch(env, tmp_path))
    assert code == 2, out
    last = out.strip().splitlines()[-1]
    assert "the pod launcher's run on TPU other (us-central2-b, project fake-project)" in last
    assert "TPU other is READY: stop that launcher (Ctrl-C) or delete that slice" in last
    assert verbs(state).count("create") == 1  # "other" only

    # that slice is gone: its run is over, and the workers take its lock over
    gcloud(env, "compute", "tpus", "tpu-vm", "delete", "other", f"--zone={ZONE}")
    code, out = finish(launch(env, tmp_path))
    assert code == 0, out
    assert "is over: TPU other is gone; the workers take it over" in out
    assert "the pod launcher found that run gone before starting this one" in out


def test_rerunning_the_launcher_resumes_when_its_slice_was_recreated_meanwhile(tmp_path, fake):
    """The launcher died (a closed laptop); meanwhile the slice was preempted and its worker 0,
    the lock's holder, went with it. The rerun command is the same launch run: its attempt
    takes the lock over at once, where a run started by hand waits ten minutes."""
    env, _ = fake
    vm_image(env, tmp_path, locking_worker(tmp_path))
    ours = run_lock.Launch(run_lock.node_path("fake-project", ZONE, "pod"), "20261206-0-abc-7")
    hold_lock(tmp_path, launch=ours)
    code, out = finish(launch(env, tmp_path))
    assert code == 0, out
    assert "run lock" not in out.split("[launcher")[0]  # nothing for the launcher to decide
    assert "took over" in out and "an earlier attempt of this launch run" in out


# --------------------------------------------------------------------------------------------
# End to end: the real main.py on 2 slices x 2 workers x 2 devices


STEPS, EVERY = 16, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text"), docs=40, eval_docs=4, files_per=10)


def e2e_config(tmp_path, dataset, name, model_path=None):
    keys = {
        **SMALL_RUN,
        # 2 slices of 4 devices: data parallel across them, heads split inside each
        "mesh_shape": "slice:2,x:2,y:2",
        "dcn_axes": "slice",
        "layout": "batch:slice+x,heads:y",
        "train_steps": STEPS,
        "lr_decay_end": STEPS,
        "input_streams": 4,  # one per host
        "datasets": [[dataset, 1, "documents_random", 1.0]],
        "model_path": model_path or str(tmp_path / name),
    }
    return write_config(tmp_path / f"{name}.json", keys)


def newest_checkpoint(gcs, url: str) -> int:  # noqa: F811
    """The newest committed checkpoint step under a gs:// model_path: on GCS, where nothing
    renames atomically, orbax marks a finished step with `<step>/commit_success.txt`."""
    prefix = f"{url}/checkpoints/"
    names = [n.removeprefix(prefix).split("/") for n in gcs.list_objects(prefix)]
    return max((int(p[0]) for p in names if p[1:] == ["commit_success.txt"]), default=0)


@pytest.mark.slow
def test_preempted_multi_slice_pod_resumes_and_ends_bit_identical(
    tmp_path,
    fake,
    dataset,
    gcs,  # noqa: F811
):
    """2 slices as one queued resource (nodes b-0 and b-1, 2 workers each), one slice
    preempted mid-run: the launcher recreates the whole queued resource and the run resumes.
    The reference run checkpoints to a local folder, the preempted one to the bucket: the
    same parameters at the end, bit for bit."""
    env, state = fake
    vm_image(env, tmp_path, devices=2, extra=gcs.env)
    timings = {}
    slices = ("--num_slices", "2", "--steps_per_checkpoint", str(EVERY))

    start = time.monotonic()
    reference = e2e_config(tmp_path, dataset, "uninterrupted")
    code, out = finish(launch(env, tmp_path, *slices, model=reference, name="a"), timeout=400)
    assert code == 0, out[-4000:]
    timings["uninterrupted"] = time.monotonic() - start

    start = time.monotonic()
    model_path = "gs://test-bucket/pod-run"
    model = e2e_config(tmp_path, dataset, "preempted", model_path)
    env.update(gcs.subprocess_env(env))  # for the launcher's bucket check
    process = launch(env, tmp_path, *slices, model=model, name="b")
    deadline = time.monotonic() + 300
    while newest_checkpoint(gcs, model_path) < 2 * EVERY:
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.1)
    preempted_after = newest_checkpoint(gcs, model_path)
    gcloud(env, "fake", "preempt", "b-1")  # the second slice only
    code, out = finish(process, timeout=400)
    assert code == 0, out[-4000:]
    timings["preempted"] = time.monotonic() - start
    print(f"e2e timings: {timings}")
    print("\n".join(line for line in out.splitlines() if line.startswith("[launcher")))

    # it resumed from a checkpoint at or after the one seen before the preemption...
    attempt_2 = (tmp_path / "logs" / "b" / "attempt-2" / "worker-0.log").read_text()
    # every worker of both slices got the variables that join the slices, with its slice
    scripts = [c for c in calls(state) if c[3:4] == ["ssh"] and "MEGASCALE_SLICE_ID" in str(c)]
    for node, slice_id in (("b-0", 0), ("b-1", 1)):
        mine = [str(c) for c in scripts if c[4] == node]
        assert mine and all(f"MEGASCALE_SLICE_ID={slice_id}" in c for c in mine)
        assert all("MEGASCALE_NUM_SLICES=2" in c and "GPT_NEO_NUM_PROCESSES=4" in c for c in mine)
    resumed = int(attempt_2.split("training from step ")[1].split()[0])
    assert preempted_after <= resumed < STEPS
    # on a recreated VM (another hostname), whose worker 0 took the run lock over from the
    # process that died with the old one
    took_over = re.search(r"run lock: took over .* host (t1v-n-\w+-w-0), .*: (.*)", attempt_2)
    assert (
        took_over.group(2)
        == "an earlier attempt of this launch run, which the launcher ended first"
    )
    now_on = gcloud(env, "compute", "tpus", "tpu-vm", "ssh", "b-0", f"--zone={ZONE}",
                    "--worker=0", "--command=hostname").strip()  # fmt: skip
    assert now_on.startswith("t1v-n-") and now_on != took_over.group(1)
    # ...after the launcher force-deleted and recreated the whole queued resource
    queued = [c for c in calls(state) if "queued-resources" in c and c[3] in ("create", "delete")]
    assert [c[3] for c in queued] == ["create", "create", "delete", "create"]  # a, b, b, b
    assert "--node-count=2" in queued[-1] and "--force" in queued[2]
    assert "is SUSPENDED" in out or "TPU is PREEMPTED" in out
    # and ends where the uninterrupted run did, bit for bit
    a = restore_params(tmp_path / "uninterrupted" / "checkpoints" / str(STEPS) / "state")
    b = restore_params(f"{model_path}/checkpoints/{STEPS}/state")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    final = [final_loss(path) for path in (tmp_path / "uninterrupted", model_path)]
    print(f"final loss: uninterrupted {final[0]!r}, preempted and resumed {final[1]!r}")
    assert final[0] == final[1]


def final_loss(model_path) -> float:
    """The loss of the last step logged to `model_path/metrics.jsonl`."""
    records = [
        json.loads(line) for line in storage.read_text(f"{model_path}/metrics.jsonl").splitlines()
    ]
    last = max((r for r in records if "loss" in r), key=lambda r: r["step"])
    assert last["step"] == STEPS
    return last["loss"]
