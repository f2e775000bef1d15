"""A fake `gcloud` for testing the TPU-pod launcher without GCP: a "slice" of N workers is N
local "VMs" (processes in namespaces of their own), each worker's "disk" a directory.

Run as ``python tests/support/fake_gcloud.py ARGS...``; ``install(bin_dir, state_dir)`` writes an
executable ``bin_dir/gcloud`` wrapper so a test can put ``bin_dir`` first on PATH. Stdlib only,
so it starts fast (never import jax or tensorflow here).

Contract, in brief (the full list is in ``USAGE`` below):

- All state lives under ``$FAKE_GCLOUD_STATE`` (the fake exits 2 without it): nodes, queued
  resources and the create counter in ``state.json``, read and written under an ``flock`` on
  ``state.lock``; every call is appended to ``calls.jsonl`` as ``{"argv": [...], "time": t}``
  with a leading ``alpha``/``beta`` release track stripped; worker disks are
  ``disks/NAME/worker-<i>``.
- Implemented: ``auth list``, ``config get-value project``,
  ``compute tpus accelerator-types list``, ``compute tpus tpu-vm
  create|describe|list|delete|ssh|scp``, ``compute tpus queued-resources
  create|describe|list|delete``, and the test hooks ``fake preempt|stall|resume|disconnect|
  processes|kill-all``. Anything else (a verb, a flag, a ``--format``) exits 2 with
  ``fake gcloud: not implemented: <argv>`` on stderr.
- Errors look like gcloud's: ``ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: ...``,
  exit 1; ``ssh``/``scp`` to a node that is not READY exit 255 with an ssh-like
  ``Connection refused``.
- Each worker is a VM of its own: booted at its first ssh, it has a hostname like Cloud TPU's
  (``t1v-n-<id>-w-<i>``, new with every node) and process ids from 1 (UTS, PID and mount
  namespaces), so a recreated VM is another machine to the code under test.
- ``ssh`` runs ``bash -c CMD`` per selected worker inside its VM, in a new session (its own
  process group, recorded in the state), with cwd = HOME = the worker's disk and a minimal
  environment (PATH, HOME, USER, LANG, then ``$FAKE_GCLOUD_VM_ENV``), never the caller's.
  Worker output goes straight to the fake's stdout/stderr (the workers inherit its file
  descriptors), or, with ``FAKE_GCLOUD_SSH_RELAY=1``, through pipes the fake copies as data
  comes, so the caller's pipe closes when the client dies. A session ends 255 when the remote
  command dies by a signal, the node is deleted/preempted meanwhile or the connection is
  dropped (``fake disconnect``), and then, as gcloud does, the command runs again on that
  worker (10 attempts in all, 5 s apart). The exit code is 255 if a worker's last attempt
  ended so, else the max over the workers. A SIGTERM/SIGINT/SIGHUP to the fake ssh client
  makes it exit 255 at once and leaves the remote processes running, as a real ssh client
  would.
- ``fake preempt`` kills the node's VMs, sets PREEMPTED/UNHEALTHY_MAINTENANCE, wipes its disks
  and suspends its queued resource; ``fake stall`` SIGSTOPs a worker.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import random
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

USAGE = """\
fake gcloud (test double). Global flags, accepted anywhere: --zone Z, --project P,
--format json|value(f1,f2.sub,...), --quiet/-q, --verbosity V, --strict-host-key-checking V,
--internal-ip. Flags take --flag=value or --flag value.

  auth list [--format=json]
  config get-value project
  compute tpus accelerator-types list --zone=Z
  compute tpus tpu-vm create NAME --zone=Z --accelerator-type=T --version=V [--preemptible|--spot]
  compute tpus tpu-vm describe NAME --zone=Z
  compute tpus tpu-vm list --zone=Z
  compute tpus tpu-vm delete NAME --zone=Z [--quiet]
  compute tpus tpu-vm ssh NAME --zone=Z --command=CMD [--worker=all|i|i,j] [--ssh-flag=F]...
  compute tpus tpu-vm scp SRC... NAME:DST --zone=Z [--worker=all|i|i,j] [--recurse]
  compute tpus queued-resources create NAME (--node-id=NODE | --node-count=N [--node-prefix=P])
      --zone=Z --accelerator-type=T --runtime-version=V
      [--spot|--reserved|--guaranteed|--best-effort]
  compute tpus queued-resources describe|delete NAME --zone=Z [--force]
  compute tpus queued-resources list --zone=Z
  fake preempt NODE | fake stall NODE [--worker=W] | fake resume NODE [--worker=W]
  fake disconnect NODE [--worker=W] | fake processes NODE
  fake kill-all (teardown: every process of every node, and no ssh from then on)

Env: FAKE_GCLOUD_STATE (required), FAKE_GCLOUD_PROJECT (fake-project), FAKE_GCLOUD_ZONES
(us-central2-b,europe-west4-a), FAKE_GCLOUD_WORKERS (2), FAKE_GCLOUD_CREATE_FAILURES (0),
FAKE_GCLOUD_CREATING_DESCRIBES (0), FAKE_GCLOUD_QR_WAITING_DESCRIBES (0),
FAKE_GCLOUD_VM_ENV (JSON object), FAKE_GCLOUD_LOGGED_OUT (1 = no credentialed account),
FAKE_GCLOUD_SSH_RELAY (1 = relay worker output through pipes instead of sharing the fds),
FAKE_GCLOUD_SSH_ATTEMPTS (10) and FAKE_GCLOUD_SSH_RETRY_SECONDS (5): gcloud's reruns of an ssh
that exited 255, FAKE_GCLOUD_ISOLATE (0 = no VM namespaces: every VM is this machine).
"""

ACCELERATOR_TYPES = (
    "v4-8",
    "v4-16",
    "v4-32",
    "v5litepod-8",
    "v5litepod-16",
    "v5p-8",
    "v5p-16",
    "v6e-8",
    "v6e-16",
)
DEFAULT_ZONES = "us-central2-b,europe-west4-a"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SSH_FAILED = 255  # ssh(1)'s own status: no connection, a dropped one, or a remote death by signal
ACCOUNT = "tester@example.com"

GLOBAL_VALUE_FLAGS = {"zone", "project", "format", "verbosity", "strict-host-key-checking"}
GLOBAL_BOOL_FLAGS = {"quiet", "internal-ip"}
BOOL_FLAGS = GLOBAL_BOOL_FLAGS | {
    "preemptible",
    "spot",
    "recurse",
    "force",
    "reserved",
    "guaranteed",
    "best-effort",
}
VALUE_FLAGS = GLOBAL_VALUE_FLAGS | {
    "accelerator-type",
    "version",
    "runtime-version",
    "node-id",
    "node-count",
    "node-prefix",
    "worker",
    "command",
    "ssh-flag",
    "scp-flag",
}
# Flags each command accepts on top of the global ones.
COMMAND_FLAGS = {
    "tpu-vm create": {"accelerator-type", "version", "preemptible", "spot"},
    "tpu-vm ssh": {"worker", "command", "ssh-flag"},
    "tpu-vm scp": {"worker", "recurse", "scp-flag"},
    "queued-resources create": {
        "node-id",
        "node-count",
        "node-prefix",
        "accelerator-type",
        "runtime-version",
        "spot",
        "reserved",
        "guaranteed",
        "best-effort",
    },
    "queued-resources delete": {"force"},
    "fake stall": {"worker"},
    "fake disconnect": {"worker"},
    "fake resume": {"worker"},
}


class Exit(Exception):
    """Stop with this exit code (the message, if any, already went to stderr)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class NotImplementedCall(Exception):
    pass


