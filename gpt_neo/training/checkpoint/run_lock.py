"""One writer per `model_path`: `{model_path}/run.lock` names the run that trains there.

Two runs writing the same checkpoints would each prune and overwrite the other's steps. A
training run takes the lock before it touches anything (process 0 only: the processes of one
run are one writer) and refreshes it while it runs; a second run is refused with a line naming
the holder. A lock whose holder is gone is taken over:

- on the same host, its process no longer exists; from anywhere, it has not been refreshed for
  `STALE_SECONDS` (runs started by hand);
- it was taken by another attempt of the same pod launch run (`Launch`): the pod launcher ends
  every run process on its slice, or recreates the slice, before it starts an attempt, so an
  earlier attempt's holder is gone even when its host (a deleted TPU VM) cannot be asked;
- the launcher checked that holder itself and found it gone (`TAKEOVER_ENV` names its token):
  a run on the launcher's own workstation whose process ended, or a launch run on a slice that
  no longer exists.

Taking the lock is atomic: locally by creating the file exclusively (O_EXCL), on `gs://` by
writing the object only if it does not exist (generation precondition 0), and a takeover only
if the object is still the stale one (its generation). Two runs racing for a stale lock: one
wins, the other is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid

from gpt_neo import storage
from gpt_neo.errors import ConfigError, RunLocked

LOCK_NAME = "run.lock"
REFRESH_SECONDS = 60.0
STALE_SECONDS = 10 * 60.0  # ten missed refreshes: its run is gone
# Set by the pod launcher on every worker it starts (gpt_neo.launch.pod).
LAUNCH_RUN_ENV = "GPT_NEO_LAUNCH_RUN"  # the slice the launch run drives (a TPU node's path)
LAUNCH_ATTEMPT_ENV = "GPT_NEO_LAUNCH_ATTEMPT"  # unique per attempt, across launcher restarts
TAKEOVER_ENV = "GPT_NEO_RUN_LOCK_TAKEOVER"  # the token of a holder the launcher found gone


@dataclasses.dataclass(frozen=True)
class Launch:
    """The pod launcher's run a process belongs to. `run` is the slice it drives, as the TPU
    API names a node (`projects/P/locations/ZONE/nodes/NAME`): whoever launches on that slice
    for this `model_path` continues the same run, so rerunning the launcher command after it
    died resumes too (one launcher at a time drives a slice: `launch.pod.sole_launcher`).
    `attempt` is unique per attempt of any launcher invocation."""

    run: str
    attempt: str

    @classmethod
    def from_env(cls) -> Launch | None:
        run, attempt = os.environ.get(LAUNCH_RUN_ENV), os.environ.get(LAUNCH_ATTEMPT_ENV)
        return cls(run, attempt) if run and attempt else None

    @property
    def slice(self) -> tuple[str, str, str]:
        """(project, zone, TPU name) of `run`."""
        parts = self.run.split("/")
        if len(parts) != 6:  # not written by the launcher: name it as it is
            return "unknown", "unknown", self.run
        return parts[1], parts[3], parts[5]

    def describe(self) -> str:
        project, zone, name = self.slice
        return f"the pod launcher's run on TPU {name} ({zone}, project {project})"


def node_path(project: str, zone: str, name: str) -> str:
    """A TPU node as the TPU API names it: the `run` of a `Launch`."""
    return f"projects/{project}/locations/{zone}/nodes/{name}"


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: float  # when it took the lock (epoch seconds)
    refreshed: float
    token: str
    launch: Launch | None = None  # None: started by hand, not by the pod launcher

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        where = f"host {self.host}, pid {self.pid}, since {since}"
        if self.launch is None:
            return where
        return f"{self.launch.describe()}, attempt {self.launch.attempt}: {where}"

    def is_gone(self, now: float) -> bool:
        """Gone as far as this host can tell: not refreshed for `STALE_SECONDS`, or a process
        of this host that has ended."""
        if now - self.refreshed > STALE_SECONDS:
            return True
        if self.host != socket.gethostname():
            return False  # alive as far as anyone here can tell
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's live process
            return False
        return False

    def free_at(self) -> str:
        """When, unless refreshed again, the lock counts as gone everywhere."""
        return time.strftime("%H:%M:%S", time.localtime(self.refreshed + STALE_SECONDS))


def takeover_reason(holder: Holder | None, me: Holder, now: float) -> str | None:
    """Why `me` may take the lock over from `holder`; None when it may not."""
    if holder is None:
        return "its lock file was half-written (a killed run)"
    if holder.token == os.environ.get(TAKEOVER_ENV):
        return "the pod launcher found that run gone before starting this one"
    mine, theirs = me.launch, holder.launch
    if mine and theirs and theirs.run == mine.run and theirs.attempt != mine.attempt:
        return "an earlier attempt of this launch run, which the launcher ended first"
    if now - holder.refreshed > STALE_SECONDS:
        return f"not refreshed for {(now - holder.refreshed) / 60:.0f} minutes"
    if holder.is_gone(now):
        return "its process has ended"
    return None


def writer_lock(model_path: str):
    """The lock for a run that writes `model_path`: taken by process 0 only (the processes of
    one run are one writer)."""
    import jax

    return RunLock(model_path) if jax.process_index() == 0 else contextlib.nullcontext()


def peek(model_path: str) -> Holder | None:
    """Who holds `model_path`'s lock, read without taking it; None when nobody does (or the
    lock is unreadable: a killed run's half-written file)."""
    path = storage.join(model_path, LOCK_NAME)
    holder, _ = _store(path).read()
    return holder


