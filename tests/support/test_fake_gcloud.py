"""The fake `gcloud` (tests/support/fake_gcloud.py) keeps its contract: the launcher's tests rely on it.

Every call goes through the installed `gcloud` wrapper on PATH, as the launcher's would. No jax.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.fake_gcloud import install

ZONE = "us-central2-b"
LOC = ["--zone", ZONE]


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of pid, None when it is gone (a zombie counts as gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = raw[raw.rfind(")") + 2 :].split()[0]
    return None if state in "ZX" else state


def _wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Gcloud:
    def __init__(self, tmp: Path):
        self.state = tmp / "state"
        self.bin = install(tmp / "bin", self.state)
        base = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_GCLOUD_")}
        self.env = {
            **base,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "FAKE_GCLOUD_STATE": str(self.state),
            "FAKE_GCLOUD_SSH_RETRY_SECONDS": "0.05",  # gcloud's 5 s between reruns of an ssh
        }
        self.cwd = tmp

    def _env(self, extra):
        return {**self.env, **(extra or {})}

    def __call__(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["gcloud", *args],
            env=self._env(env),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def ok(self, *args: str, env: dict | None = None) -> str:
        r = self(*args, env=env)
        assert r.returncode == 0, (args, r.returncode, r.stderr)
        return r.stdout

    def json(self, *args: str, env: dict | None = None):
        return json.loads(self.ok(*args, "--format=json", env=env))

    def popen(self, *args: str, env: dict | None = None, out=subprocess.PIPE) -> subprocess.Popen:
        return subprocess.Popen(
            ["gcloud", *args], env=self._env(env), cwd=self.cwd, stdout=out, stderr=out, text=True
        )

    def processes(self, name: str) -> dict[str, list[int]]:
        return json.loads(self.ok("fake", "processes", name))

    def create(
        self, name: str, *extra: str, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        return self(
            "compute", "tpus", "tpu-vm", "create", name, *LOC,
            "--accelerator-type=v4-16", "--version", "tpu-ubuntu2204-base", *extra, env=env,
        )  # fmt: skip

    def ssh(self, name: str, command: str, worker: str = "all", env: dict | None = None):
        return self(
            "compute", "tpus", "tpu-vm", "ssh", name, *LOC, f"--worker={worker}",
            "--command", command, env=env,
        )  # fmt: skip

    def calls(self) -> list[list[str]]:
        lines = (self.state / "calls.jsonl").read_text().splitlines()
        return [json.loads(line)["argv"] for line in lines]


@pytest.fixture
def gcloud(tmp_path):
    g = Gcloud(tmp_path)
    yield g
    g("fake", "kill-all")  # no `sleep` outlives a test


def test_queries_and_unimplemented(gcloud):
    assert gcloud.json("auth", "list") == [{"account": "tester@example.com", "status": "ACTIVE"}]
    assert gcloud.json("auth", "list", env={"FAKE_GCLOUD_LOGGED_OUT": "1"}) == []
    assert gcloud.ok("config", "get-value", "project").strip() == "fake-project"
    assert gcloud.ok("config", "get-value", "project", env={"FAKE_GCLOUD_PROJECT": "p2"}) == "p2\n"

    types = gcloud.json("compute", "tpus", "accelerator-types", "list", f"--zone={ZONE}")
    name = f"projects/fake-project/locations/{ZONE}/acceleratorTypes/v4-16"
    assert {"name": name, "type": "v4-16"} in types
    assert {t["type"] for t in types} >= {"v4-8", "v4-32", "v5p-8", "v6e-16"}
    r = gcloud("compute", "tpus", "accelerator-types", "list", "--zone", "mars-1a", "--format=json")
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr and "mars-1a" in r.stderr
    zones = {"FAKE_GCLOUD_ZONES": "mars-1a"}
    gcloud.ok("compute", "tpus", "accelerator-types", "list", "--zone", "mars-1a", env=zones)

    for argv in (
        ["compute", "tpus", "tpu-vm", "frobnicate", "x"],
        ["compute", "instances", "list"],
    ):
        r = gcloud(*argv, *LOC)
        assert r.returncode == 2 and "fake gcloud: not implemented: " in r.stderr
    r = gcloud("compute", "tpus", "tpu-vm", "describe", "x", *LOC, "--no-such-flag=1")
    assert r.returncode == 2 and "not implemented" in r.stderr

    env = {k: v for k, v in gcloud.env.items() if k != "FAKE_GCLOUD_STATE"}
    script = Path(__file__).with_name("fake_gcloud.py")
    r = subprocess.run([sys.executable, script, "auth", "list"], env=env, capture_output=True)
    assert r.returncode == 2 and b"FAKE_GCLOUD_STATE" in r.stderr


def test_create_describe_list_delete(gcloud):
    describe = ("compute", "tpus", "tpu-vm", "describe", "t1", f"--zone={ZONE}")
    r = gcloud(*describe, "--format=json")
    assert r.returncode == 1
    assert (
        "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource "
        f"'projects/fake-project/locations/{ZONE}/nodes/t1' was not found" in r.stderr
    )

    r = gcloud(
        "alpha", "compute", "tpus", "tpu-vm", "create", "t1", "--zone", ZONE,
        "--accelerator-type", "v4-32", "--version=v2-alpha-tpuv4", "--preemptible",
        "--project=proj", "--quiet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = gcloud.create("t1", "--project=proj")
    assert r.returncode == 1 and "ALREADY_EXISTS" in r.stderr

    assert gcloud(*describe, "--format=json").returncode == 1  # another project: not found
    node = gcloud.json(*describe, "--project", "proj")
    assert node["name"] == f"projects/proj/locations/{ZONE}/nodes/t1"
    assert (node["state"], node["health"]) == ("READY", "HEALTHY")
    assert (node["acceleratorType"], node["runtimeVersion"]) == ("v4-32", "v2-alpha-tpuv4")
    assert node["schedulingConfig"] == {"preemptible": True, "spot": False}
    assert node["createTime"].endswith("Z")
    assert node["networkEndpoints"] == 2 * [
        {"ipAddress": "127.0.0.1", "port": 8470, "accessConfig": {"externalIp": "127.0.0.1"}}
    ]
    assert gcloud.ok(*describe, "--project=proj", "--format=value(state,health)") == (
        "READY\tHEALTHY\n"
    )
    wrong_zone = gcloud("compute", "tpus", "tpu-vm", "describe", "t1", "--zone=europe-west4-a")
    assert wrong_zone.returncode == 1 and "NOT_FOUND" in wrong_zone.stderr

    gcloud.create("t2", env={"FAKE_GCLOUD_WORKERS": "4"})
    listed = gcloud.json("compute", "tpus", "tpu-vm", "list", *LOC)
    assert [n["name"].rsplit("/", 1)[1] for n in listed] == ["t2"]
    assert len(listed[0]["networkEndpoints"]) == 4
    assert sorted(p.name for p in (gcloud.state / "disks" / "t2").iterdir()) == [
        f"worker-{i}" for i in range(4)
    ]
    gcloud.ok("compute", "tpus", "tpu-vm", "delete", "t2", *LOC, "--quiet")
    assert not (gcloud.state / "disks" / "t2").exists()
    r = gcloud("compute", "tpus", "tpu-vm", "delete", "t2", *LOC, "--quiet")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr
    assert gcloud.json("compute", "tpus", "tpu-vm", "list", *LOC) == []

    verbs = [argv[:4] for argv in gcloud.calls()]
    assert verbs[1] == ["compute", "tpus", "tpu-vm", "create"]  # `alpha` stripped
    assert ["compute", "tpus", "tpu-vm", "delete"] in verbs
    assert gcloud.calls()[1][4:7] == ["t1", "--zone", ZONE]


def test_create_failures_and_creating_phase(gcloud):
    env = {"FAKE_GCLOUD_CREATE_FAILURES": "2", "FAKE_GCLOUD_CREATING_DESCRIBES": "2"}
    for _ in range(2):
        r = gcloud.create("t1", env=env)
        assert r.returncode == 1
        assert "RESOURCE_EXHAUSTED" in r.stderr and f'zone "{ZONE}"' in r.stderr
        assert r.stderr.startswith("ERROR: (gcloud.compute.tpus.tpu-vm.create)")
    assert gcloud.create("t1", env=env).returncode == 0

    r = gcloud.ssh("t1", "true")
    assert r.returncode == 255 and "Connection refused" in r.stderr
    describe = ("compute", "tpus", "tpu-vm", "describe", "t1", *LOC)
    states = [gcloud.json(*describe)["state"] for _ in range(3)]
    assert states == ["CREATING", "CREATING", "READY"]
    assert gcloud.ssh("t1", "true").returncode == 0


def test_ssh_minimal_env_home_and_exit_codes(gcloud):
    gcloud.create("t1")
    env = {
        "LEAKY_CALLER_VAR": "from-launcher",
        "FAKE_GCLOUD_VM_ENV": json.dumps({"VM_IMAGE_VAR": "from-image", "XLA_FLAGS": "--x"}),
    }
    command = (
        'echo "w=${HOME##*-} pwd=$PWD home=$HOME leak=${LEAKY_CALLER_VAR-unset} '
        'vm=$VM_IMAGE_VAR path=$PATH lang=$LANG"; env -0 | tr "\\0" "\\n" | cut -d= -f1 > keys; '
        "echo hi > note.txt"
    )
    r = gcloud.ssh("t1", command, env=env)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    for i, line in enumerate(lines):
        home = gcloud.state.resolve() / "disks" / "t1" / f"worker-{i}"
        assert line == (
            f"w={i} pwd={home} home={home} leak=unset vm=from-image "
            "path=/usr/local/bin:/usr/bin:/bin lang=C.UTF-8"
        )
        assert (home / "note.txt").read_text() == "hi\n"
        keys = set((home / "keys").read_text().split())
        allowed = {"PATH", "HOME", "USER", "LANG", "VM_IMAGE_VAR", "XLA_FLAGS", "PWD", "SHLVL", "_"}
        assert {"PATH", "HOME", "USER", "LANG", "VM_IMAGE_VAR"} <= keys <= allowed
    assert len(lines) == 2

    exit_by_worker = "exit $(( ${HOME##*-} * 3 + 1 ))"
    assert gcloud.ssh("t1", exit_by_worker).returncode == 4
    assert gcloud.ssh("t1", exit_by_worker, worker="0").returncode == 1
    assert gcloud.ssh("t1", exit_by_worker, worker="1,0").returncode == 4
    r = gcloud(
        "compute", "tpus", "tpu-vm", "ssh", "t1", *LOC, "--worker", "1", "--command=echo $HOME"
    )
    assert r.stdout.strip().endswith("worker-1")
    kill_worker_1 = 'if [ "${HOME##*-}" = 1 ]; then kill -9 $$; fi; exit 7'
    assert gcloud.ssh("t1", kill_worker_1).returncode == 255
    assert gcloud.ssh("t1", kill_worker_1, worker="0").returncode == 7

    r = gcloud.ssh("t1", "true", worker="2")
    assert r.returncode != 0 and "--worker" in r.stderr
    r = gcloud.ssh("nope", "true")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_scp_into_worker_disks(gcloud, tmp_path):
    gcloud.create("t1")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "code" / "pkg").mkdir(parents=True)
    (tmp_path / "code" / "pkg" / "m.py").write_text("M")
    scp = ("compute", "tpus", "tpu-vm", "scp")
    disks = gcloud.state / "disks" / "t1"

    gcloud.ok(*scp, "a.txt", "t1:", *LOC, "--worker=all")
    gcloud.ok(*scp, str(tmp_path / "a.txt"), "t1:~/b.txt", *LOC, "--worker", "1")
    gcloud.ok(*scp, "code", "t1:~/", *LOC, "--worker=all", "--recurse")
    for i in range(2):
        assert (disks / f"worker-{i}" / "a.txt").read_text() == "A"
        assert (disks / f"worker-{i}" / "code" / "pkg" / "m.py").read_text() == "M"
    assert (disks / "worker-1" / "b.txt").read_text() == "A"
    assert not (disks / "worker-0" / "b.txt").exists()
    gcloud.ok(*scp, "a.txt", "code", "t1:code/pkg", *LOC, "--worker=0", "--recurse")
    assert (disks / "worker-0" / "code" / "pkg" / "code" / "pkg" / "m.py").read_text() == "M"
    assert (disks / "worker-0" / "code" / "pkg" / "a.txt").read_text() == "A"
    assert gcloud.ssh("t1", "cat b.txt", worker="1").stdout == "A"

    assert gcloud(*scp, "code", "t1:", *LOC, "--worker=0").returncode == 1  # dir, no --recurse
    assert gcloud(*scp, "missing", "t1:", *LOC).returncode == 1
    assert gcloud(*scp, "a.txt", "t1:/etc/x", *LOC).returncode == 2  # outside HOME
    r = gcloud(*scp, "a.txt", "t9:", *LOC)
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_preempt_kills_workers_wipes_disks_and_refuses_ssh(gcloud, tmp_path):
    gcloud.create("t1")
    ssh = gcloud.popen(
        "compute", "tpus", "tpu-vm", "ssh", "t1", *LOC, "--worker=all",
        "--command", "echo data > state.bin; echo started; exec sleep 60",
    )  # fmt: skip
    procs = _wait_for(
        lambda: (p := gcloud.processes("t1")) and all(p.values()) and p, what="workers to start"
    )
    pids = [pid for ps in procs.values() for pid in ps]
    assert len(pids) == 2 and all(_proc_state(pid) for pid in pids)
    _wait_for(lambda: (gcloud.state / "disks/t1/worker-1/state.bin").exists())

    t0 = time.monotonic()
    gcloud.ok("fake", "preempt", "t1")
    out, _ = ssh.communicate(timeout=10)
    assert ssh.returncode == 255
    assert time.monotonic() - t0 < 5
    assert out.count("started") == 2
    assert not any(_proc_state(pid) for pid in pids)
    assert gcloud.processes("t1") == {"0": [], "1": []}
    assert not (gcloud.state / "disks" / "t1").exists()

    node = gcloud.json("compute", "tpus", "tpu-vm", "describe", "t1", *LOC)
    assert (node["state"], node["health"]) == ("PREEMPTED", "UNHEALTHY_MAINTENANCE")
    r = gcloud.ssh("t1", "true")
    assert r.returncode == 255 and "Connection refused" in r.stderr
    (tmp_path / "f").write_text("x")
    assert gcloud("compute", "tpus", "tpu-vm", "scp", "f", "t1:", *LOC).returncode == 255

    gcloud.ok("compute", "tpus", "tpu-vm", "delete", "t1", *LOC, "--quiet")
    gcloud.create("t1")
    assert gcloud.ssh("t1", 'test -z "$(ls -A)"').returncode == 0  # a fresh, empty disk
    verbs = [" ".join(a[:2] if a[0] == "fake" else a[2:4]) for a in gcloud.calls()]
    assert verbs[-6:] == [
        f"tpu-vm {v}" for v in ("describe", "ssh", "scp", "delete", "create", "ssh")
    ]
    assert "fake preempt" in verbs


def test_stall_resume_and_delete_while_running(gcloud):
    gcloud.create("t1")
    ssh = gcloud.popen(
        "compute", "tpus", "tpu-vm", "ssh", "t1", *LOC, "--worker=all", "--command=exec sleep 60"
    )
    procs = _wait_for(lambda: (p := gcloud.processes("t1")) and all(p.values()) and p)
    (w0,), (w1,) = procs["0"], procs["1"]

    gcloud.ok("fake", "stall", "t1", "--worker=1")
    assert _wait_for(lambda: _proc_state(w1) == "T", what="SIGSTOP")
    assert _proc_state(w0) == "S"
    assert ssh.poll() is None  # a hung worker: the ssh session just hangs
    gcloud.ok("fake", "resume", "t1", "--worker", "1")
    assert _wait_for(lambda: _proc_state(w1) == "S", what="SIGCONT")
    gcloud.ok("fake", "stall", "t1")

    gcloud.ok("compute", "tpus", "tpu-vm", "delete", "t1", *LOC, "--quiet")
    ssh.communicate(timeout=10)
    assert ssh.returncode == 255
    assert _proc_state(w0) is None and _proc_state(w1) is None


def test_sigterm_to_ssh_client_leaves_remote_process_alive(gcloud, tmp_path):
    gcloud.create("t1")
    # Worker output goes straight to the client's fds, so an orphaned worker keeps them open:
    # send the client's output to a file, not a pipe one reads to EOF.
    with open(tmp_path / "ssh.log", "w") as log:
        ssh = gcloud.popen(
            "compute", "tpus", "tpu-vm", "ssh", "t1", *LOC, "--worker=0",
            "--command", "echo $$ > worker.pid; echo up; exec sleep 60", out=log,
        )  # fmt: skip
        (pid,) = _wait_for(lambda: gcloud.processes("t1")["0"])
        _wait_for(lambda: "up" in (tmp_path / "ssh.log").read_text(), what="streamed output")
        ssh.send_signal(signal.SIGTERM)
        assert ssh.wait(timeout=5) == 255
    time.sleep(0.2)
    assert _proc_state(pid) == "S"  # the "remote" process outlives the local ssh client
    assert gcloud.processes("t1") == {"0": [pid], "1": []}
    recorded = int((gcloud.state / "disks/t1/worker-0/worker.pid").read_text())
    assert recorded < 10 and recorded != pid  # the VM's own process ids, counted from 1

    # A launcher cleans up by recorded pid over a new ssh session:
    assert gcloud.ssh("t1", "kill $(cat ~/worker.pid)", worker="0").returncode == 0
    _wait_for(lambda: _proc_state(pid) is None, what="the remote process to end")
    assert gcloud.processes("t1") == {"0": [], "1": []}


def test_relay_mode_drops_the_session_with_the_client(gcloud):
    gcloud.create("t1")
    relay = {"FAKE_GCLOUD_SSH_RELAY": "1"}
    r = gcloud.ssh("t1", "echo out-$HOME; echo err >&2; exit 3", worker="1", env=relay)
    assert (r.returncode, r.stderr) == (3, "err\n") and r.stdout.strip().endswith("worker-1")

    command = (
        'if [ "${HOME##*-}" = 0 ]; then exec sleep 60; fi; while :; do echo tick; sleep 0.05; done'
    )
    ssh = gcloud.popen(
        "compute", "tpus", "tpu-vm", "ssh", "t1", *LOC, "--worker=all", "--command", command,
        env=relay,
    )  # fmt: skip
    procs = _wait_for(lambda: (p := gcloud.processes("t1")) and all(p.values()) and p)
    assert ssh.stdout.readline() == "tick\n"  # streamed while the session runs
    ssh.send_signal(signal.SIGTERM)
    ssh.communicate(timeout=5)  # EOF at once: the session is gone
    assert ssh.returncode == 255
    # The silent worker lives on; the chatty one dies at its next write (SIGPIPE).
    _wait_for(lambda: gcloud.processes("t1")["1"] == [], what="the writer to die of SIGPIPE")
    assert _proc_state(procs["0"][0]) == "S"


def test_queued_resources_lifecycle(gcloud):
    qr = ("compute", "tpus", "queued-resources")
    node_describe = ("compute", "tpus", "tpu-vm", "describe", "n1", *LOC)
    env = {
        "FAKE_GCLOUD_CREATE_FAILURES": "1",
        "FAKE_GCLOUD_QR_WAITING_DESCRIBES": "2",
        "FAKE_GCLOUD_WORKERS": "3",
    }
    create = (
        *qr, "create", "q1", "--node-id=n1", *LOC, "--accelerator-type", "v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
    )  # fmt: skip
    r = gcloud(*create, env=env)
    assert r.returncode == 1 and "RESOURCE_EXHAUSTED" in r.stderr
    gcloud.ok(*create, env=env)
    assert gcloud(*create, env=env).returncode == 1  # ALREADY_EXISTS

    assert gcloud(*node_describe).returncode == 1  # no node while waiting
    states = [gcloud.json(*qr, "describe", "q1", *LOC)["state"]["state"] for _ in range(3)]
    assert states == ["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "ACTIVE"]
    desc = gcloud.json(*qr, "describe", "q1", *LOC)
    assert desc["name"] == f"projects/fake-project/locations/{ZONE}/queuedResources/q1"
    assert desc["tpu"]["nodeSpec"][0]["nodeId"] == "n1"
    assert desc["tpu"]["nodeSpec"][0]["node"] == {
        "acceleratorType": "v5litepod-16",
        "runtimeVersion": "v2-alpha-tpuv5-lite",
    }
    node = gcloud.json(*node_describe)
    assert node["state"] == "READY" and len(node["networkEndpoints"]) == 3
    assert node["schedulingConfig"] == {"preemptible": False, "spot": True}
    assert [q["name"] for q in gcloud.json(*qr, "list", *LOC)] == [desc["name"]]

    r = gcloud(*qr, "delete", "q1", *LOC, "--quiet")
    assert r.returncode == 1 and "FAILED_PRECONDITION" in r.stderr and "--force" in r.stderr
    gcloud.ok("fake", "preempt", "n1")
    assert gcloud.json(*qr, "describe", "q1", *LOC)["state"]["state"] == "SUSPENDED"
    assert gcloud.json(*node_describe)["state"] == "PREEMPTED"
    assert gcloud(*qr, "delete", "q1", *LOC, "--quiet").returncode == 1
    gcloud.ok(*qr, "delete", "q1", *LOC, "--quiet", "--force")
    r = gcloud(*qr, "describe", "q1", *LOC, "--format=json")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "queuedResources/q1" in r.stderr
    assert gcloud(*node_describe).returncode == 1
    assert not (gcloud.state / "disks" / "n1").exists()

    # A QR with no node yet deletes without --force; an ACTIVE one at once has its node.
    gcloud.ok(*create, env={**env, "FAKE_GCLOUD_CREATE_FAILURES": "0"})
    gcloud.ok(*qr, "delete", "q1", *LOC, "--quiet")
    gcloud.ok(*create)
    assert gcloud.json(*node_describe)["state"] == "READY"


def test_a_multislice_queued_resource_has_a_node_per_slice_each_preempted_alone(gcloud):
    """`--node-count N --node-prefix P` makes nodes P-0 ... P-(N-1), as the TPU API names them;
    preempting one suspends the queued resource and leaves the other slice running; deleting
    it with --force takes every node."""
    qr = ("compute", "tpus", "queued-resources")
    create = (
        *qr, "create", "ms", "--node-count=2", "--node-prefix=ms", *LOC,
        "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite",
    )  # fmt: skip
    r = gcloud(*qr, "create", "bad", "--node-id=x", "--node-count=2", *create[7:])
    assert r.returncode == 2 and "Exactly one of (--node-count | --node-id)" in r.stderr
    gcloud.ok(*create)
    desc = gcloud.json(*qr, "describe", "ms", *LOC)
    assert desc["state"]["state"] == "ACTIVE"
    assert desc["tpu"]["nodeSpec"][0]["multisliceParams"] == {"nodeCount": 2, "nodeIdPrefix": "ms"}
    for name in ("ms-0", "ms-1"):
        assert gcloud.json("compute", "tpus", "tpu-vm", "describe", name, *LOC)["state"] == "READY"
    hosts = {name: gcloud.ssh(name, "hostname").stdout.split() for name in ("ms-0", "ms-1")}
    assert set(hosts["ms-0"]).isdisjoint(hosts["ms-1"])  # 4 machines of their own

    gcloud.ok("fake", "preempt", "ms-1")
    assert gcloud.json(*qr, "describe", "ms", *LOC)["state"]["state"] == "SUSPENDED"
    describe = ("compute", "tpus", "tpu-vm", "describe")
    assert gcloud.json(*describe, "ms-1", *LOC)["state"] == "PREEMPTED"
    assert gcloud.json(*describe, "ms-0", *LOC)["state"] == "READY"
    gcloud.ok(*qr, "delete", "ms", *LOC, "--quiet", "--force")
    for name in ("ms-0", "ms-1"):
        assert gcloud(*describe, name, *LOC).returncode == 1


def test_every_vm_is_a_machine_of_its_own_and_a_recreated_one_another(gcloud):
    """Cloud TPU names each worker VM `t1v-n-<id>-w-<i>`, new with every node: code that
    identifies a machine by its hostname sees a recreated slice as other machines."""
    probe = "echo $(hostname) $$ $(ps -e -o pid= | wc -l)"
    gcloud.create("t1")
    first = sorted(gcloud.ssh("t1", probe).stdout.splitlines())
    again = sorted(gcloud.ssh("t1", probe).stdout.splitlines())
    hosts = [line.split()[0] for line in first]
    assert hosts[0].startswith("t1v-n-") and hosts[0].endswith("-w-0")
    assert hosts[1] == hosts[0].removesuffix("0") + "1"
    assert [line.split()[0] for line in again] == hosts  # the same VM across sessions
    for line in first:
        _, pid, processes = line.split()
        assert int(pid) < 10 and int(processes) < 10  # its own process table, counted from 1
    assert all(host != os.uname().nodename for host in hosts)

    gcloud.ok("fake", "preempt", "t1")
    gcloud.ok("compute", "tpus", "tpu-vm", "delete", "t1", *LOC, "--quiet")
    gcloud.create("t1")
    recreated = [line.split()[0] for line in sorted(gcloud.ssh("t1", probe).stdout.splitlines())]
    assert set(recreated).isdisjoint(hosts)

    vms = json.loads((gcloud.state / "state.json").read_text())["nodes"]["t1"]["workers"]
    inits = [worker["vm"]["pid"] for worker in vms]
    assert all(_proc_state(pid) for pid in inits)
    gcloud.ok("fake", "kill-all")  # a test's teardown: the VMs end, and no ssh boots another
    _wait_for(lambda: not any(_proc_state(pid) for pid in inits), what="the VMs to halt")
    assert gcloud.ssh("t1", "true").returncode == 255


def test_an_ssh_that_ends_255_is_run_again_as_gcloud_does(gcloud):
    """A remote command that dies by a signal (ssh says 255) runs again on that worker only,
    up to 10 times; one that exits with a status of its own is not rerun."""
    gcloud.create("t1")
    count_and_die = 'echo run >> runs; if [ "${HOME##*-}" = 1 ]; then kill -9 $$; fi; exit 7'
    r = gcloud.ssh("t1", count_and_die)
    assert r.returncode == 255
    assert r.stderr.count("Retrying: SSH command error") == 9
    assert "SSH: Attempting to connect to worker 1..." in r.stderr
    disks = gcloud.state / "disks" / "t1"
    assert (disks / "worker-1" / "runs").read_text().count("run") == 10
    assert (disks / "worker-0" / "runs").read_text().count("run") == 1
    r = gcloud.ssh("t1", count_and_die, env={"FAKE_GCLOUD_SSH_ATTEMPTS": "1"}, worker="1")
    assert r.returncode == 255 and "Retrying" not in r.stderr

    die_once = "[ -e ran ] && exit 5; touch ran; kill -9 $$"  # the rerun sees the first run
    r = gcloud.ssh("t1", die_once, worker="0")
    assert r.returncode == 5 and r.stderr.count("Retrying") == 1


def test_a_dropped_connection_is_rerun_while_the_first_command_runs_on(gcloud):
    gcloud.create("t1")
    relay = {"FAKE_GCLOUD_SSH_RELAY": "1"}
    command = "echo $$ >> pids; exec sleep 60"
    ssh = gcloud.popen(
        "compute", "tpus", "tpu-vm", "ssh", "t1", *LOC, "--worker=0", "--command", command,
        env={**relay, "FAKE_GCLOUD_SSH_ATTEMPTS": "2"},
    )  # fmt: skip
    (first,) = _wait_for(lambda: gcloud.processes("t1")["0"])
    gcloud.ok("fake", "disconnect", "t1", "--worker=0")
    second = _wait_for(
        lambda: [p for p in gcloud.processes("t1")["0"] if p != first], what="the rerun"
    )
    assert _proc_state(first) == "S"  # the first command still runs: two copies now
    assert len(second) == 1
    gcloud.ok("fake", "disconnect", "t1")
    _, err = ssh.communicate(timeout=10)
    assert ssh.returncode == 255  # the second attempt was dropped too: gcloud gives up
    assert "Broken pipe" in err and err.count("Retrying") == 1
    assert len(gcloud.state.joinpath("disks/t1/worker-0/pids").read_text().split()) == 2
