"""Raw text -> tokenized TFRecords in GPT-Neo's format (the engine of data/create_tfrecords.py).

Format: one `tf.train.Example` per record with one feature, `text`, an int64 list of token
ids; files named `{name}_{i}_{n_records}.tfrecords` (GPT-Neo's readers parse the record count
from that suffix). Three modes:

- `documents`: one record per document, the document's tokens followed by the separator;
- `chunks`: the token stream of all documents (each followed by the separator) cut into
  records of exactly `chunk_size + 1` tokens; a document's tail carries into the next record;
- `sft`: supervised fine-tuning examples from JSON Lines (prompt/completion or chat messages,
  see `gpt_neo.data.sft`), one record per example, ending with the separator; each record
  has a second int64 feature, `loss_mask`, as long as `text`: 1 where the token is a target
  the loss counts (completion, assistant turns, the final separator), 0 where it is context.

Work is split into *units*: runs of consecutive input files of about `UNIT_BYTES`, fixed by
the input alone (not by `--processes`), so a re-run with any process count resumes. Each unit
writes hidden `.tmp` files; when a unit finishes, the manifest `{name}.manifest.json` records
it (atomically). When all units are done, the `.tmp` files are renamed, in unit order, to
their final names. A file only ever appears under a final name when it is complete.

`eval_fraction` holds out that share of the documents (or SFT examples), chosen by a hash of each
document's file name and position in it (so the split does not depend on process count or re-runs), and
writes them the same way under `output_dir/eval/`, for the dataset config's `eval_path`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from gpt_neo.data.corpus import CorpusStats, fix_text, read_documents, wikitext_detokenize
from gpt_neo.data.encoders import load_encoder
from gpt_neo.data.sft import ChatTemplate, Segment, read_examples, tokenize_examples
from gpt_neo.errors import ConfigError, DataError
from gpt_neo.storage import exists, read_text, tf, write_text_atomic

T = TypeVar("T")

UNIT_BYTES = 32 * 2**20
ENCODE_BATCH = 256
MANIFEST_VERSION = 1
MODES = ("documents", "chunks", "sft")


@dataclass(frozen=True)
class TFRecordJob:
    """Everything that decides the output; a re-run with other settings is refused."""

    name: str
    output_dir: str
    encoder: str  # load_encoder spec: "gpt2", "byte", or a tokenizer path
    mode: str = "documents"
    separator: tuple[int, ...] = ()
    minimum_size: int = 1
    files_per: int = 100_000
    chunk_size: int = 2048
    ftfy: bool = False
    wikitext_detokenize: bool = False
    eval_fraction: float = 0.0  # share of documents held out, written under output_dir/eval/
    chat_template: ChatTemplate | None = None  # sft mode: renders `messages` records


@dataclass
class WriteStats(CorpusStats):
    empty: int = 0  # documents with no text
    too_short: int = 0  # documents under --minimum_size tokens
    documents_written: int = 0
    records: int = 0
    tokens: int = 0  # tokens written, separators included
    loss_tokens: int = 0  # sft mode: tokens whose loss_mask is 1 (the targets)
    tail_tokens_dropped: int = 0  # chunks mode: the last partial record of each unit
    # of the counts above, what was held out for evaluation (eval_fraction)
    eval_documents: int = 0
    eval_records: int = 0
    eval_tokens: int = 0


def plan_units(files: Sequence[Path]) -> list[list[str]]:
    """Consecutive files grouped to about `UNIT_BYTES` each (a bigger file is its own unit)."""
    unit_bytes = UNIT_BYTES
    units: list[list[str]] = []
    size = 0
    for path in files:
        file_size = path.stat().st_size
        if not units or size + file_size > unit_bytes:
            units.append([])
            size = 0
        units[-1].append(str(path))
        size += file_size
    return units


def serialize(tokens: Sequence[int], loss_mask: Sequence[int] | None = None) -> bytes:
    """One record: `text` (the token ids) and, for sft mode, `loss_mask` (0/1, as long)."""
    t = tf()
    features = {"text": tokens} if loss_mask is None else {"text": tokens, "loss_mask": loss_mask}
    feature = {
        k: t.train.Feature(int64_list=t.train.Int64List(value=v)) for k, v in features.items()
    }
    return t.train.Example(features=t.train.Features(feature=feature)).SerializeToString()


class _RotatingWriter:
    """Writes records into `.tmp` files of at most `files_per` records each."""

    def __init__(self, job: TFRecordJob, unit: int, suffix: str = ""):
        self.job, self.unit, self.suffix = job, unit, suffix  # suffix: ".eval" for held out
        self.files: list[tuple[str, int]] = []
        self._writer = None

    def write(self, record: bytes) -> None:
        if self._writer is None or self.files[-1][1] == self.job.files_per:
            self._writer = self._open()
        self._writer.write(record)
        path, count = self.files[-1]
        self.files[-1] = (path, count + 1)

    def _open(self):
        """The writer of the next file (the previous one closed)."""
        self.close()
        path = (
            f"{self.job.output_dir}/.{self.job.name}{self.suffix}.unit{self.unit:06d}."
            f"{len(self.files):04d}.tmp"
        )
        self.files.append((path, 0))
        return tf().io.TFRecordWriter(path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def discard(self) -> None:
        """Close and delete this unit's `.tmp` files (its work failed; a re-run redoes it)."""
        self.close()
        for path, _ in self.files:
            if tf().io.gfile.exists(path):
                tf().io.gfile.remove(path)