class RunLock:
    """`with RunLock(model_path):` holds the lock for the block (refreshed in a thread)."""

    def __init__(self, model_path: str):
        self.path = storage.join(model_path, LOCK_NAME)
        self.model_path = model_path
        self._store = _store(self.path)
        self._mine: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        now = time.time()
        me = Holder(
            socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex, Launch.from_env()
        )
        try:
            created = self._store.create(me)
        except OSError as err:
            raise ConfigError(
                f"model_path {self.model_path} is not writable ({err.strerror or err}); choose "
                "another"
            ) from None
        if not created:
            holder, version = self._store.read()
            reason = takeover_reason(holder, me, time.time())
            if reason is None:
                assert holder is not None  # a missing or half-written lock is taken over
                raise RunLocked(
                    f"model_path {self.model_path} is in use by another run ({holder.describe()}; "
                    f"lock {self.path}). Wait for it to end or stop it, or choose another "
                    f"model_path; if that run is gone, the lock is free after "
                    f"{holder.free_at()} (ten minutes without a refresh), or delete {self.path} "
                    "to take it now"
                )
            if not self._store.replace(me, version):
                holder, _ = self._store.read()
                raise RunLocked(
                    f"model_path {self.model_path} was just taken by another run "
                    f"({holder.describe() if holder else 'unknown'}; lock {self.path})"
                )
            if holder is not None:
                print(f"run lock: took over {self.path} from {holder.describe()}: {reason}")
        self._mine = me
        self._thread = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS) and (mine := self._mine) is not None:
            self._mine = dataclasses.replace(mine, refreshed=time.time())
            self._store.refresh(self._mine)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._mine is not None:
            self._store.delete_if_mine(self._mine)
            self._mine = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _store(path: str) -> _LocalStore | _GcsStore:
    return _GcsStore(path) if storage.is_remote(path) else _LocalStore(path)


def _parse(data: bytes) -> Holder | None:
    try:
        fields = json.loads(data)
        launch = fields.pop("launch", None)
        return Holder(**fields, launch=Launch(**launch) if launch else None)
    except (ValueError, TypeError, AttributeError):
        return None  # half-written by a killed run: treat as gone


def _encode(holder: Holder) -> bytes:
    return json.dumps(dataclasses.asdict(holder)).encode()


class _LocalStore:
    """The lock as a local file; a takeover renames a fresh file over the stale one and then
    reads it back (of two racing takeovers, the later rename wins and the other sees it)."""

    def __init__(self, path: str):
        self.path = path

    def create(self, holder: Holder) -> bool:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(_encode(holder))
        return True

    def read(self) -> tuple[Holder | None, None]:
        try:
            with open(self.path, "rb") as handle:
                return _parse(handle.read()), None
        except FileNotFoundError:
            return None, None

    def replace(self, holder: Holder, _version) -> bool:
        self._write(holder)
        time.sleep(0.05)  # let a racing takeover's rename land, then see who won
        current, _ = self.read()
        return current is not None and current.token == holder.token

    def refresh(self, holder: Holder) -> None:
        current, _ = self.read()
        if current is not None and current.token == holder.token:
            self._write(holder)

    def _write(self, holder: Holder) -> None:
        tmp = f"{self.path}.{holder.token}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(_encode(holder))
        os.replace(tmp, self.path)

    def delete_if_mine(self, holder: Holder) -> None:
        current, _ = self.read()
        if current is not None and current.token == holder.token:
            os.remove(self.path)


class _GcsStore:
    """The lock as a `gs://` object, every write conditional on the generation it expects."""

    def __init__(self, path: str):
        from google.api_core import exceptions
        from google.cloud import storage as gcs

        bucket, _, name = path[len("gs://") :].partition("/")
        self.blob = gcs.Client().bucket(bucket).blob(name)
        self.conflict = (exceptions.PreconditionFailed, exceptions.NotFound)  # (changed, gone)
        self.generation: int | None = None

    def _upload(self, holder: Holder, generation: int) -> bool:
        try:
            self.blob.upload_from_string(_encode(holder), if_generation_match=generation)
        except self.conflict:
            return False
        self.generation = self.blob.generation
        return True

    def create(self, holder: Holder) -> bool:
        return self._upload(holder, 0)

    def read(self) -> tuple[Holder | None, int | None]:
        for _ in range(5):  # a refresh landing between the two calls: read the new generation
            # a blob that knows a generation reads that one: ask for the newest afresh
            blob = self.blob.bucket.blob(self.blob.name)
            try:
                blob.reload()
                data = blob.download_as_bytes(if_generation_match=blob.generation)
            except self.conflict[1]:  # NotFound
                return None, 0
            except self.conflict[0]:  # PreconditionFailed
                continue
            return _parse(data), blob.generation
        return None, 0

    def replace(self, holder: Holder, version: int | None) -> bool:
        return self._upload(holder, version if version is not None else 0)

    def refresh(self, holder: Holder) -> None:
        if self.generation is not None:
            self._upload(holder, self.generation)

    def delete_if_mine(self, holder: Holder) -> None:
        if self.generation is None:
            return
        with contextlib.suppress(*self.conflict):  # taken over meanwhile: not ours to delete
            self.blob.delete(if_generation_match=self.generation)
