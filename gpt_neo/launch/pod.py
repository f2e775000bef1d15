"""The pod launcher: from a workstation, run one training job on every worker of a TPU slice (or
of several slices, one queued resource with a node per slice) and keep it running through
preemptions until it is done.

    ENSURE   describe the slice: absent -> create (capacity errors retried with backoff);
             CREATING & co -> wait; PREEMPTED/TERMINATED/SUSPENDED/FAILED -> delete, create
    SYNC     (after each create) ship the code tarball, unpack it, run the setup once per disk
    CLEAN    kill the previous attempt's run process by its recorded pid, drop libtpu's lock
    RUN      one `gcloud ... ssh --worker=i` per worker: main.py with an explicit coordinator
             (worker 0's internal IP, a fresh port per attempt), process count and id, and the
             launch run and attempt it belongs to (its run lock lets a later attempt take over);
             across slices the workers are numbered slice by slice and get libtpu's MEGASCALE_*
             variables. Any slice lost: the whole queued resource is recreated.
    WATCH    stream worker 0 with a prefix (all workers to log files); describe the slice every
             `poll_seconds`; no new step logged for the heartbeat timeout -> hung
    DECIDE   exit codes and the slice's state decide (one log line each):
             all 0 -> done;  2 (bad input), 3 (diverged) -> stop, never retried;
             slice lost -> recreate (preemption budget);  75 (SIGTERM) or a lost connection
             on a READY slice -> relaunch every worker (preemption budget);  hung -> relaunch,
             recreate after two in a row;  killed by a signal, anything else -> relaunch
             every worker (failure budget)

What runs on the workers (unpacking, cleaning, each attempt's script) is `gpt_neo.launch.remote`;
its scripts make ssh's 255 mean only "connection lost".

The job resumes from its newest checkpoint, which is why a multi-host `model_path` must be on
`gs://`. This is GPT-Neo's `run_experiment.py` + tpunicorn loop for multi-host TPU VMs, written
here rather than borrowed because no maintained tool does this loop without a cluster manager
(Ray, GKE); see DESIGN.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from gpt_neo.errors import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USER_ERROR
from gpt_neo.launch import gcloud as g
from gpt_neo.launch import remote
from gpt_neo.launch.bundle import Bundle
from gpt_neo.training.checkpoint import run_lock

EXIT_GAVE_UP = 1  # a retry budget ran out
EXIT_INTERRUPTED = 130  # Ctrl-C (the workers were asked to save first)
SSH_LOST = 255  # ssh(1): the connection dropped
MEGASCALE_PORT = 8081  # libtpu's port between slices (the value Ray's TPU support sets too)
# What the heartbeat counts as progress: worker 0's step line (gpt_neo.training.metrics) and the line of
# a run that finds itself complete.
PROGRESS = re.compile(r"^(step \d+/\d+ \||training is complete)")


@dataclass
class PodOptions:
    spec: g.SliceSpec
    worker_args: list[str]  # main.py flags for every attempt
    launch_run: str  # the run lock's name for this launch run: the slice (run_lock.Launch)
    takeover: str | None = None  # a run-lock holder the launcher found gone (its token)
    first_attempt_args: list[str] = field(default_factory=list)  # e.g. --new --yes
    worker_setup: str | None = None  # runs once per worker disk, in the code directory
    heartbeat_timeout: float = 1800
    initial_heartbeat_timeout: float = 7200  # until the first step: setup, compile, restore
    poll_seconds: float = 60
    max_preemptions: int = 100
    max_failures: int = 5
    create_retry_seconds: float = 60
    worker_grace: float = 30  # after a worker fails, how long the others get to exit
    stop_grace: float = 300  # Ctrl-C: how long the workers get to write their checkpoint
    coordinator_port: int = 8476
    delete_when_done: bool = False
    log_dir: Path = Path("tpu_logs")


@dataclass
class Outcome:
    kind: str  # done | bad_input | diverged | lost_slice | relaunch | hung | failed
    seen: str  # what was observed, for the log line
    code: int = 0
    worker: int | None = None  # the worker whose last lines explain it


@contextlib.contextmanager
def sole_launcher(launch_run: str):
    """Hold this machine's claim on the slice `launch_run` names: a second launcher for it is
    refused. Two would stop each other's workers (each cleans the slice before an attempt), and
    the run lock lets an attempt of a launch run take over from any earlier one only because
    one launcher at a time drives a slice. (An flock: released by the kernel however this
    process ends, so it never needs cleaning up.)"""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "gpt-neo" / "launchers"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{launch_run.replace('/', '.')}.lock", "a+") as claim:
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            claim.seek(0)
            name = launch_run.rsplit("/", 1)[-1]
            raise g.LaunchError(
                f"another launcher ({claim.read().strip() or 'pid unknown'}) on this machine "
                f"drives TPU {name}; stop it (Ctrl-C) or wait for it to end; two launchers on "
                "one slice stop each other's workers"
            ) from None
        claim.truncate(0)
        claim.write(f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        claim.flush()
        yield


class Stop(Exception):
    """Ctrl-C or SIGTERM to the launcher."""


class PodLauncher:
    def __init__(self, options: PodOptions, bundle: Bundle, gcloud: g.Gcloud, console=print):
        self.o, self.bundle, self.gcloud, self.console = options, bundle, gcloud, console
        self.preemptions = self.failures = self.hangs_in_row = self.attempt = 0
        self.workers: list[subprocess.Popen] = []
        # names this invocation's attempts apart from those of an earlier launcher on the slice
        self.invocation = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"

    @property
    def attempt_id(self) -> str:
        return f"{self.invocation}-{self.attempt}"

    def log(self, seen: str, did: str) -> None:
        self.console(f"[launcher {time.strftime('%H:%M:%S')}] {seen}: {did}", flush=True)

    # --- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        previous = {s: signal.signal(s, self._stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run()
        except Stop:  # the workers were stopped where it was caught, if any were running
            self.log("stopped (Ctrl-C)", f"exit {EXIT_INTERRUPTED}; rerun the command to resume")
            return EXIT_INTERRUPTED
        except g.GcloudError as err:
            self.log(str(err), f"giving up; exit {EXIT_GAVE_UP}")
            return EXIT_GAVE_UP
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.o.delete_when_done:
                self._delete("--delete_when_done")

    def _run(self) -> int:
        synced_to = None  # the createTimes of the slices the code was shipped to
        while True:
            nodes, created = self.ensure_slice()
            born = [node.get("createTime", "") for node in nodes]
            if created or synced_to != born:
                if not self._sync(nodes):
                    continue  # a slice went away while we shipped the code
                synced_to = born
            if not self._clean():
                continue
            outcome = self.run_attempt(nodes)
            verdict = self.decide(outcome)
            if verdict is not None:
                return verdict
            if outcome.kind == "hung" and self.hangs_in_row >= 2:
                self.hangs_in_row = 0
                self._delete("two hangs in a row")

    def decide(self, outcome: Outcome) -> int | None:
        """The exit code when the launcher is finished; None to go round again."""
        seen = f"attempt {self.attempt}: {outcome.seen}"
        if outcome.worker:  # worker 0's output was streamed already
            for line in self.tails[outcome.worker]:
                self.console(f"[worker {outcome.worker}] {line}", flush=True)
        if outcome.kind != "hung":
            self.hangs_in_row = 0
        if outcome.kind == "done":
            self.log(seen, "the run is complete")
            return 0
        if outcome.kind in ("bad_input", "diverged"):
            self.log(seen, f"not retried (a rerun would fail the same way); exit {outcome.code}")
            return outcome.code
        if outcome.kind in ("lost_slice", "relaunch"):
            self.preemptions += 1
            budget, used, name = self.o.max_preemptions, self.preemptions, "preemptions"
        else:
            self.failures += 1
            self.hangs_in_row += outcome.kind == "hung"
            budget, used, name = self.o.max_failures, self.failures, "failures"
        if used > budget:
            self.log(seen, f"giving up: {used} {name}, more than --max_{name} {budget}")
            return EXIT_GAVE_UP
        did = {
            "lost_slice": "recreate the slice and resume from the newest checkpoint",
            "relaunch": "relaunch every worker on the same slice; it resumes from the newest "
            "checkpoint",
            "hung": "kill it and relaunch"
            + (" on a recreated slice" if self.hangs_in_row >= 2 else ""),
            "failed": "relaunch every worker",
        }[outcome.kind]
        self.log(seen, f"{did} ({name} {used}/{budget})")
        return None

    # --- ENSURE ----------------------------------------------------------------------------
    def observe(self) -> tuple[str | None, list[dict] | None]:
        """(state, nodes): None when the slice does not exist. A queued resource that is not
        ACTIVE reports its own state; an ACTIVE one its nodes' (one per slice): READY when
        every node is, else the first other state."""
        spec = self.o.spec
        if spec.queued:
            queued = self.gcloud.describe_queued(spec.name)
            if queued is None:
                return None, None
            state = queued.get("state", {}).get("state", "UNKNOWN")
            if state != g.ACTIVE:
                return state, None
        nodes = []
        for name in spec.nodes:
            node = self.gcloud.describe_node(name)
            if node is None:  # an ACTIVE queued resource's nodes appear a moment later
                return ("CREATING" if spec.queued else None), None
            if (state := node.get("state", "UNKNOWN")) != g.READY:
                return state, None
            nodes.append(node)
        return g.READY, nodes

    def ensure_slice(self) -> tuple[list[dict], bool]:
        """Wait until the slice (every slice of a multi-slice queued resource) is READY,
        creating (or deleting and recreating) it as needed. Returns (its nodes, whether it was
        created)."""
        spec, created, create_failures = self.o.spec, False, 0
        while True:
            try:
                state, nodes = self.observe()
            except g.GcloudError as err:
                self.log(f"describe failed ({err})", f"retry in {self.o.poll_seconds:.0f}s")
                time.sleep(self.o.poll_seconds)
                continue
            if state == g.READY:
                assert nodes is not None  # a READY slice was described
                return nodes, created
            if state is None:
                if spec.accelerator_type is None:
                    raise g.LaunchError(
                        f"TPU {spec.name} does not exist in {spec.zone}: pass --accelerator_type "
                        "(and --runtime_version) to create it"
                    )
                try:
                    self.gcloud.create(spec)
                except g.GcloudError as err:
                    if not err.capacity:
                        raise g.LaunchError(f"creating TPU {spec.name} failed: {err}") from None
                    create_failures += 1
                    delay = min(self.o.create_retry_seconds * 2 ** (create_failures - 1), 600)
                    delay *= random.uniform(1, 1.5)
                    self.log(
                        f"create {spec.name}: no capacity ({err.reason})",
                        f"try {create_failures + 1} in {delay:.0f}s",
                    )
                    time.sleep(delay)
                    continue
                created = True
                slices = f"{spec.num_slices} x " if spec.num_slices > 1 else ""
                self.log(
                    f"TPU {spec.name} absent",
                    f"created {'a queued resource ' if spec.queued else ''}{slices}"
                    f"{spec.accelerator_type} ({spec.provisioning}, {spec.runtime_version})",
                )
            elif state in g.WAIT:
                self.log(f"TPU {spec.name} is {state}", "waiting")
                time.sleep(self.o.poll_seconds)
            elif state == g.FAILED and spec.queued:  # the request itself failed: a rerun would too
                raise g.LaunchError(
                    f"queued resource {spec.name} is FAILED (gcloud compute tpus queued-resources "
                    f"describe {spec.name} --zone {spec.zone} says why); delete it with "
                    f"`gcloud compute tpus queued-resources delete {spec.name} --zone {spec.zone} "
                    "--force` and rerun"
                )
            else:
                self.log(f"TPU {spec.name} is {state}", "deleting it to recreate it")
                self.gcloud.delete(spec.name, spec.queued)

    def _delete(self, why: str) -> None:
        try:
            self.gcloud.delete(self.o.spec.name, self.o.spec.queued)
            self.log(why, f"deleted TPU {self.o.spec.name}")
        except g.GcloudError as err:
            self.log(why, f"deleting TPU {self.o.spec.name} failed ({err}); delete it by hand")

    # --- SYNC and CLEAN --------------------------------------------------------------------
    def _sync(self, nodes: list[dict]) -> bool:
        """Ship the code to every worker of every slice and run the setup where it has not
        run. False when a slice was lost meanwhile."""
        b = self.bundle
        unpack = remote.unpack_script(b, self.o.worker_setup)
        with tempfile.TemporaryDirectory() as tmp:
            tarball = Path(tmp) / b.name
            tarball.write_bytes(b.data)
            try:
                for name in self.o.spec.nodes:
                    self.gcloud.scp(name, str(tarball), b.name)
                    self.gcloud.ssh(name, "all", unpack)
            except g.GcloudError as err:
                return self._slice_trouble(f"shipping the code failed ({err})")
        workers = sum(len(node.get("networkEndpoints", [])) for node in nodes)
        where = f" in {len(nodes)} slices" if len(nodes) > 1 else ""
        self.log(
            f"code {b.digest} ({len(b.data) / 1e6:.1f} MB)", f"shipped to {workers} workers{where}"
        )
        return True

    def _clean(self) -> bool:
        """Kill the previous attempt's run process on every worker (by the pid it recorded,
        never by name) and remove libtpu's lock file, which a killed process leaves behind and
        which makes the next one fail with "TPU in use"."""
        try:
            out = "".join(
                self.gcloud.ssh(name, "all", remote.CLEAN_SCRIPT) for name in self.o.spec.nodes
            )
        except g.GcloudError as err:
            return self._slice_trouble(f"cleaning the workers failed ({err})")
        for line in out.splitlines():
            self.log("before launching", line)
        return True

    def _slice_trouble(self, seen: str) -> bool:
        """An ssh/scp failed outside a run: a lost slice is recreated (False), anything else is
        an error the user must see."""
        state, _ = self.observe()
        if state == g.READY:
            raise g.LaunchError(f"{seen}; the slice is READY, so this is not a preemption")
        self.preemptions += 1
        self.log(f"{seen}; TPU is {state or 'gone'}", "recreate it")
        return False

    # --- RUN and WATCH ---------------------------------------------------------------------
    def worker_script(
        self, worker: int, workers: int, coordinator: str, slice_id: int = 0, slices: int = 1
    ) -> str:
        """What worker `worker` (numbered across slices, slice by slice) runs for this
        attempt."""
        args = [*self.o.worker_args, *(self.o.first_attempt_args if self.attempt == 1 else [])]
        env = {
            run_lock.LAUNCH_RUN_ENV: self.o.launch_run,
            run_lock.LAUNCH_ATTEMPT_ENV: self.attempt_id,
        }
        if self.o.takeover:
            env[run_lock.TAKEOVER_ENV] = self.o.takeover
        if workers > 1:
            env |= {
                "GPT_NEO_COORDINATOR_ADDRESS": coordinator,
                "GPT_NEO_NUM_PROCESSES": str(workers),
                "GPT_NEO_PROCESS_ID": str(worker),
            }
        if slices > 1:  # what libtpu reads to join the slices over the data-centre network
            host = coordinator.rsplit(":", 1)[0]
            env |= {
                "MEGASCALE_COORDINATOR_ADDRESS": f"{host}:{MEGASCALE_PORT}",
                "MEGASCALE_PORT": str(MEGASCALE_PORT),
                "MEGASCALE_NUM_SLICES": str(slices),
                "MEGASCALE_SLICE_ID": str(slice_id),
            }
        return remote.run_script(self.bundle, args, env, self.attempt_id, self.attempt)

    def run_attempt(self, nodes: list[dict]) -> Outcome:
        self.attempt += 1
        # every worker of every slice, slice by slice: (node name, its worker index, slice)
        hosts = [
            (name, i, s)
            for s, (name, node) in enumerate(zip(self.o.spec.nodes, nodes, strict=True))
            for i, _ in enumerate(node.get("networkEndpoints") or [{}])
        ]
        first = (nodes[0].get("networkEndpoints") or [{"ipAddress": "127.0.0.1"}])[0]
        coordinator = f"{first['ipAddress']}:{self.o.coordinator_port + self.attempt % 16}"
        logs = self.o.log_dir / f"attempt-{self.attempt}"
        logs.mkdir(parents=True, exist_ok=True)
        where = f" in {len(nodes)} slices" if len(nodes) > 1 else ""
        self.log(
            f"attempt {self.attempt}",
            f"starting {len(hosts)} worker(s){where}, coordinator {coordinator}, logs in {logs}",
        )
        self.last_beat = None
        self.tails = [deque(maxlen=20) for _ in hosts]
        self.workers, readers = [], []
        for i, (name, local, slice_id) in enumerate(hosts):
            script = self.worker_script(i, len(hosts), coordinator, slice_id, len(nodes))
            command = self.gcloud.ssh_command(name, local, script)
            worker = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops them cleanly
            )
            self.workers.append(worker)
            reader = threading.Thread(target=self._read, args=(i, worker, logs), daemon=True)
            reader.start()
            readers.append(reader)
        try:
            watched = self._watch()
        except Stop:
            self._stop_workers()
            raise
        finally:
            self._end_ssh()
            for reader in readers:
                reader.join(timeout=10)
        return watched if watched is not None else self.classify()

    def _read(self, worker: int, process: subprocess.Popen, logs: Path) -> None:
        with open(logs / f"worker-{worker}.log", "w") as log:
            assert process.stdout is not None  # started with stdout=PIPE
            for line in process.stdout:
                log.write(line)
                log.flush()
                self.tails[worker].append(line.rstrip())
                if worker == 0:
                    self.console(f"[worker 0] {line.rstrip()}", flush=True)
                    if PROGRESS.match(line):
                        self.last_beat = time.monotonic()

    def _watch(self) -> Outcome | None:
        """Wait for the workers to end; an Outcome when the launcher must stop them first
        (hung, slice lost), else None."""
        started = time.monotonic()
        next_describe = started + self.o.poll_seconds
        first_failure = None
        while True:
            codes = [w.poll() for w in self.workers]
            if all(c is not None for c in codes):
                return None
            if any(c in (SSH_LOST, remote.RERUN_REFUSED) for c in codes):
                return None  # the other workers run on and will not exit: relaunch them all
            now = time.monotonic()
            if first_failure is None and any(c not in (None, 0) for c in codes):
                first_failure = now
            if first_failure is not None and now - first_failure > self.o.worker_grace:
                return None  # the rest are stuck waiting for the failed one: classify
            if self.last_beat is None:
                quiet, limit, kind = now - started, self.o.initial_heartbeat_timeout, "initial "
            else:
                quiet, limit, kind = now - self.last_beat, self.o.heartbeat_timeout, ""
            if quiet > limit:
                return Outcome(
                    "hung",
                    f"no step logged for {quiet:.0f}s ({kind}heartbeat timeout {limit:.0f}s)",
                )
            if now >= next_describe:
                next_describe = now + self.o.poll_seconds
                with contextlib.suppress(g.GcloudError):  # describe is retried next poll
                    state, _ = self.observe()
                    if state != g.READY:
                        return Outcome("lost_slice", f"TPU is {state or 'gone'} while running")
            time.sleep(0.2)

    def classify(self) -> Outcome:
        codes = [
            w.returncode if w.returncode is not None and w.returncode >= 0 else SSH_LOST
            for w in self.workers
        ]
        seen = f"worker exit codes {codes}"
        if all(c == 0 for c in codes):
            return Outcome("done", seen)
        for code, kind in ((EXIT_USER_ERROR, "bad_input"), (EXIT_DIVERGED, "diverged")):
            if code in codes:
                return Outcome(kind, seen, code, worker=codes.index(code))
        try:
            state, _ = self.observe()
        except g.GcloudError as err:
            state = f"unknown ({err})"
        if state != g.READY:
            return Outcome("lost_slice", f"{seen}, TPU is {state or 'gone'}")
        relaunch = (0, EXIT_PREEMPTED, SSH_LOST, remote.RERUN_REFUSED)
        if failed := [i for i, c in enumerate(codes) if c not in relaunch]:
            why = ", ".join(f"worker {i} {remote.exit_meaning(codes[i])}" for i in failed)
            return Outcome("failed", f"{seen} ({why})", worker=failed[0])
        if EXIT_PREEMPTED in codes:
            why = "a worker was asked to stop (SIGTERM)"
        else:
            lost = [i for i, c in enumerate(codes) if c in (SSH_LOST, remote.RERUN_REFUSED)]
            why = f"the connection to worker {', '.join(map(str, lost))} was lost"
        return Outcome("relaunch", f"{seen}, TPU is READY: {why}")

    def _end_ssh(self) -> None:
        """Stop the local ssh clients (their remote processes are killed by `_clean`)."""
        for worker in self.workers:
            if worker.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.terminate()
        for worker in self.workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()

    # --- Ctrl-C ----------------------------------------------------------------------------
    def _stop(self, signum, frame) -> None:
        raise Stop()

    def _stop_workers(self) -> None:
        """SIGTERM to every worker's run process: they agree on a step, save it and exit 75.
        Waits up to `stop_grace` (a second Ctrl-C stops waiting), then kills what is left."""
        if not any(w.poll() is None for w in self.workers):
            return
        signal.signal(signal.SIGINT, self._stop)
        self.log(
            "Ctrl-C",
            f"asking the workers to save a checkpoint and stop (up to "
            f"{self.o.stop_grace:.0f}s; Ctrl-C again to kill them now)",
        )
        try:
            for name in self.o.spec.nodes:
                with contextlib.suppress(g.GcloudError):
                    self.gcloud.ssh(name, "all", remote.STOP_SCRIPT, timeout=120)
            deadline = time.monotonic() + self.o.stop_grace
            while any(w.poll() is None for w in self.workers) and time.monotonic() < deadline:
                time.sleep(0.2)
        except Stop:
            pass
        self._end_ssh()
        with contextlib.suppress(g.GcloudError, g.LaunchError, Stop):
            self._clean()
