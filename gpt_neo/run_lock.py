"""One writer per `model_path`: `{model_path}/run.lock` names the run that trains there.

Two runs writing the same checkpoints would each prune and overwrite the other's steps. A
training run takes the lock before it touches anything (process 0 only: the processes of one
run are one writer) and refreshes it while it runs; a second run is refused with a line naming
the holder. A lock whose holder is gone is taken over: on the same host, its process no longer
exists; from anywhere, it has not been refreshed for `STALE_SECONDS`.

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


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: float  # when it took the lock (epoch seconds)
    refreshed: float
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"host {self.host}, pid {self.pid}, since {since}"

    def is_gone(self, now: float) -> bool:
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


def writer_lock(model_path: str):
    """The lock for a run that writes `model_path`: taken by process 0 only (the processes of
    one run are one writer)."""
    import jax

    return RunLock(model_path) if jax.process_index() == 0 else contextlib.nullcontext()


class RunLock:
    """`with RunLock(model_path):` holds the lock for the block (refreshed in a thread)."""

    def __init__(self, model_path: str):
        self.path = storage.join(model_path, LOCK_NAME)
        self.model_path = model_path
        self._store = (
            _GcsStore(self.path) if storage.is_remote(self.path) else _LocalStore(self.path)
        )
        self._mine: Holder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        now = time.time()
        me = Holder(socket.gethostname(), os.getpid(), now, now, uuid.uuid4().hex)
        try:
            created = self._store.create(me)
        except OSError as err:
            raise ConfigError(
                f"model_path {self.model_path} is not writable ({err.strerror or err}); choose "
                "another"
            ) from None
        if not created:
            holder, version = self._store.read()
            if holder is not None and not holder.is_gone(time.time()):
                raise RunLocked(
                    f"model_path {self.model_path} is in use by another run ({holder.describe()}; "
                    f"lock {self.path}). Wait for it to end or stop it, or choose another "
                    f"model_path; if that run is gone, delete {self.path}"
                )
            if not self._store.replace(me, version):
                holder, _ = self._store.read()
                raise RunLocked(
                    f"model_path {self.model_path} was just taken by another run "
                    f"({holder.describe() if holder else 'unknown'}; lock {self.path})"
                )
        self._mine = me
        self._thread = threading.Thread(target=self._refresh, name="run-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            self._mine = dataclasses.replace(self._mine, refreshed=time.time())
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


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
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
        self.conflict = (exceptions.PreconditionFailed, exceptions.NotFound)
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
        try:
            self.blob.reload()
            data = self.blob.download_as_bytes(if_generation_match=self.blob.generation)
        except self.conflict:
            return None, 0
        return _parse(data), self.blob.generation

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
