"""Records out of TFRecord files, resumably: a reader's position is a small JSON-able state.

Each dataset's files (this host's share, `jax.process_index()`-strided) are permuted per epoch
by the seed and read in *groups* of up to `GROUP_FILES` files: a group is one deterministic
tf.data stream (round-robin interleave, then a seeded example shuffle), a pure function of
(seed, dataset, group number). A reader's state is (group number, records consumed in it);
restoring rebuilds that group's stream and skips the consumed records, so a restore costs at
most one group's worth of reading and no shuffle buffer is ever saved. Damaged files are found,
named, and (with `--skip_corrupt_records`) cut where the damage starts.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from gpt_neo.errors import DataError, first_line, warn
from gpt_neo.storage import tf

GROUP_FILES = 8
SHUFFLE_BUFFER = 2_000
RECORDS_PER_READ = 64
PREFETCH_BATCHES = 4


def natural_key(path: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def list_files(pattern: str, *, what: str) -> list[str]:
    """Files matching a local or gs:// glob (comma-separated globs allowed), naturally sorted."""
    t = tf()
    files = sorted(
        {f for p in pattern.split(",") if p.strip() for f in t.io.gfile.glob(p.strip())},
        key=natural_key,
    )
    if not files:
        raise DataError(f"{what}: the pattern '{pattern}' matches no files")
    return files


class CorruptRecordError(DataError):
    pass


class Record(NamedTuple):
    """One record: its tokens (int32), where it is (file, index in the file), and for
    fine-tuning records (`gpt-neo data tfrecords --sft`) its loss mask (int32 0/1, one per
    token), else None."""

    tokens: np.ndarray
    path: str
    index: int
    loss_mask: np.ndarray | None = None


SKIP_HINT = "rerun with --skip_corrupt_records to skip damaged records (each skip is reported)"


@dataclass
class ReaderStats:
    skipped_files: list[str] = field(default_factory=list)  # "file (from record k)"


