"""Checksums of a checkpoint's files, written once orbax has committed the checkpoint and
checked before it is restored: orbax checks no bytes it reads back, so a flipped bit in an
array's data would otherwise restore silently.

`{step}/checksums.json` lists every file under the step with its size and CRC-32. A step
without one was written before this existed, or its run was killed between orbax's commit
and the checksums: it is restored unverified (orbax's own reading still fails loudly on
damaged metadata, and the caller treats that as damage too).

By hand here rather than a library: orbax has no content checksums, and CRC-32 over the
files (zlib, standard library) is what a storage system would use; it reads local files at
disk speed and `gs://` ones through the same gfile layer as everything else.
"""

from __future__ import annotations

import json
import zlib

from gpt_neo import storage

MANIFEST = "checksums.json"
CHUNK = 16 * 2**20


def _files(step_dir: str) -> list[str]:
    """Every file under `step_dir` (relative paths, sorted), the manifest excepted."""
    gfile = storage.tf().io.gfile
    found = []
    for root, _, names in gfile.walk(step_dir):
        relative = root[len(step_dir) :].strip("/")
        found += [f"{relative}/{n}".lstrip("/") for n in names]
    return sorted(name for name in found if name != MANIFEST)


def _checksum(path: str) -> tuple[int, int]:
    """(size in bytes, CRC-32) of one file."""
    size, crc = 0, 0
    with storage.tf().io.gfile.GFile(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def write(step_dir: str) -> None:
    """Record the size and checksum of every file of a committed checkpoint."""
    files = {}
    for name in _files(step_dir):
        size, crc = _checksum(storage.join(step_dir, name))
        files[name] = {"bytes": size, "crc32": crc}
    storage.write_text_atomic(storage.join(step_dir, MANIFEST), json.dumps({"files": files}))


def recorded(step_dir: str) -> bool:
    """Whether the checkpoint's checksums were recorded (see `damage`)."""
    return storage.exists(storage.join(step_dir, MANIFEST))


def damage(step_dir: str) -> str | None:
    """What is wrong with a checkpoint's files against its manifest (None: nothing, or no
    manifest to check against)."""
    if not recorded(step_dir):
        return None
    path = storage.join(step_dir, MANIFEST)
    try:
        files = json.loads(storage.read_text(path))["files"]
    except (ValueError, KeyError, TypeError):
        return f"its {MANIFEST} is unreadable"
    present = set(_files(step_dir))
    for name, expected in files.items():
        if name not in present:
            return f"{name} is missing"
        size, crc = _checksum(storage.join(step_dir, name))
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written"
        if crc != expected["crc32"]:
            return f"{name} does not match its checksum (its bytes changed after writing)"
    return None
