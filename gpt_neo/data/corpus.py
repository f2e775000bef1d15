"""Raw text in: documents from .txt, .jsonl, .jsonl.zst (lm_dataformat / the Pile), .xz and
.tar.gz files, plus GPT-Neo's optional clean-ups (ftfy, the wikitext detokenizer).

Readers are written here over `zstandard`, `lzma`, `tarfile` and `json` rather than taken from
lm_dataformat: its reader (unmaintained since 2021) opens text strictly and stops at the first
non-UTF-8 byte or malformed line, while a corpus tool must repair or count those and go on.
Archives lm_dataformat writes (`{"text": ..., "meta": ...}` per line, zstd) read as they are.
"""

from __future__ import annotations

import io
import json
import lzma
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from gpt_neo.errors import DataError

SUFFIXES = (
    ".jsonl.zst",
    ".json.zst",
    ".jsonl.xz",
    ".jsonl",
    ".txt.xz",
    ".xz",
    ".tar.gz",
    ".tgz",
    ".txt",
)


@dataclass
class CorpusStats:
    """What reading a corpus ran into; summed over files and processes."""

    documents: int = 0
    utf8_repaired: int = 0  # documents with bytes that were not UTF-8 (replaced by U+FFFD)
    bad_lines: int = 0  # jsonl lines that were not JSON or had no text

    def add(self, other: CorpusStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def list_input_files(input_dir: str | Path) -> list[Path]:
    """Every supported file under `input_dir` (recursively), in a stable sorted order."""
    root = Path(input_dir)
    if not root.is_dir():
        raise DataError(f"--input_dir {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    if not files:
        raise DataError(f"no input files ({', '.join(SUFFIXES)}) under {root}")
    return files


def _decode(data: bytes, stats: CorpusStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.utf8_repaired += 1
        return data.decode("utf-8", errors="replace")


def _jsonl_documents(stream: io.BufferedIOBase, stats: CorpusStats) -> Iterator[str]:
    for line in stream:
        if not line.strip():
            continue
        try:
            item = json.loads(_decode(line, stats))
        except json.JSONDecodeError:
            stats.bad_lines += 1
            continue
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            stats.bad_lines += 1
            continue
        yield text


def _tar_documents(tar: tarfile.TarFile, stats: CorpusStats) -> Iterator[str]:
    for member in tar:
        if member.isfile():
            handle = tar.extractfile(member)
            if handle is not None:
                yield _decode(handle.read(), stats)


def read_documents(path: str | Path, stats: CorpusStats) -> Iterator[str]:
    """Documents of one file. `stats` counts documents, repairs and skipped lines."""
    for text in _read(Path(path), stats):
        stats.documents += 1
        yield text


def _read(path: Path, stats: CorpusStats) -> Iterator[str]:
    name = path.name
    if name.endswith((".jsonl.zst", ".json.zst")):
        import zstandard

        with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            yield from _jsonl_documents(io.BufferedReader(stream), stats)
    elif name.endswith(".jsonl.xz"):
        with lzma.open(path, "rb") as stream:
            yield from _jsonl_documents(stream, stats)
    elif name.endswith(".jsonl"):
        with path.open("rb") as stream:
            yield from _jsonl_documents(stream, stats)
    elif name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path, "r:gz") as tar:
            yield from _tar_documents(tar, stats)
    elif name.endswith(".xz"):  # OpenWebText: a tar.xz of .txt documents; else one xz'd text
        try:
            with tarfile.open(path, "r:xz") as tar:
                yield from _tar_documents(tar, stats)
        except tarfile.ReadError:
            with lzma.open(path, "rb") as stream:
                yield _decode(stream.read(), stats)
    else:  # .txt: one document per file
        yield _decode(path.read_bytes(), stats)


def fix_text(text: str) -> str:
    """ftfy's mojibake repair with NFKC normalisation, as GPT-Neo's `--ftfy`."""
    import ftfy

    return ftfy.fix_text(text, normalization="NFKC")


_WIKITEXT_PUNCTUATION = [
    ("s '", "s'"),
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
]
_WIKITEXT_MISC = [
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
]
_WIKITEXT_BRACKETS = [
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
]


def wikitext_detokenize(text: str) -> str:
    """Undo WikiText's tokenisation (" @-@ " -> "-", " , " -> ", ", spaced brackets, ...)."""
    for old, new in _WIKITEXT_PUNCTUATION:
        text = text.replace(old, new)
    for pattern, replacement in _WIKITEXT_BRACKETS:
        text = pattern.sub(replacement, text)
    for old, new in _WIKITEXT_MISC:
        text = text.replace(old, new)
    return text