def _stderr(text: str) -> None:
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()


def _fail(command: str, message: str, code: int = 1) -> Exit:
    _stderr(f"ERROR: (gcloud.{command}) {message}")
    return Exit(code)


# --------------------------------------------------------------------------------------------
# Command line


class Args:
    def __init__(self, argv: list[str]):
        self.positional: list[str] = []
        self.flags: dict[str, list[str]] = {}
        i = 0
        while i < len(argv):
            tok = argv[i]
            i += 1
            if tok == "-q":
                self.flags.setdefault("quiet", []).append("true")
            elif tok.startswith("--") and len(tok) > 2:
                name, eq, value = tok[2:].partition("=")
                if name in BOOL_FLAGS:
                    if eq and value.lower() not in ("true", "false"):
                        raise NotImplementedCall
                    self.flags.setdefault(name, []).append(value.lower() if eq else "true")
                elif name in VALUE_FLAGS:
                    if not eq:
                        if i >= len(argv):
                            _stderr(f"ERROR: (gcloud) argument --{name}: expected one argument")
                            raise Exit(2)
                        value = argv[i]
                        i += 1
                    self.flags.setdefault(name, []).append(value)
                else:
                    raise NotImplementedCall
            elif tok.startswith("-"):
                raise NotImplementedCall  # includes "--" (extra ssh args)
            else:
                self.positional.append(tok)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.flags.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return self.get(name, "false") == "true"

    def check_flags(self, key: str) -> None:
        allowed = GLOBAL_VALUE_FLAGS | GLOBAL_BOOL_FLAGS | COMMAND_FLAGS.get(key, set())
        if set(self.flags) - allowed:
            raise NotImplementedCall
        fmt = (self.get("format") or "json").strip()
        if fmt != "json" and not (fmt.startswith("value(") and fmt.endswith(")")):
            raise NotImplementedCall


def strip_release_track(argv: list[str]) -> list[str]:
    """Drop the first positional token when it is `alpha` or `beta`."""
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("-"):
            return argv[:i] + argv[i + 1 :] if tok in ("alpha", "beta") else argv
        i += 2 if tok.startswith("--") and "=" not in tok and tok[2:] in VALUE_FLAGS else 1
    return argv


# --------------------------------------------------------------------------------------------
# State


def _state_dir() -> Path:
    return Path(os.environ["FAKE_GCLOUD_STATE"]).resolve()


def _empty_state() -> dict:
    return {"version": 1, "create_attempts": 0, "nodes": {}, "queued_resources": {}}