class RecordReader:
    """One dataset's records, in a deterministic shuffled order, with a resumable position."""

    def __init__(
        self,
        files: list[str],
        *,
        seed: int,
        name: str,
        shuffle: bool = True,
        shuffle_files: bool = True,
        skip_corrupt: bool = False,
        threads: int = 1,
        loss_mask: bool = False,
    ):
        """`shuffle`: examples, within a group of files; `shuffle_files`: the order of the
        files, anew every epoch (else natural order, `name_2` before `name_10`); `threads`:
        tf.data's threads for reading and parsing (its own pool, so it stays that size);
        `loss_mask`: the records are fine-tuning records, each with its `loss_mask`."""
        self.files, self.seed, self.name, self.threads = files, seed, name, threads
        self.loss_mask = loss_mask
        self.shuffle, self.shuffle_files = shuffle, shuffle and shuffle_files
        self.skip_corrupt = skip_corrupt
        self.group_files = max(1, min(GROUP_FILES, len(files)))
        self.groups_per_epoch = -(-len(files) // self.group_files)
        self.shuffle_buffer = SHUFFLE_BUFFER
        # 7 hex digits: what checkpoints written before the position became JSON hold
        self.fingerprint = hashlib.sha256("\n".join(files).encode()).hexdigest()[:7]
        self.group, self.offset = 0, 0
        self.stats = ReaderStats()
        # corrupt file -> records readable before its damage; saved with the position, so that
        # a resumed run cuts the file where the interrupted one did, whatever the file is now
        self._truncated: dict[str, int] = {}
        # True from `restore` until the records the interrupted run consumed are replayed:
        # damage found then is damage that run did not see, so the order cannot be the same
        self._replaying = False
        self._groups_without_records = 0  # a whole epoch of them: nothing left to read
        self._iterator = None
        self._upcoming = None  # (group, limits, stream): the next group's, opened ahead

    # --- position -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "group": self.group,
            "offset": self.offset,
            "files": self.fingerprint,
            "damaged": dict(self._truncated),
        }

    def restore(self, state: dict) -> None:
        if state["files"] != self.fingerprint:
            raise DataError(
                f"dataset '{self.name}': its files changed since the checkpoint was written "
                "(the data position cannot be restored); restore the files or start a new run"
            )
        self.group, self.offset = int(state["group"]), int(state["offset"])
        self._truncated = {path: int(good) for path, good in state.get("damaged", {}).items()}
        self._replaying = self.offset > 0
        self._iterator = None

    # --- reading --------------------------------------------------------------------------
    def group_files_of(self, group: int) -> list[str]:
        epoch, index = divmod(group, self.groups_per_epoch)
        order = np.arange(len(self.files))
        if self.shuffle_files:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.files))
        chosen = order[index * self.group_files : (index + 1) * self.group_files]
        return [self.files[i] for i in chosen]

    def _limits(self, files: list[str]) -> list[int]:
        # -1 reads a file whole; a damaged file is cut where its damage starts (skip mode)
        return [self._truncated.get(f, -1) for f in files]

    def _stream(self, group: int):
        """Group `group`'s records; opened ahead by `_open_upcoming` where it can be."""
        files = self.group_files_of(group)
        limits = self._limits(files)
        upcoming, self._upcoming = self._upcoming, None
        if upcoming is not None and upcoming[:2] == (group, limits):
            return files, upcoming[2]
        stream = record_stream(files, limits, self.threads, self.loss_mask)
        return files, _records(stream.as_numpy_iterator())

    def _open_upcoming(self) -> None:
        """Open the next group's stream, and start its reading, when half of what the shuffle
        buffer held at this group's end is drawn: the work of a group or epoch boundary
        (building the tf.data pipeline, the first reads) then falls between boundaries,
        instead of on the step that needs the next group's first batch."""
        group = self.group + 1
        files = self.group_files_of(group)
        limits = self._limits(files)
        batches = _started(record_stream(files, limits, self.threads, self.loss_mask))
        self._upcoming = (group, limits, _records(batches))

    def _open(self):
        files, self._iterator = self._stream(self.group)
        self._group_paths = files
        # The example shuffle is a buffer kept here, drawn from a generator seeded by (seed,
        # group): tf.data's shuffle would also depend on TensorFlow's global seed, which other
        # libraries set. Records already consumed are skipped here too, so that every record's
        # index is seen and truncated files can be told at the group's end.
        self._buffer: list = []
        self._exhausted, self._upcoming_below = False, 0
        self._draw = np.random.default_rng([self.seed, self.group, 1])
        self._to_skip = self.offset
        self._seen = [0] * len(files)

    def _take(self):
        """The next record of the group in shuffled order, or None at the group's end."""
        size = self.shuffle_buffer if self.shuffle else 1
        while not self._exhausted and len(self._buffer) < size:
            try:
                assert self._iterator is not None  # opened with the group
                item = next(self._iterator)
            except StopIteration:
                self._exhausted = True
                self._upcoming_below = len(self._buffer) // 2
                break
            file_index, record_index = item[:2]
            self._seen[file_index] = max(self._seen[file_index], int(record_index) + 1)
            self._buffer.append(item)
        if self._exhausted and self._upcoming is None and len(self._buffer) <= self._upcoming_below:
            self._open_upcoming()
        if not self._buffer:
            return None
        pick = int(self._draw.integers(len(self._buffer))) if self.shuffle else 0
        self._buffer[pick], self._buffer[-1] = self._buffer[-1], self._buffer[pick]
        return self._buffer.pop()

    def next_record(self) -> Record:
        """The next record; advances the position."""
        t = tf()
        while True:
            if self._iterator is None:
                self._open()
            try:
                item = self._take()
            except (t.errors.DataLossError, t.errors.InvalidArgumentError) as err:
                self._handle_corrupt(err)
                continue
            except t.errors.OpError as err:  # gone, no permission, a storage outage
                raise self._unreadable(err) from None
            if item is None:
                self._check_complete()
                self._end_group()
                continue
            file_index, record_index, tokens, loss_mask = item
            if self._to_skip:
                self._to_skip -= 1
                # read so far: what the interrupted run had read when its position was saved
                self._replaying = self._replaying and self._to_skip > 0
                continue
            self.offset += 1
            path = self._group_paths[file_index]
            if loss_mask is not None and loss_mask.size != tokens.size:
                raise DataError(
                    f"dataset '{self.name}': {path} record {record_index} has {tokens.size} tokens "
                    f"but {loss_mask.size} loss_mask values; it was not written by `gpt-neo data "
                    "tfrecords --sft` (re-create it so, or set the dataset config's mode)"
                )
            return Record(tokens, path, int(record_index), loss_mask)

    def _end_group(self) -> None:
        empty = self.offset == 0
        self._groups_without_records = self._groups_without_records + 1 if empty else 0
        if self._groups_without_records >= self.groups_per_epoch:
            what = "damaged or empty" if self._truncated else "empty"
            raise DataError(
                f"dataset '{self.name}': a whole epoch of its {len(self.files)} file(s) held no "
                f"readable records (all {what}); re-create them"
            )
        self.group, self.offset, self._iterator = self.group + 1, 0, None

    def _check_complete(self) -> None:
        """TFRecord readers end a truncated file quietly; GPT-Neo's file names carry their
        record count, which tells a truncated file from a short one."""
        for path, seen in zip(self._group_paths, self._seen, strict=True):
            expected = records_in_name(path)
            if expected is None or seen >= expected or path in self._truncated:
                continue
            if not self.skip_corrupt:
                raise CorruptRecordError(
                    f"dataset '{self.name}': {path} is corrupt or truncated at record {seen} (its "
                    f"name promises {expected} records). Re-create the file, or {SKIP_HINT}"
                )
            self._skip(path, seen)

    def _handle_corrupt(self, err) -> None:
        path, good = locate_corruption(self._group_paths)
        if path is None:
            raise DataError(f"dataset '{self.name}': reading failed: {err.message}") from None
        if not self.skip_corrupt:
            raise CorruptRecordError(
                f"dataset '{self.name}': {path} is corrupt or truncated at record {good}. "
                f"Re-create the file, or {SKIP_HINT}"
            )
        self._skip(path, good)
        self._iterator = None  # rebuild the group without the damaged tail, skip what was read

    def _skip(self, path: str, good: int) -> None:
        self._truncated[path] = good
        self.stats.skipped_files.append(f"{path} (from record {good})")
        warn(
            f"dataset '{self.name}': {path} is corrupt or truncated at record {good}; skipping "
            f"the rest of it (--skip_corrupt_records; {len(self.stats.skipped_files)} file(s) "
            "skipped by this reader so far)"
        )
        if self._replaying:
            warn(
                f"dataset '{self.name}': the run this one resumes read {path} intact, so the "
                "records it trained on since its checkpoint cannot all be replayed: the data order "
                "from here differs from an uninterrupted run's. Restore the file to keep it"
            )

    def _unreadable(self, err) -> DataError:
        """A group file that cannot be opened or read at all, named. Never skipped: records
        already trained on may come from it, and a restarted run could not replay them."""
        t = tf()
        for path in self._group_paths:
            try:
                with t.io.gfile.GFile(path, "rb") as f:
                    f.read(1)
            except t.errors.OpError as file_err:
                return DataError(
                    f"dataset '{self.name}': cannot read {path} ({first_line(file_err)}); it "
                    "was there when the run started. Restore it (or, to drop it, remove it from "
                    "the dataset and start a new run)"
                )
        return DataError(f"dataset '{self.name}': reading failed: {first_line(err)}")