def held_out(fraction: float, path: str, index: int) -> bool:
    """Whether document `index` of the file `path` goes to the eval split: a hash of the file's
    name (not its folder, so a moved corpus splits the same) and the position."""
    if fraction <= 0:
        return False
    key = f"{os.path.basename(path)}:{index}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def _documents(
    job: TFRecordJob, files: Sequence[str], stats: WriteStats, progress
) -> Iterator[tuple[bool, str]]:
    """(held out for evaluation, text) of every non-empty document."""
    for path in files:
        for index, text in enumerate(read_documents(path, stats)):
            if job.wikitext_detokenize:
                text = wikitext_detokenize(text)
            if job.ftfy:
                text = fix_text(text)
            if not text:
                stats.empty += 1
                continue
            yield held_out(job.eval_fraction, path, index), text
        if progress is not None:
            progress.put(("file", os.path.getsize(path)))


def _examples(
    job: TFRecordJob, files: Sequence[str], stats: WriteStats, progress
) -> Iterator[tuple[bool, list[Segment]]]:
    """sft mode: (held out for evaluation, segments) of every example, split like documents."""
    for path in files:
        for index, segments in enumerate(read_examples(path, job.chat_template)):
            stats.documents += 1
            yield held_out(job.eval_fraction, path, index), segments
        if progress is not None:
            progress.put(("file", os.path.getsize(path)))