@contextlib.contextmanager
def locked_state():
    """Yield the state dict under an exclusive flock; write it back (atomically) on success."""
    sdir = _state_dir()
    sdir.mkdir(parents=True, exist_ok=True)
    with open(sdir / "state.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = sdir / "state.json"
        st = json.loads(path.read_text()) if path.exists() else _empty_state()
        _prune(st)
        try:
            yield st
        except Exit:
            _save_state(path, st)  # an error after a change (the create counter) keeps it
            raise
        _save_state(path, st)


def _save_state(path: Path, st: dict) -> None:
    tmp = path.with_name(f"state.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(st, indent=1, sort_keys=True))
    os.replace(tmp, path)


def log_call(argv: list[str]) -> None:
    line = json.dumps({"argv": argv, "time": time.time()}) + "\n"
    with open(_state_dir() / "calls.jsonl", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line)


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _project(args: Args) -> str:
    return args.get("project") or os.environ.get("FAKE_GCLOUD_PROJECT") or "fake-project"


def _zones() -> list[str]:
    raw = os.environ.get("FAKE_GCLOUD_ZONES") or DEFAULT_ZONES
    return [z.strip() for z in raw.split(",") if z.strip()]


def _zone(args: Args, command: str) -> str:
    zone = args.get("zone")
    if not zone:
        raise _fail(command, "The required property [zone] is not currently set.")
    return zone


def _check_zone(zone: str, command: str) -> None:
    if zone not in _zones():
        raise _fail(
            command,
            "INVALID_ARGUMENT: Invalid resource field value in the request. "
            f"Unknown zone: zone {zone} does not exist or is not available to this project "
            "(location 'projects/-/locations/" + zone + "').",
        )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _node_path(node: dict) -> str:
    return f"projects/{node['project']}/locations/{node['zone']}/nodes/{node['name']}"


def _qr_path(qr: dict) -> str:
    return f"projects/{qr['project']}/locations/{qr['zone']}/queuedResources/{qr['name']}"


def _disk(name: str, worker: int) -> Path:
    return _state_dir() / "disks" / name / f"worker-{worker}"


def _wipe_disks(name: str) -> None:
    shutil.rmtree(_state_dir() / "disks" / name, ignore_errors=True)


def _find_node(st: dict, name: str, project: str | None, zone: str | None) -> dict | None:
    node = st["nodes"].get(name)
    if node is None:
        return None
    if (project is not None and node["project"] != project) or (
        zone is not None and node["zone"] != zone
    ):
        return None
    return node


def _node_or_not_found(st: dict, args: Args, command: str, name: str) -> dict:
    project, zone = _project(args), _zone(args, command)
    node = _find_node(st, name, project, zone)
    if node is None:
        raise _fail(
            command,
            f"NOT_FOUND: Resource 'projects/{project}/locations/{zone}/nodes/{name}' was not found",
        )
    return node


def _make_node(st: dict, **kw) -> dict:
    """Create a node record and fresh, empty worker disks."""
    n = kw.pop("workers")
    node = {
        **kw,
        "id": str(random.randrange(10**18, 10**19)),
        "uid": f"{time.time_ns()}-{os.getpid()}",
        "createTime": _now(),
        "workers": [{"pgids": []} for _ in range(n)],
    }
    if node["state"] == "READY":
        node["health"] = "HEALTHY"
    _wipe_disks(node["name"])
    for i in range(n):
        _disk(node["name"], i).mkdir(parents=True)
    st["nodes"][node["name"]] = node
    return node


def _count_create(st: dict, command: str, zone: str) -> None:
    """The first FAKE_GCLOUD_CREATE_FAILURES creates (tpu-vm and queued-resources) fail."""
    st["create_attempts"] += 1
    if st["create_attempts"] <= _int_env("FAKE_GCLOUD_CREATE_FAILURES", 0):
        raise _fail(
            command,
            f'RESOURCE_EXHAUSTED: There is no more capacity in the zone "{zone}"; you can try '
            "in another zone where Cloud TPU Nodes are offered (see "
            "https://cloud.google.com/tpu/docs/regions) [EID: 0x5f3a9c1d2b4e6f70]",
        )


def _node_json(node: dict) -> dict:
    out = {
        "name": _node_path(node),
        "id": node["id"],
        "state": node["state"],
        "acceleratorType": node["acceleratorType"],
        "runtimeVersion": node["runtimeVersion"],
        "apiVersion": "V2",
        "createTime": node["createTime"],
        "schedulingConfig": {"preemptible": node["preemptible"], "spot": node["spot"]},
        "networkConfig": {"network": "default", "subnetwork": "default", "enableExternalIps": True},
        "networkEndpoints": [
            {"ipAddress": "127.0.0.1", "port": 8470, "accessConfig": {"externalIp": "127.0.0.1"}}
            for _ in node["workers"]
        ],
    }
    if node.get("health"):
        out["health"] = node["health"]
    if node.get("queuedResource"):
        qr = node["queuedResource"]
        out["queuedResource"] = (
            f"projects/{node['project']}/locations/{node['zone']}/queuedResources/{qr}"
        )
    return out


def _observe_node(node: dict) -> dict:
    """A describe/list of the node: it leaves CREATING after FAKE_GCLOUD_CREATING_DESCRIBES."""
    if node["state"] == "CREATING":
        if node.get("creating_describes_left", 0) > 0:
            node["creating_describes_left"] -= 1
        else:
            node["state"], node["health"] = "READY", "HEALTHY"
    return _node_json(node)


# --------------------------------------------------------------------------------------------
# Process groups


def _proc_table() -> dict[int, tuple[str, int, int]] | None:
    """pid -> (state, pgid, starttime) from /proc, or None where there is no /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        table[int(entry)] = (fields[0], int(fields[2]), int(fields[19]))
    return table


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    return int(raw[raw.rfind(")") + 2 :].split()[19])


def _group_pids(rec: dict, table: dict | None) -> list[int]:
    """Live (non-zombie) pids of a recorded process group; [] when it is gone or not ours."""
    pgid = rec["pgid"]
    if table is None:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    leader = table.get(pgid)
    if leader is not None and rec.get("start") is not None and leader[2] != rec["start"]:
        return []  # the leader's pid was reused by another process: not our group any more
    return sorted(pid for pid, (s, g, _) in table.items() if g == pgid and s not in "ZXx")


def _prune(st: dict) -> None:
    recs = [w["pgids"] for node in st["nodes"].values() for w in node["workers"]]
    if not any(recs):
        return
    table = _proc_table()
    for node in st["nodes"].values():
        for w in node["workers"]:
            w["pgids"] = [r for r in w["pgids"] if _group_pids(r, table)]


def _signal_groups(node: dict, sig: int, workers: list[int] | None = None) -> list[int]:
    """Send sig to the recorded, live process groups of the given workers; return the pgids."""
    table = _proc_table()
    sent = []
    for i, w in enumerate(node["workers"]):
        if workers is not None and i not in workers:
            continue
        for rec in w["pgids"]:
            if _group_pids(rec, table):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(rec["pgid"], sig)
                    sent.append(rec["pgid"])
    return sent


def _kill_node_processes(node: dict) -> None:
    """SIGKILL every process of the node (its VMs and recorded process groups) and wait
    (briefly) until they are gone."""
    recs = [r for w in node["workers"] for r in w["pgids"]]
    _halt_vms(node)
    _signal_groups(node, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        table = _proc_table()
        if table is None or not any(_group_pids(r, table) for r in recs):
            break
        time.sleep(0.01)
    for w in node["workers"]:
        w["pgids"] = []


def _drop_node(st: dict, node: dict) -> None:
    """Delete the node (processes, record, disks); its queued resource becomes SUSPENDED."""
    _kill_node_processes(node)
    del st["nodes"][node["name"]]
    _wipe_disks(node["name"])
    qr = st["queued_resources"].get(node.get("queuedResource") or "")
    if qr is not None:
        qr["state"], qr["stateInitiator"] = "SUSPENDED", "SERVICE"


def _parse_workers(spec: str, n: int, command: str) -> list[int]:
    if spec == "all":
        return list(range(n))
    try:
        workers = [int(x) for x in spec.split(",")]
    except ValueError:
        workers = [-1]
    if not workers or any(not 0 <= w < n for w in workers):
        raise _fail(
            command,
            f"Invalid value for [--worker]: {spec!r}: must be 'all' or a comma-separated list "
            f"of worker indices in [0, {n - 1}]",
            2,
        )
    return sorted(set(workers))


# --------------------------------------------------------------------------------------------
# Output


def _dig(obj, path: str):
    for part in path.split("."):
        if part == "":
            continue
        key, _, rest = part.partition("[")
        if key:
            obj = obj.get(key) if isinstance(obj, dict) else None
        if rest:
            idx = int(rest.rstrip("]"))
            obj = obj[idx] if isinstance(obj, list) and -len(obj) <= idx < len(obj) else None
        if obj is None:
            return None
    return obj


def _value_str(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, list):
        return ";".join(_value_str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return str(v)


def emit(args: Args, obj, is_list: bool = False) -> None:
    """Print obj per --format: json (also the default here; real gcloud prints YAML) or
    value(f1,f2) with dotted fields, one line per item of a list."""
    fmt = (args.get("format") or "json").strip()
    if fmt == "json":
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    elif fmt.startswith("value(") and fmt.endswith(")"):
        fields = [f.strip() for f in fmt[6:-1].split(",") if f.strip()]
        for item in obj if is_list else [obj]:
            sys.stdout.write("\t".join(_value_str(_dig(item, f)) for f in fields) + "\n")
    else:
        raise NotImplementedCall
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# Commands


def cmd_auth_list(args: Args) -> int:
    accounts = [] if os.environ.get("FAKE_GCLOUD_LOGGED_OUT") == "1" else [ACCOUNT]
    if args.get("format"):
        emit(args, [{"account": a, "status": "ACTIVE"} for a in accounts], is_list=True)
    elif accounts:
        print(f"Credentialed Accounts\nACTIVE  ACCOUNT\n*       {accounts[0]}")
    else:
        _stderr("No credentialed accounts.")
    return 0


def cmd_config_get_project(args: Args) -> int:
    print(_project(args))
    return 0


def cmd_accelerator_types(args: Args) -> int:
    command = "compute.tpus.accelerator-types.list"
    zone = _zone(args, command)
    _check_zone(zone, command)
    project = _project(args)
    types = [
        {"name": f"projects/{project}/locations/{zone}/acceleratorTypes/{t}", "type": t}
        for t in ACCELERATOR_TYPES
    ]
    emit(args, types, is_list=True)
    return 0


def _need_name(args: Args, command: str, n_pos: int) -> str:
    if len(args.positional) != n_pos:
        raise _fail(command, "argument NAME: Must be specified exactly once.", 2)
    return args.positional[-1]


def _check_type(acc: str | None, command: str, zone: str, flag: str) -> str:
    if not acc:
        raise _fail(command, f"argument --{flag}: Must be specified.", 2)
    if acc not in ACCELERATOR_TYPES:
        raise _fail(
            command,
            f"INVALID_ARGUMENT: Invalid resource field value in the request: accelerator type "
            f"{acc!r} is not available in zone {zone}",
        )
    return acc


def cmd_tpu_create(args: Args) -> int:
    command = "compute.tpus.tpu-vm.create"
    name = _need_name(args, command, 5)
    zone, project = _zone(args, command), _project(args)
    _check_zone(zone, command)
    acc = _check_type(args.get("accelerator-type"), command, zone, "accelerator-type")
    version = args.get("version")
    if not version:
        raise _fail(command, "argument --version: Must be specified.", 2)
    with locked_state() as st:
        if name in st["nodes"]:
            raise _fail(
                command,
                f"ALREADY_EXISTS: Resource '{_node_path(st['nodes'][name])}' already exists",
            )
        _count_create(st, command, zone)
        creating = _int_env("FAKE_GCLOUD_CREATING_DESCRIBES", 0)
        _make_node(
            st,
            name=name,
            project=project,
            zone=zone,
            acceleratorType=acc,
            runtimeVersion=version,
            preemptible=args.flag("preemptible"),
            spot=args.flag("spot"),
            state="CREATING" if creating > 0 else "READY",
            creating_describes_left=creating,
            queuedResource=None,
            workers=_int_env("FAKE_GCLOUD_WORKERS", 2),
        )
    _stderr(f"Create request issued for: [{name}]\nWaiting for operation to finish...done.")
    _stderr(f"Created tpu [{name}].")
    return 0


def cmd_tpu_describe(args: Args) -> int:
    command = "compute.tpus.tpu-vm.describe"
    name = _need_name(args, command, 5)
    with locked_state() as st:
        out = _observe_node(_node_or_not_found(st, args, command, name))
    emit(args, out)
    return 0


def cmd_tpu_list(args: Args) -> int:
    command = "compute.tpus.tpu-vm.list"
    if len(args.positional) != 4:
        raise NotImplementedCall
    zone, project = _zone(args, command), _project(args)
    _check_zone(zone, command)
    with locked_state() as st:
        out = [
            _observe_node(n)
            for n in st["nodes"].values()
            if n["zone"] == zone and n["project"] == project
        ]
    emit(args, out, is_list=True)
    return 0


def cmd_tpu_delete(args: Args) -> int:
    command = "compute.tpus.tpu-vm.delete"
    name = _need_name(args, command, 5)
    with locked_state() as st:
        node = _node_or_not_found(st, args, command, name)
        _drop_node(st, node)
    _stderr(f"Delete request issued for: [{name}]\nWaiting for operation to finish...done.")
    _stderr(f"Deleted tpu [{name}].")
    return 0


# --------------------------------------------------------------------------------------------
# Worker VMs: each worker of a node is a machine of its own, a process (the VM's init) in new
# UTS, PID and mount namespaces, booted at its first ssh session. It has Cloud TPU's hostname
# (`t1v-n-<id>-w-<i>`, new with every node) and process ids counted from 1, so a recreated VM
# looks like another machine, as it is; every ssh session runs inside it (nsenter), and killing
# its init (preempt, delete) ends every process on it. FAKE_GCLOUD_ISOLATE=0 runs sessions on
# this machine as it is (one hostname, one process table for every VM).

VM_INIT = """\
import os, socket, subprocess, sys, time
hostname, ready, hosts = sys.argv[1:]
socket.sethostname(hostname)
# the VM's /etc/hosts names it, as a TPU VM's does (gloo, for one, resolves the hostname)
with open("/etc/hosts") as f, open(hosts, "w") as out:
    out.write(f.read().rstrip("\\n") + f"\\n127.0.1.1 {hostname}\\n")
subprocess.run(["mount", "--bind", hosts, "/etc/hosts"], check=True)
open(ready, "w").close()
while True:  # pid 1 of the VM reaps the processes orphaned there, as an init does
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
"""


def _isolated() -> bool:
    return os.environ.get("FAKE_GCLOUD_ISOLATE", "1") != "0"


def _hostname(node: dict, worker: int) -> str:
    return f"t1v-n-{int(node['id']) % 16**8:08x}-w-{worker}"


def _child_of(pid: int) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(raw[raw.rfind(")") + 2 :].split()[1]) == pid:
                return int(entry)
    return None


def _boot_vm(node: dict, worker: int, command: str) -> dict:
    """The running VM of `worker`, booted if it is not running."""
    record = node["workers"][worker]
    vm = record.get("vm")
    if vm is not None and _start_time(vm["pid"]) == vm["start"]:
        return vm
    folder = _state_dir() / "vms"
    folder.mkdir(exist_ok=True)
    hostname = _hostname(node, worker)
    ready, log, hosts = (folder / f"{hostname}.{kind}" for kind in ("ready", "log", "hosts"))
    ready.unlink(missing_ok=True)
    with open(log, "w") as errors:
        unshare = subprocess.Popen(
            [
                *("unshare", "--uts", "--pid", "--mount", "--fork", "--mount-proc", "--"),
                *(sys.executable, "-I", "-c", VM_INIT, hostname, str(ready), str(hosts)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
        )
    deadline = time.monotonic() + 20
    while not ready.exists():
        if unshare.poll() is not None or time.monotonic() > deadline:
            unshare.kill()
            _stderr(
                f"fake gcloud: cannot boot worker {worker}'s VM (unshare: "
                f"{log.read_text().strip() or 'timed out'}); it needs root or user namespaces. "
                "FAKE_GCLOUD_ISOLATE=0 runs the workers on this machine instead"
            )
            raise _fail(command, "[/usr/bin/ssh] exited with return code [255].", 255)
        time.sleep(0.01)
    init = _child_of(unshare.pid)
    record["vm"] = {"pid": init, "start": _start_time(init), "hostname": hostname}
    return record["vm"]


def _halt_vms(node: dict) -> None:
    """SIGKILL every worker VM's init: the kernel then kills every process of the VM."""
    for record in node["workers"]:
        vm = record.pop("vm", None)
        if vm is not None and _start_time(vm["pid"]) == vm["start"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(vm["pid"], signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# ssh, and gcloud's retries of it. ssh(1) exits 255 when it cannot connect, when the connection
# drops, and when the remote command dies by a signal; `gcloud compute tpus tpu-vm ssh` then
# runs the command again on that worker (FAKE_GCLOUD_SSH_ATTEMPTS times in all, 10, every
# FAKE_GCLOUD_SSH_RETRY_SECONDS, 5). `fake disconnect` drops sessions: the client stops copying
# the worker's output (its next write fails) and says 255, and the remote command runs on.

_spawn_guard = threading.Lock()
_spawning = 0  # sessions being started and recorded: a SIGTERM waits for them
_pending_signal: int | None = None


def _ssh_client_exit(signum: int) -> None:
    os.write(2, f"Killed by signal {signum}.\n".encode())
    os._exit(255)


def _on_ssh_signal(signum, frame):
    global _pending_signal
    _pending_signal = signum  # exit once the sessions being started are recorded
    if _spawning == 0:
        _ssh_client_exit(signum)


@contextlib.contextmanager
def _recording_session():
    global _spawning
    with _spawn_guard:
        _spawning += 1
    try:
        yield
    finally:
        with _spawn_guard:
            _spawning -= 1
            exit_now = _spawning == 0 and _pending_signal is not None
        if exit_now:
            _ssh_client_exit(_pending_signal)


def _relay(src, dst_fd: int, dropped: threading.Event) -> None:
    """Copy a worker's pipe to our fd as it comes. When this client dies or the session is
    dropped, the pipe's read end closes and the worker's next write fails (EPIPE/SIGPIPE), as
    with a real dropped session."""
    fd = src.fileno()
    try:
        while (chunk := os.read(fd, 65536)) and not dropped.is_set():
            while chunk:
                chunk = chunk[os.write(dst_fd, chunk) :]
    except OSError:
        pass
    finally:
        src.close()


def _worker_env(home: Path) -> dict[str, str]:
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": str(home),
        "USER": pwd.getpwuid(os.getuid()).pw_name,
        "LANG": "C.UTF-8",
    }
    raw = os.environ.get("FAKE_GCLOUD_VM_ENV", "").strip()
    if raw:
        try:
            extra = json.loads(raw)
        except ValueError:
            extra = None
        if not isinstance(extra, dict):
            _stderr("fake gcloud: FAKE_GCLOUD_VM_ENV must be a JSON object")
            raise Exit(2)
        env.update({str(k): str(v) for k, v in extra.items()})
    return env


def _dropped_flag(pgid: int) -> Path:
    return _state_dir() / "dropped" / str(pgid)


def _session(name: str, uid: str, worker: int, cmd: str, shared_stdin: bool, command: str) -> int:
    """One ssh connection to `worker` running `cmd`: its exit status, or 255 as ssh says it."""
    relay = os.environ.get("FAKE_GCLOUD_SSH_RELAY") == "1"
    with _recording_session(), locked_state() as st:
        node = st["nodes"].get(name)
        if node is None or node["uid"] != uid or node["state"] != "READY" or st.get("halted"):
            _stderr("ssh: connect to host 127.0.0.1 port 22: Connection refused")
            return SSH_FAILED
        home = _disk(name, worker)
        home.mkdir(parents=True, exist_ok=True)
        argv = [shutil.which("bash") or "/bin/bash", "-c", cmd]
        if _isolated():
            vm = _boot_vm(node, worker, command)
            nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
            enter = ["--uts", "--pid", "--mount", f"--wd={home}", "--"]
            argv = [nsenter, f"--target={vm['pid']}", *enter, *argv]
        sys.stdout.flush()
        sys.stderr.flush()
        process = subprocess.Popen(
            argv,
            cwd=home,
            env=_worker_env(home),
            stdin=None if shared_stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if relay else None,
            stderr=subprocess.PIPE if relay else None,
            start_new_session=True,
        )
        node["workers"][worker]["pgids"].append(
            {
                "pgid": process.pid,
                "start": _start_time(process.pid),
                "ssh_pid": os.getpid(),
                "nsenter": _isolated(),  # the group's leader is nsenter, outside the VM
            }
        )
    dropped = threading.Event()
    relays = []
    if relay:
        for src, dst in ((process.stdout, 1), (process.stderr, 2)):
            relays.append(threading.Thread(target=_relay, args=(src, dst, dropped), daemon=True))
            relays[-1].start()
    while process.poll() is None:
        if _dropped_flag(process.pid).exists():
            dropped.set()
            _stderr("client_loop: send disconnect: Broken pipe")
            return SSH_FAILED
        time.sleep(0.05)
    for thread in relays:
        thread.join()  # like ssh: the session ends at EOF, when no process holds the output open
    with locked_state() as st:
        now = st["nodes"].get(name)
        lost = now is None or now["uid"] != uid or now["state"] != "READY"
    return SSH_FAILED if lost or process.returncode < 0 else process.returncode


def _session_with_retries(name, uid, worker, cmd, shared_stdin, command) -> int:
    attempts = _int_env("FAKE_GCLOUD_SSH_ATTEMPTS", 10)
    delay = float(os.environ.get("FAKE_GCLOUD_SSH_RETRY_SECONDS") or 5)
    for attempt in range(attempts):
        code = _session(name, uid, worker, cmd, shared_stdin, command)
        if code != SSH_FAILED or attempt == attempts - 1:
            return code
        _stderr(
            f"Retrying: SSH command error: [/usr/bin/ssh] exited with return code [{SSH_FAILED}]."
        )
        time.sleep(delay)
        _stderr(f"SSH: Attempting to connect to worker {worker}...")
    return SSH_FAILED


def cmd_tpu_ssh(args: Args) -> int:
    command = "compute.tpus.tpu-vm.ssh"
    name = _need_name(args, command, 5)
    cmd = args.get("command")
    if cmd is None:
        raise NotImplementedCall  # an interactive shell
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_ssh_signal)
    _worker_env(Path("."))  # a malformed FAKE_GCLOUD_VM_ENV fails here, before any worker starts
    with locked_state() as st:
        node = _node_or_not_found(st, args, command, name)
        workers = _parse_workers(args.get("worker", "0"), len(node["workers"]), command)
        uid = node["uid"]
    codes: dict[int, int] = {}

    def connect(worker: int) -> None:
        try:
            codes[worker] = _session_with_retries(
                name, uid, worker, cmd, len(workers) == 1, command
            )
        except Exit as failed:  # the message is on stderr already
            codes[worker] = failed.code

    threads = [threading.Thread(target=connect, args=(i,), daemon=True) for i in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # a timed join lets this thread take signals
            thread.join(0.1)
    return SSH_FAILED if SSH_FAILED in codes.values() else max(codes.values())


def _remote_rel(dst: str) -> Path | None:
    """DST of NAME:DST relative to HOME, or None for a path the fake cannot map."""
    if dst in ("", "~", "~/"):
        return Path(".")
    if dst.startswith("~/"):
        dst = dst[2:]
    if dst.startswith("/") or dst.startswith("~"):
        return None
    rel = Path(os.path.normpath(dst))
    if rel.parts and rel.parts[0] == "..":
        return None
    return rel


def cmd_tpu_scp(args: Args) -> int:
    command = "compute.tpus.tpu-vm.scp"
    pos = args.positional[4:]
    if len(pos) < 2 or ":" not in pos[-1] or any(":" in s.split("/")[0] for s in pos[:-1]):
        raise NotImplementedCall  # only local -> remote copies are implemented
    name, _, dst = pos[-1].partition(":")
    name = name.rpartition("@")[2]
    rel = _remote_rel(dst)
    if rel is None:
        raise NotImplementedCall
    sources = [Path(s) for s in pos[:-1]]
    recurse = args.flag("recurse")
    with locked_state() as st:
        node = _node_or_not_found(st, args, command, name)
        workers = _parse_workers(args.get("worker", "0"), len(node["workers"]), command)
        if node["state"] != "READY":
            _stderr("ssh: connect to host 127.0.0.1 port 22: Connection refused\nlost connection")
            raise _fail(command, "[/usr/bin/scp] exited with return code [255].", 255)
        for src in sources:
            if not src.exists():
                _stderr(f"{src}: No such file or directory")
                raise _fail(command, "[/usr/bin/scp] exited with return code [1].")
            if src.is_dir() and not recurse:
                _stderr(f"scp: {src}: not a regular file")
                raise _fail(command, "[/usr/bin/scp] exited with return code [1].")
        for i in workers:
            home = _disk(name, i)
            target = home / rel
            into = len(sources) > 1 or dst.endswith("/") or target.is_dir()
            if (into and not target.is_dir()) or not target.parent.is_dir():
                _stderr(f"scp: {dst}: No such file or directory")
                raise _fail(command, "[/usr/bin/scp] exited with return code [1].")
            for src in sources:
                out = target / src.name if into else target
                if src.is_dir():
                    shutil.copytree(src, out, dirs_exist_ok=True)
                else:
                    shutil.copy2(src, out)
    return 0


def _qr_json(qr: dict) -> dict:
    state = {"state": qr["state"]}
    if qr.get("stateInitiator"):
        state["stateInitiator"] = qr["stateInitiator"]
    out = {
        "name": _qr_path(qr),
        "createTime": qr["createTime"],
        "state": state,
        "tpu": {"nodeSpec": [_node_spec(qr)]},
    }
    tier = qr.get("tier")
    if tier == "spot":
        out["spot"] = {}
    elif tier == "best-effort":
        out["bestEffort"] = {}
    elif tier == "guaranteed":
        out["guaranteed"] = {}
    elif tier == "reserved":
        out["guaranteed"] = {"reserved": True}
    return out


def _node_spec(qr: dict) -> dict:
    """The API's nodeSpec: a node id, or for several slices (multislice) a count and prefix."""
    spec: dict = {
        "parent": f"projects/{qr['project']}/locations/{qr['zone']}",
        "node": {"acceleratorType": qr["acceleratorType"], "runtimeVersion": qr["runtimeVersion"]},
    }
    if qr.get("nodePrefix"):
        spec["multisliceParams"] = {
            "nodeCount": len(qr["nodeIds"]),
            "nodeIdPrefix": qr["nodePrefix"],
        }
    else:
        spec["nodeId"] = qr["nodeIds"][0]
    return spec


def _activate_qr(st: dict, qr: dict) -> None:
    if any(n in st["nodes"] for n in qr["nodeIds"]):  # a node of that name appeared meanwhile
        qr["state"] = "FAILED"
        return
    qr["state"] = "ACTIVE"
    for node_id in qr["nodeIds"]:
        _make_node(
            st,
            name=node_id,
            project=qr["project"],
            zone=qr["zone"],
            acceleratorType=qr["acceleratorType"],
            runtimeVersion=qr["runtimeVersion"],
            preemptible=False,
            spot=qr.get("tier") == "spot",
            state="READY",
            creating_describes_left=0,
            queuedResource=qr["name"],
            workers=qr["workers"],
        )


def _observe_qr(st: dict, qr: dict) -> dict:
    if qr["state"] == "WAITING_FOR_RESOURCES":
        if qr["waiting_describes_left"] > 0:
            qr["waiting_describes_left"] -= 1
        else:
            _activate_qr(st, qr)
    return _qr_json(qr)


def _qr_or_not_found(st: dict, args: Args, command: str, name: str) -> dict:
    project, zone = _project(args), _zone(args, command)
    qr = st["queued_resources"].get(name)
    if qr is None or qr["project"] != project or qr["zone"] != zone:
        raise _fail(
            command,
            f"NOT_FOUND: Resource 'projects/{project}/locations/{zone}/queuedResources/{name}' "
            "was not found",
        )
    return qr


def cmd_qr_create(args: Args) -> int:
    command = "compute.tpus.queued-resources.create"
    name = _need_name(args, command, 5)
    zone, project = _zone(args, command), _project(args)
    _check_zone(zone, command)
    node_id, count = args.get("node-id"), args.get("node-count")
    if bool(node_id) == bool(count):
        raise _fail(command, "Exactly one of (--node-count | --node-id) must be specified.", 2)
    prefix = args.get("node-prefix") or name  # the API's default: the queued resource's name
    if count and (not count.isdigit() or int(count) < 2):
        raise _fail(command, f"INVALID_ARGUMENT: node_count {count} must be > 1", 1)
    node_ids = [node_id] if node_id else [f"{prefix}-{i}" for i in range(int(count or 0))]
    acc = _check_type(args.get("accelerator-type"), command, zone, "accelerator-type")
    version = args.get("runtime-version")
    if not version:
        raise _fail(command, "argument --runtime-version: Must be specified.", 2)
    tiers = [t for t in ("spot", "reserved", "guaranteed", "best-effort") if args.flag(t)]
    if len(tiers) > 1:
        raise _fail(command, f"arguments {', '.join('--' + t for t in tiers)}: at most one", 2)
    with locked_state() as st:
        if name in st["queued_resources"]:
            raise _fail(
                command,
                f"ALREADY_EXISTS: Resource '{_qr_path(st['queued_resources'][name])}' "
                "already exists",
            )
        for existing in (n for n in node_ids if n in st["nodes"]):
            raise _fail(
                command,
                f"ALREADY_EXISTS: Resource '{_node_path(st['nodes'][existing])}' already exists",
            )
        _count_create(st, command, zone)
        qr = {
            "name": name,
            "project": project,
            "zone": zone,
            "nodeIds": node_ids,
            "nodePrefix": None if node_id else prefix,
            "acceleratorType": acc,
            "runtimeVersion": version,
            "tier": tiers[0] if tiers else None,
            "createTime": _now(),
            "state": "WAITING_FOR_RESOURCES",
            "waiting_describes_left": _int_env("FAKE_GCLOUD_QR_WAITING_DESCRIBES", 0),
            "workers": _int_env("FAKE_GCLOUD_WORKERS", 2),
        }
        st["queued_resources"][name] = qr
        if qr["waiting_describes_left"] <= 0:
            _activate_qr(st, qr)
    _stderr(f"Create request issued for: [{name}]\nWaiting for operation to finish...done.")
    _stderr(f"Created queued resource [{name}].")
    return 0


def cmd_qr_describe(args: Args) -> int:
    command = "compute.tpus.queued-resources.describe"
    name = _need_name(args, command, 5)
    with locked_state() as st:
        out = _observe_qr(st, _qr_or_not_found(st, args, command, name))
    emit(args, out)
    return 0


def cmd_qr_list(args: Args) -> int:
    command = "compute.tpus.queued-resources.list"
    if len(args.positional) != 4:
        raise NotImplementedCall
    zone, project = _zone(args, command), _project(args)
    _check_zone(zone, command)
    with locked_state() as st:
        out = [
            _observe_qr(st, q)
            for q in list(st["queued_resources"].values())
            if q["zone"] == zone and q["project"] == project
        ]
    emit(args, out, is_list=True)
    return 0


def cmd_qr_delete(args: Args) -> int:
    command = "compute.tpus.queued-resources.delete"
    name = _need_name(args, command, 5)
    with locked_state() as st:
        qr = _qr_or_not_found(st, args, command, name)
        nodes = [st["nodes"].get(n) for n in qr["nodeIds"]]
        nodes = [n for n in nodes if n is not None and n.get("queuedResource") == name]
        if nodes and not args.flag("force"):
            raise _fail(
                command,
                f"FAILED_PRECONDITION: Queued resource '{_qr_path(qr)}' in state "
                f"{qr['state']} still has node '{nodes[0]['name']}'; delete the node first or "
                "pass --force to delete the queued resource together with its node",
            )
        for node in nodes:
            _drop_node(st, node)
        del st["queued_resources"][name]
    _stderr(f"Delete request issued for: [{name}]\nWaiting for operation to finish...done.")
    _stderr(f"Deleted queued resource [{name}].")
    return 0


def _fake_node(st: dict, args: Args, verb: str) -> dict:
    if len(args.positional) != 3:
        raise _fail(f"fake.{verb}", "argument NODE: Must be specified exactly once.", 2)
    name = args.positional[2]
    node = _find_node(st, name, None, None)
    if node is None:
        raise _fail(f"fake.{verb}", f"NOT_FOUND: no node named {name!r}")
    return node


def cmd_fake_preempt(args: Args) -> int:
    with locked_state() as st:
        node = _fake_node(st, args, "preempt")
        _kill_node_processes(node)
        node["state"], node["health"] = "PREEMPTED", "UNHEALTHY_MAINTENANCE"
        _wipe_disks(node["name"])
        qr = st["queued_resources"].get(node.get("queuedResource") or "")
        if qr is not None:
            qr["state"], qr["stateInitiator"] = "SUSPENDED", "SERVICE"
    return 0


def _fake_signal(args: Args, verb: str, sig: int) -> int:
    with locked_state() as st:
        node = _fake_node(st, args, verb)
        workers = _parse_workers(args.get("worker", "all"), len(node["workers"]), f"fake.{verb}")
        _signal_groups(node, sig, workers)
    return 0


def cmd_fake_disconnect(args: Args) -> int:
    """Drop the ssh sessions to the node's workers (--worker, default all): their clients say
    255 (and gcloud retries), their remote commands run on."""
    with locked_state() as st:
        node = _fake_node(st, args, "disconnect")
        workers = _parse_workers(args.get("worker", "all"), len(node["workers"]), "fake.disconnect")
        table = _proc_table()
        folder = _state_dir() / "dropped"
        folder.mkdir(exist_ok=True)
        for i in workers:
            for record in node["workers"][i]["pgids"]:
                if _group_pids(record, table):
                    _dropped_flag(record["pgid"]).touch()
    return 0


def cmd_fake_processes(args: Args) -> int:
    with locked_state() as st:
        node = _fake_node(st, args, "processes")
        table = _proc_table()
        out = {
            str(i): sorted(
                pid
                for rec in w["pgids"]
                for pid in _group_pids(rec, table)
                if not (rec.get("nsenter") and pid == rec["pgid"])
            )
            for i, w in enumerate(node["workers"])
        }
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


def cmd_fake_kill_all(args: Args) -> int:
    """SIGKILL every process of every node, and refuse ssh from now on (test teardown: an ssh
    client still retrying must not boot a VM that outlives the test); nodes stay as they are."""
    with locked_state() as st:
        st["halted"] = True
        for node in st["nodes"].values():
            _kill_node_processes(node)
    return 0


def dispatch(args: Args) -> int:
    p = args.positional
    if tuple(p) == ("auth", "list"):
        args.check_flags("")
        return cmd_auth_list(args)
    if tuple(p) == ("config", "get-value", "project"):
        args.check_flags("")
        return cmd_config_get_project(args)
    if tuple(p) == ("compute", "tpus", "accelerator-types", "list"):
        args.check_flags("")
        return cmd_accelerator_types(args)
    if (
        tuple(p[:2]) == ("compute", "tpus")
        and len(p) >= 4
        and p[2] in ("tpu-vm", "queued-resources")
    ):
        key = f"{p[2]} {p[3]}"
        handler = {
            "tpu-vm create": cmd_tpu_create,
            "tpu-vm describe": cmd_tpu_describe,
            "tpu-vm list": cmd_tpu_list,
            "tpu-vm delete": cmd_tpu_delete,
            "tpu-vm ssh": cmd_tpu_ssh,
            "tpu-vm scp": cmd_tpu_scp,
            "queued-resources create": cmd_qr_create,
            "queued-resources describe": cmd_qr_describe,
            "queued-resources list": cmd_qr_list,
            "queued-resources delete": cmd_qr_delete,
        }.get(key)
        if handler is not None:
            args.check_flags(key)
            return handler(args)
    if len(p) >= 2 and p[0] == "fake":
        key = f"fake {p[1]}"
        handler = {
            "fake preempt": cmd_fake_preempt,
            "fake stall": lambda a: _fake_signal(a, "stall", signal.SIGSTOP),
            "fake resume": lambda a: _fake_signal(a, "resume", signal.SIGCONT),
            "fake processes": cmd_fake_processes,
            "fake disconnect": cmd_fake_disconnect,
            "fake kill-all": cmd_fake_kill_all,
        }.get(key)
        if handler is not None:
            args.check_flags(key)
            return handler(args)
    raise NotImplementedCall


def main(argv: list[str]) -> int:
    if not os.environ.get("FAKE_GCLOUD_STATE"):
        _stderr("fake gcloud: FAKE_GCLOUD_STATE is not set; refusing to run")
        return 2
    argv = strip_release_track(list(argv))
    _state_dir().mkdir(parents=True, exist_ok=True)
    log_call(argv)
    try:
        if argv in (["help"], ["--help"], ["-h"]):
            sys.stdout.write(USAGE)
            return 0
        return dispatch(Args(argv))
    except NotImplementedCall:
        _stderr(f"fake gcloud: not implemented: {shlex.join(argv)}")
        return 2
    except Exit as e:
        return e.code


def install(bin_dir: Path, state_dir: Path) -> Path:
    """Write an executable `bin_dir/gcloud` that runs this fake; return bin_dir.

    The wrapper exports FAKE_GCLOUD_STATE=state_dir unless the caller's environment already sets
    it, so processes that do not forward the test's environment still find the state.
    """
    bin_dir, state_dir = Path(bin_dir), Path(state_dir).resolve()
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve()
    wrapper = bin_dir / "gcloud"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ -z "${FAKE_GCLOUD_STATE:-}" ]; then\n'
        f"  FAKE_GCLOUD_STATE={shlex.quote(str(state_dir))}\n"
        "  export FAKE_GCLOUD_STATE\n"
        "fi\n"
        f'exec {shlex.quote(sys.executable)} {shlex.quote(str(script))} "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