def record_stream(files: list[str], limits: list[int], threads: int, loss_mask: bool = False):
    """tf.data stream of batches of RECORDS_PER_READ records (see `_parse`) over `files` read
    round-robin, at most `limits[i]` records of file i (-1: all), parsed by `threads` threads
    (with each record's `loss_mask` too when asked). Records travel in batches because each
    crossing into Python costs as much as parsing one."""
    t = tf()
    paths, counts = t.constant(files), t.constant(limits, t.int64)

    def one_file(index):
        records = t.data.TFRecordDataset(paths[index]).take(counts[index])
        return records.enumerate().map(lambda i, r: (index, i, r))

    stream = t.data.Dataset.range(len(files)).interleave(
        one_file, cycle_length=len(files), block_length=1
    )
    stream = stream.batch(RECORDS_PER_READ).map(
        _parse_with_loss_mask if loss_mask else _parse,
        num_parallel_calls=threads,
        deterministic=True,
    )
    # A fixed, private thread pool and no autotuning: on a host whose CPU also runs the model,
    # tf.data's default (a pool as large as the machine, an autotuner waking up) takes cycles
    # from the step.
    options = t.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    return stream.prefetch(PREFETCH_BATCHES).with_options(options)


def records_in_name(path: str) -> int | None:
    """The record count in a `{name}_{i}_{n}.tfrecords` file name, as GPT-Neo wrote them."""
    match = re.search(r"_(\d+)\.tfrecords$", path)
    return int(match.group(1)) if match else None


