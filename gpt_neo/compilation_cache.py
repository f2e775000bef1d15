"""JAX's persistent compilation cache, so that a restarted run (a preempted pod, a resumed job)
loads its compiled programs instead of compiling them again.

The cache lives in `model_path/compilation_cache` unless `--compilation_cache DIR` says
otherwise (`off` disables it): on a pod that is `gs://`, so it survives the VMs. Without the
flag, the environment variable `GPT_NEO_COMPILATION_CACHE` names one cache for every run on a
machine (many small experiments of one model compile the same programs). JAX keys each
entry by the program, the devices and the compiler version, so a changed config or mesh simply
misses. Only programs that took at least a second to compile are stored (JAX's default), which
keeps the many tiny helper programs out of the bucket.
"""

from __future__ import annotations

import os

import jax
from jax import monitoring

ENV = "GPT_NEO_COMPILATION_CACHE"  # one cache for every run of this machine, when set
_EVENTS = {"hits": 0, "misses": 0, "saved_seconds": 0.0}
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"
_directory: str | None = None
_listening = False


def enable(model_path: str | None, directory: str | None) -> str | None:
    """Point JAX's cache at `directory` (default: $GPT_NEO_COMPILATION_CACHE, else
    `model_path/compilation_cache`; "off": none). Call before the first compilation. Returns
    the directory used."""
    global _directory, _listening
    directory = directory or os.environ.get(ENV) or None
    if directory == "off":
        return None
    if directory is None:
        if not model_path:
            return None
        directory = f"{model_path.rstrip('/')}/compilation_cache"
    _directory = directory
    jax.config.update("jax_compilation_cache_dir", _directory)
    if not _listening:  # JAX keeps listeners for the process's life: register them once
        monitoring.register_event_listener(_count)
        monitoring.register_event_duration_secs_listener(_time)
        _listening = True
    return _directory


def _count(event: str, **_) -> None:
    if event == _HIT:
        _EVENTS["hits"] += 1
    elif event == _MISS:
        _EVENTS["misses"] += 1


def _time(event: str, duration_secs: float, **_) -> None:
    if event == _SAVED:
        _EVENTS["saved_seconds"] += max(duration_secs, 0.0)


def report() -> str | None:
    """One line for the log: hits, misses and the compile time the hits saved."""
    if _directory is None:
        return None
    e = _EVENTS
    return (
        f"compilation cache {_directory}: {e['hits']} hit(s), {e['misses']} miss(es), "
        f"{e['saved_seconds']:.1f}s of compilation saved"
    )