def _batched(items: Iterator[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_ENCODERS: dict = {}


def process_unit(job: TFRecordJob, unit: int, files: Sequence[str], progress=None) -> tuple:
    """Tokenize one unit into `.tmp` record files. Returns (unit, [(tmp, n)], [(eval tmp, n)],
    WriteStats)."""
    encoder = _ENCODERS.get(job.encoder) or _ENCODERS.setdefault(
        job.encoder, load_encoder(job.encoder)
    )
    stats = WriteStats()
    splits = {False: _Split(job, unit, ""), True: _Split(job, unit, ".eval")}
    write = _write_examples if job.mode == "sft" else _write_documents
    try:
        write(job, encoder, files, splits, stats, progress)
    except BaseException:  # bad input or an interruption: no half-written unit stays behind
        for split in splits.values():
            split.writer.discard()
        raise
    for split in splits.values():
        stats.tail_tokens_dropped += len(split.pending)
        split.writer.close()
    return unit, splits[False].writer.files, splits[True].writer.files, stats


def _write_documents(job, encoder, files, splits, stats: WriteStats, progress) -> None:
    for batch in _batched(_documents(job, files, stats, progress), ENCODE_BATCH):
        written_before = stats.tokens
        texts = [text for _, text in batch]
        for (is_eval, _), ids in zip(batch, encoder.encode_batch(texts), strict=True):
            if len(ids) < job.minimum_size:
                stats.too_short += 1
                continue
            _count(stats, is_eval, *splits[is_eval].add(ids))
        if progress is not None:
            progress.put(("batch", len(texts), stats.tokens - written_before))


def _write_examples(job, encoder, files, splits, stats: WriteStats, progress) -> None:
    """sft mode: one record of tokens and loss mask per example."""
    for batch in _batched(_examples(job, files, stats, progress), ENCODE_BATCH):
        written_before = stats.tokens
        encoded = tokenize_examples(encoder, [s for _, s in batch], job.separator)
        for (is_eval, _), (tokens, loss_mask) in zip(batch, encoded, strict=True):
            if len(tokens) - len(job.separator) < job.minimum_size:
                stats.too_short += 1
                continue
            splits[is_eval].writer.write(serialize(tokens, loss_mask))
            stats.loss_tokens += sum(loss_mask)
            _count(stats, is_eval, 1, len(tokens))
        if progress is not None:
            progress.put(("batch", len(batch), stats.tokens - written_before))


def _count(stats: WriteStats, is_eval: bool, records: int, tokens: int) -> None:
    """One document (or example) written as `records` records of `tokens` tokens in all."""
    stats.documents_written += 1
    stats.records += records
    stats.tokens += tokens
    if is_eval:
        stats.eval_documents += 1
        stats.eval_records += records
        stats.eval_tokens += tokens


class _Split:
    """The records of one split (training or held out) of a unit, as the mode cuts them."""

    def __init__(self, job: TFRecordJob, unit: int, suffix: str):
        self.job = job
        self.writer = _RotatingWriter(job, unit, suffix)
        self.pending: list[int] = []  # chunks mode: tokens not yet written

    def add(self, ids: list[int]) -> tuple[int, int]:
        """Write one document's tokens (and the separator); returns (records, tokens) written."""
        job = self.job
        if job.mode == "documents":
            record = [*ids, *job.separator]
            self.writer.write(serialize(record))
            return 1, len(record)
        self.pending.extend(ids)
        self.pending.extend(job.separator)
        record_len = job.chunk_size + 1
        records = 0
        while len(self.pending) >= record_len:
            self.writer.write(serialize(self.pending[:record_len]))
            del self.pending[:record_len]
            records += 1
        return records, records * record_len


def _process_unit_star(args):
    return process_unit(*args)


# --------------------------------------------------------------------------------------------
# The manifest: which units are done, with which settings


def _fingerprint(job: TFRecordJob, units: list[list[str]]) -> str:
    settings = dataclasses.asdict(job)
    # settings at their defaults hash as before they existed: earlier manifests still resume
    if not job.eval_fraction:
        del settings["eval_fraction"]
    if job.chat_template is None:
        del settings["chat_template"]
    digest = hashlib.sha256(json.dumps([settings, units], default=list).encode())
    return digest.hexdigest()[:16]


def _read_manifest(path: str) -> dict | None:
    return json.loads(read_text(path)) if exists(path) else None


def _check_writable(output_dir: str) -> None:
    t = tf()
    try:
        t.io.gfile.makedirs(output_dir)
        probe = f"{output_dir}/.write-probe"
        with t.io.gfile.GFile(probe, "w") as handle:
            handle.write("ok")
        t.io.gfile.remove(probe)
    except (t.errors.OpError, OSError) as err:
        raise DataError(
            f"--output_dir {output_dir} is not writable ({err.__class__.__name__}); choose a "
            "directory you can write to"
        ) from None


@dataclass
class Result:
    files: list[tuple[str, int]]  # final paths and record counts
    stats: WriteStats
    seconds: float
    already_complete: bool = False
    eval_files: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # eval_fraction


def create_tfrecords(
    job: TFRecordJob, input_files: Sequence[Path], *, processes: int = 1, show_progress: bool = True
) -> Result:
    """Tokenize `input_files` into TFRecords under `job.output_dir`; resumes an interrupted run."""
    if job.mode not in MODES:
        raise ConfigError(f"--mode must be 'documents' or 'chunks' (or --sft), not {job.mode!r}")
    if job.mode == "sft" and not job.separator:
        raise ConfigError("sft records end with the end of text: give a separator (--separator)")
    start = time.perf_counter()
    _check_writable(job.output_dir)
    units = plan_units(input_files)
    manifest_path = f"{job.output_dir}/{job.name}.manifest.json"
    fingerprint = _fingerprint(job, units)
    manifest = _read_manifest(manifest_path) or {
        "version": MANIFEST_VERSION,
        "fingerprint": fingerprint,
        "mode": job.mode,
        "units": {},
        "final": None,
    }
    if manifest["fingerprint"] != fingerprint:
        raise ConfigError(
            f"{manifest_path} belongs to a run with other inputs or settings; use another "
            "--output_dir or --name, or delete that run's files to start over"
        )
    manifest.setdefault("mode", job.mode)  # manifests written before the key existed
    if manifest["final"] is not None:
        stats = WriteStats(**manifest["stats"])
        final, final_eval = manifest["final"], manifest.get("final_eval", [])
        return Result(
            [tuple(f) for f in final],
            stats,
            0.0,
            already_complete=True,
            eval_files=[tuple(f) for f in final_eval],
        )
    if not 0 <= job.eval_fraction < 1:
        raise ConfigError(f"--eval_fraction must be in [0, 1), got {job.eval_fraction}")

    todo = [(job, u, files) for u, files in enumerate(units) if str(u) not in manifest["units"]]
    for unit, files, eval_files, stats in _run_units(job, todo, units, processes, show_progress):
        manifest["units"][str(unit)] = {
            "files": files,
            "eval_files": eval_files,
            "stats": dataclasses.asdict(stats),
        }
        write_text_atomic(manifest_path, json.dumps(manifest))

    units_done = [manifest["units"][u] for u in sorted(manifest["units"], key=int)]
    final = _finalize([e["files"] for e in units_done], f"{job.output_dir}/{job.name}")
    final_eval = _finalize(
        [e.get("eval_files", []) for e in units_done], f"{job.output_dir}/eval/{job.name}"
    )
    total = WriteStats()
    for entry in units_done:
        total.add(WriteStats(**entry["stats"]))
    manifest["final"], manifest["final_eval"] = final, final_eval
    manifest["stats"] = dataclasses.asdict(total)
    write_text_atomic(manifest_path, json.dumps(manifest))
    return Result(final, total, time.perf_counter() - start, eval_files=final_eval)


def eval_glob(job: TFRecordJob) -> str:
    """The files of the held-out split (eval_fraction), for a dataset config's eval_path."""
    return f"{job.output_dir}/eval/{job.name}_*.tfrecords"


def _finalize(units: list[list], prefix: str) -> list[tuple[str, int]]:
    """Rename the `.tmp` files of every unit, in unit order, to `{prefix}_{i}_{n}.tfrecords`."""
    t = tf()
    final, index = [], 0
    for files in units:
        for tmp, count in files:
            if count == 0:
                continue
            path = f"{prefix}_{index}_{count}.tfrecords"
            if t.io.gfile.exists(tmp):  # not renamed yet (an earlier run may have stopped midway)
                t.io.gfile.makedirs(os.path.dirname(path))
                t.io.gfile.rename(tmp, path, overwrite=True)
            final.append((path, count))
            index += 1
    return final


def _run_units(job, todo, units, processes, show_progress):
    from tqdm import tqdm

    total_bytes = sum(os.path.getsize(f) for u in units for f in u)
    done_bytes = total_bytes - sum(os.path.getsize(f) for _, _, files in todo for f in files)
    bar = tqdm(
        total=total_bytes,
        initial=done_bytes,
        unit="B",
        unit_scale=True,
        disable=not show_progress,
        desc=f"tokenizing {job.name}",
    )
    docs = tokens = 0
    start = time.perf_counter()

    def on_progress(message):
        nonlocal docs, tokens
        if message[0] == "file":
            bar.update(message[1])
        else:
            docs, tokens = docs + message[1], tokens + message[2]
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s")

    try:
        if processes <= 1 or len(todo) <= 1:
            yield from _run_in_process(todo, on_progress)
        else:
            yield from _run_in_pool(todo, processes, on_progress)
    finally:
        bar.close()


def _init_worker():
    # one tokenizer thread per process: the processes already use every core
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


class _CallbackQueue:
    def __init__(self, callback):
        self.put = callback


def _run_in_process(todo, on_progress):
    queue = _CallbackQueue(on_progress)
    for job, unit, files in todo:
        yield process_unit(job, unit, files, queue)


def _run_in_pool(todo, processes, on_progress):
    # spawn, not fork: TensorFlow and tokenizers hold threads that do not survive a fork
    context = multiprocessing.get_context("spawn")
    workers = min(processes, len(todo))
    with (
        context.Manager() as manager,
        context.Pool(workers, initializer=_init_worker) as pool,
    ):
        queue = manager.Queue()
        pending = pool.imap_unordered(_process_unit_star, [(*t, queue) for t in todo])
        while True:
            while not queue.empty():
                on_progress(queue.get())
            try:
                result = pending.next(timeout=0.2)
            except multiprocessing.TimeoutError:
                continue
            except StopIteration:
                break
            yield result
        while not queue.empty():
            on_progress(queue.get())