def _parse(file_index, record_index, records):
    """A batch of serialized records -> (file indices, record indices, tokens as the flat
    int32 values and the row splits of a ragged [records, None] tensor)."""
    t = tf()
    parsed = t.io.parse_example(records, {"text": t.io.VarLenFeature(t.int64)})
    values, splits = _ragged(parsed["text"])
    return file_index, record_index, values, splits


def _parse_with_loss_mask(file_index, record_index, records):
    """`_parse`, and the records' loss masks, flat with their own row splits."""
    t = tf()
    features = {name: t.io.VarLenFeature(t.int64) for name in ("text", "loss_mask")}
    parsed = t.io.parse_example(records, features)
    return (file_index, record_index, *_ragged(parsed["text"]), *_ragged(parsed["loss_mask"]))


def _ragged(sparse):
    """A VarLenFeature's SparseTensor -> (flat int32 values, row splits)."""
    t = tf()
    ragged = t.RaggedTensor.from_sparse(typing.cast(typing.Any, sparse))
    return t.cast(ragged.flat_values, t.int32), ragged.row_splits


def _started(stream) -> Iterator:
    """`stream`'s batches with the first one read now (tf.data starts prefetching at the first
    read). A reading error is held and raised where the batch is consumed, as if read then."""
    batches = stream.as_numpy_iterator()
    try:
        first = next(batches)
    except StopIteration:
        return iter(())
    except Exception as err:  # re-raised by the consumer's read
        return _raising(err)
    return itertools.chain([first], batches)


def _raising(err: Exception) -> Iterator:
    raise err
    yield  # a generator: raises at its first next()


def _records(batches: Iterator) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """(file index, record index, tokens, loss mask or None) per record of `record_stream`'s
    batches."""
    for file_index, record_index, values, splits, *mask in batches:
        masks = np.split(mask[0], mask[1][1:-1]) if mask else [None] * len(file_index)
        for f, r, tokens, loss_mask in zip(
            file_index, record_index, np.split(values, splits[1:-1]), masks, strict=True
        ):
            yield int(f), int(r), tokens, loss_mask


def iter_records(files: list[str], limit: int = 0) -> Iterator[np.ndarray]:
    """Token arrays of `files` in order, at most `limit` (0: all); corruption is a
    `CorruptRecordError` naming the file and record."""
    t = tf()
    count = 0
    for path in files:
        index = 0
        try:
            for record in t.data.TFRecordDataset(path).as_numpy_iterator():
                parsed = t.io.parse_single_example(record, {"text": t.io.VarLenFeature(t.int64)})
                yield parsed["text"].values.numpy().astype(np.int32)
                count, index = count + 1, index + 1
                if count == limit:
                    return
        except (t.errors.DataLossError, t.errors.InvalidArgumentError):
            raise CorruptRecordError(f"{path} is corrupt or truncated at record {index}") from None
        expected = records_in_name(path)
        if expected is not None and index < expected:
            raise CorruptRecordError(
                f"{path} is corrupt or truncated at record {index} (its name promises {expected})"
            )


def locate_corruption(files: list[str]) -> tuple[str | None, int]:
    """The first file that fails to read or parse, and its number of good records."""
    t = tf()
    for path in files:
        good = 0
        try:
            for record in t.data.TFRecordDataset(path).as_numpy_iterator():
                t.io.parse_single_example(record, {"text": t.io.VarLenFeature(t.int64)})
                good += 1
        except (t.errors.DataLossError, t.errors.InvalidArgumentError):
            return path, good
    return None, 0
