"""Training and eval batches from TFRecords: dataset mixtures, sampling modes, exact resume.

tf.data (TensorFlow pinned to the CPU) reads, parses, interleaves and shuffles records; this
module turns records into examples and batches. Its position is a small JSON-able state,
saved in the training checkpoint, from which the next batch is exactly the one an
uninterrupted run would have produced.

How that is possible without saving shuffle buffers. Each dataset's files (this host's share,
`jax.process_index()`-strided) are permuted per epoch by the seed and read in *groups* of up
to `GROUP_FILES` files: a group is one deterministic tf.data stream (round-robin interleave,
then a seeded example shuffle), a pure function of (seed, dataset, group number). A reader's
state is (group number, records consumed in it); restoring rebuilds that group's stream and
skips the consumed records, so a restore costs at most one group's worth of reading. Which
dataset each example of batch b comes from is drawn from a generator seeded by (seed, b), so
the mixture needs no state beyond the batch counter. The random window of `documents_random`
is drawn from a generator seeded by the example's first record's position.

Sampling modes (`datasets` entries `[dataset_id, stitch, sampling_mode, weight]`):
- `documents_random`: join `stitch` documents (more if they are shorter than n_ctx + 1
  tokens together) with end-of-text between them, take a random n_ctx + 1 window;
- `documents_fixed`: the same join, its first n_ctx + 1 tokens;
- `chunks` (and bare ids, GPT-Neo's `sequential_input`): records of exactly n_ctx + 1 tokens.
Examples are [n_ctx + 1] int32: inputs are [:-1], labels [1:].
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from gpt_neo.config import Config
from gpt_neo.data.dataset_config import DatasetConfig, load_dataset_config
from gpt_neo.errors import ConfigError, DataError, first_line, warn
from gpt_neo.storage import tf

GROUP_FILES = 8
SHUFFLE_BUFFER = 2_000
RECORDS_PER_READ = 64
PREFETCH_BATCHES = 4
SAMPLING_MODES = ("documents_random", "documents_fixed", "chunks")
STATE_VERSION = 1


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
    ):
        """`shuffle`: examples, within a group of files; `shuffle_files`: the order of the
        files, anew every epoch (else natural order, `name_2` before `name_10`); `threads`:
        tf.data's threads for reading and parsing (its own pool, so it stays that size)."""
        self.files, self.seed, self.name, self.threads = files, seed, name, threads
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
        return files, _records(record_stream(files, limits, self.threads).as_numpy_iterator())

    def _open_upcoming(self) -> None:
        """Open the next group's stream, and start its reading, when half of what the shuffle
        buffer held at this group's end is drawn: the work of a group or epoch boundary
        (building the tf.data pipeline, the first reads) then falls between boundaries,
        instead of on the step that needs the next group's first batch."""
        group = self.group + 1
        files = self.group_files_of(group)
        limits = self._limits(files)
        batches = _started(record_stream(files, limits, self.threads))
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
                file_index, record_index, tokens = next(self._iterator)
            except StopIteration:
                self._exhausted = True
                self._upcoming_below = len(self._buffer) // 2
                break
            self._seen[file_index] = max(self._seen[file_index], int(record_index) + 1)
            self._buffer.append((file_index, record_index, tokens))
        if self._exhausted and self._upcoming is None and len(self._buffer) <= self._upcoming_below:
            self._open_upcoming()
        if not self._buffer:
            return None
        pick = int(self._draw.integers(len(self._buffer))) if self.shuffle else 0
        self._buffer[pick], self._buffer[-1] = self._buffer[-1], self._buffer[pick]
        return self._buffer.pop()

    def next_record(self) -> tuple[np.ndarray, str, int]:
        """(tokens int32, file, record index in file); advances the position."""
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
            file_index, record_index, tokens = item
            if self._to_skip:
                self._to_skip -= 1
                # read so far: what the interrupted run had read when its position was saved
                self._replaying = self._replaying and self._to_skip > 0
                continue
            self.offset += 1
            return tokens, self._group_paths[file_index], int(record_index)

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


def record_stream(files: list[str], limits: list[int], threads: int):
    """tf.data stream of batches of RECORDS_PER_READ records (see `_parse`) over `files` read
    round-robin, at most `limits[i]` records of file i (-1: all), parsed by `threads` threads.
    Records travel in batches because each crossing into Python costs as much as parsing one."""
    t = tf()
    paths, limits = t.constant(files), t.constant(limits, t.int64)

    def one_file(index):
        records = t.data.TFRecordDataset(paths[index]).take(limits[index])
        return records.enumerate().map(lambda i, r: (index, i, r))

    stream = t.data.Dataset.range(len(files)).interleave(
        one_file, cycle_length=len(files), block_length=1
    )
    stream = stream.batch(RECORDS_PER_READ).map(
        _parse, num_parallel_calls=threads, deterministic=True
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
    tokens = t.RaggedTensor.from_sparse(parsed["text"])
    return file_index, record_index, t.cast(tokens.flat_values, t.int32), tokens.row_splits


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


def _records(batches: Iterator) -> Iterator[tuple[int, int, np.ndarray]]:
    """(file index, record index, tokens) per record of `record_stream`'s batches."""
    for file_index, record_index, values, splits in batches:
        for f, r, tokens in zip(
            file_index, record_index, np.split(values, splits[1:-1]), strict=True
        ):
            yield int(f), int(r), tokens


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


# --------------------------------------------------------------------------------------------
# Examples


class Notices:
    """Things the pipeline says once per run (on the first host only), not once per record."""

    def __init__(self, out: Callable[[str], None] | None):
        self.out, self.said = out, set()

    def once(self, key: str, message: str) -> None:
        if self.out is not None and key not in self.said:
            self.said.add(key)
            self.out(message)


@dataclass
class DatasetSource:
    """One entry of the mixture: its reader, how it makes examples, and its weight."""

    config: DatasetConfig
    reader: RecordReader
    mode: str
    stitch: int
    weight: float
    n_vocab: int
    n_ctx: int
    notices: Notices = field(default_factory=lambda: Notices(None))

    def _checked(self, tokens: np.ndarray, path: str, index: int) -> np.ndarray:
        if tokens.size and (int(tokens.max()) >= self.n_vocab or int(tokens.min()) < 0):
            bad = int(tokens.max()) if int(tokens.max()) >= self.n_vocab else int(tokens.min())
            raise DataError(
                f"dataset '{self.config.name}': {path} record {index} holds token id {bad}, "
                f"outside the model's n_vocab {self.n_vocab}; the data was made with another "
                "tokenizer, or n_vocab is too small"
            )
        return tokens

    def next_example(self) -> np.ndarray:
        length = self.n_ctx + 1
        if self.mode == "chunks":
            tokens, path, index = self.reader.next_record()
            if tokens.size < length:
                raise DataError(
                    f"dataset '{self.config.name}': {path} record {index} has {tokens.size} "
                    f"tokens; sampling mode 'chunks' needs at least n_ctx + 1 = {length}. Re-create "
                    f"it with --mode chunks --chunk_size {self.n_ctx}, or sample it with "
                    "documents_random"
                )
            if tokens.size > length:  # GPT-Neo's meaning: the record's first n_ctx + 1 tokens
                self.notices.once(
                    f"long records {self.config.name}",
                    f"dataset '{self.config.name}': records are longer than n_ctx + 1 = {length} "
                    f"tokens ({path} record {index} has {tokens.size}); training uses the first "
                    f"{length} tokens of each, as GPT-Neo did",
                )
                tokens = tokens[:length]
            return self._checked(tokens, path, index)
        start = (self.reader.group, self.reader.offset)
        pieces, total, eos = [], 0, self.config.eos_id
        while len(pieces) < self.stitch or total < length:
            tokens, path, index = self.reader.next_record()
            tokens = self._checked(tokens, path, index)
            if tokens.size == 0:
                continue
            if tokens[-1] != eos:  # documents-mode records already end with the separator
                tokens = np.append(tokens, np.int32(eos))
            pieces.append(tokens)
            total += tokens.size
        joined = np.concatenate(pieces)
        offset = 0
        if self.mode == "documents_random":
            rng = np.random.default_rng([self.reader.seed, *start, 2])
            offset = int(rng.integers(0, joined.size - length + 1))
        return joined[offset : offset + length]


class Stream:
    """An independent stream of examples: every dataset's files[r::streams], its own seeds and
    its own mixture draws. The global batch is the streams' rows, stream by stream."""

    def __init__(
        self,
        cfg: Config,
        index: int,
        count: int,
        *,
        eval: bool,
        skip_corrupt: bool,
        notices: Notices,
    ):
        self.index, self.seed = index, cfg.seed
        self.sources = [
            _source(cfg, i, entry, index, count, eval, skip_corrupt, notices)
            for i, entry in enumerate(cfg.datasets)
        ]
        weights = np.array([s.weight for s in self.sources], np.float64)
        self.weights = weights / weights.sum()

    def choices(self, batch: int, rows: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, batch, self.index, 3])
        return rng.choice(len(self.sources), size=rows, p=self.weights)

    def rows(self, batch: int, rows: int) -> list[np.ndarray]:
        return [self.sources[k].next_example() for k in self.choices(batch, rows)]


def input_threads(cfg: Config) -> int:
    """`input_threads`, or its default: 1 when the model runs on this host's CPU, else a
    quarter of the host's cores."""
    import jax

    if cfg.input_threads:
        return cfg.input_threads
    return 1 if jax.default_backend() == "cpu" else max(1, (os.cpu_count() or 4) // 4)


def default_sampling_mode(cfg: Config, dataset: DatasetConfig) -> str:
    """How to read a `datasets` entry that names no sampling mode: as its dataset config says
    the records were made (`mode`), else as the config's `input_fn` reads them: GPT-Neo's
    `sequential_input` takes records of n_ctx + 1 tokens, its `generic_text` documents."""
    if dataset.mode == "chunks":
        return "chunks"
    if dataset.mode == "documents":
        return "documents_random"
    return "chunks" if cfg.input_fn == "sequential_input" else "documents_random"


def _source(
    cfg: Config,
    i: int,
    entry,
    stream: int,
    streams: int,
    eval: bool,
    skip_corrupt: bool,
    notices: Notices,
) -> DatasetSource:
    dataset = load_dataset_config(entry.dataset_id)
    if dataset.n_vocab > cfg.n_vocab:
        raise ConfigError(
            f"dataset '{dataset.name}' has n_vocab {dataset.n_vocab} but the model's n_vocab is "
            f"{cfg.n_vocab}; raise the model's n_vocab"
        )
    mode = entry.sampling_mode or default_sampling_mode(cfg, dataset)
    if mode not in SAMPLING_MODES:
        raise ConfigError(
            f"dataset '{dataset.name}': unknown sampling_mode '{mode}'; use one of {SAMPLING_MODES}"
        )
    key = "eval_path" if eval else "path"
    pattern = getattr(dataset, key)
    if not pattern:
        raise DataError(f"dataset '{dataset.name}' has no {key}")
    files = list_files(pattern, what=f"dataset '{dataset.name}' {key}")
    stream_files = files[stream::streams]
    if not stream_files:
        raise DataError(
            f"dataset '{dataset.name}' {key} has {len(files)} files for {streams} input streams "
            "(one per host unless input_streams is set); write more, smaller files "
            "(create_tfrecords --files_per)"
        )
    seed = int(np.random.default_rng([cfg.seed, i, stream]).integers(2**31))
    reader = RecordReader(
        stream_files,
        seed=seed,
        name=dataset.name,
        shuffle=not eval,
        shuffle_files=cfg.shuffle_input_filenames,
        skip_corrupt=skip_corrupt,
        threads=input_threads(cfg),
    )
    return DatasetSource(
        dataset,
        reader,
        mode,
        entry.stitch or 1,
        entry.weight or 1.0,
        cfg.n_vocab,
        cfg.n_ctx,
        notices,
    )


class InputPipeline:
    """Batches [batch, n_ctx + 1] int32 from the config's dataset mixture, resumable.

    The global batch is drawn from `input_streams` independent streams (default: one per
    host); this host produces its streams' rows. With `input_streams` fixed, any number of
    hosts that divides it sees the same global batches. `state()` is the position after the
    last batch returned; `restore(state)` continues from it. `eval=True` reads `eval_path` in
    a fixed order from the start. `out` receives the pipeline's one-time notices (first host).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        batch_size: int | None = None,
        eval: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
        skip_corrupt: bool = False,
        out: Callable[[str], None] | None = print,
    ):
        import jax

        if not cfg.datasets:
            raise ConfigError("the model config lists no 'datasets'")
        index = jax.process_index() if process_index is None else process_index
        hosts = jax.process_count() if process_count is None else process_count
        global_batch = batch_size or (
            (cfg.eval_batch_size or cfg.train_batch_size) if eval else cfg.train_batch_size
        )
        if not global_batch:
            raise ConfigError("set train_batch_size (and eval_batch_size for eval) in the config")
        streams = cfg.input_streams or hosts
        if streams % hosts or global_batch % streams:
            raise ConfigError(
                f"input_streams {streams} must be a multiple of the {hosts} host(s) and divide the "
                f"batch size {global_batch}"
            )
        self.process_count = hosts
        self.rows_per_stream = global_batch // streams
        self.batch_size = global_batch // hosts  # rows this host produces
        per_host = streams // hosts
        notices = Notices(out if index == 0 else None)
        self.streams = [
            Stream(cfg, r, streams, eval=eval, skip_corrupt=skip_corrupt, notices=notices)
            for r in range(index * per_host, (index + 1) * per_host)
        ]
        self.batch = 0

    @property
    def sources(self) -> list[DatasetSource]:
        return [source for stream in self.streams for source in stream.sources]

    def skipped_files(self) -> list[str]:
        """Files this host's readers cut at their damage (`skip_corrupt`), "file (from record k)"."""
        return [f for source in self.sources for f in source.reader.stats.skipped_files]

    def state(self) -> dict:
        """This host's position: the batch counter and every local reader's position."""
        return {
            "version": STATE_VERSION,
            "batch": self.batch,
            "streams": {
                str(s.index): [src.reader.state() for src in s.sources] for s in self.streams
            },
        }

    def global_state(self, local: dict | None = None) -> dict:
        """Every host's position (all streams), the same on every host; what checkpoints hold.
        `local`: this host's position to gather (default: the current one, `state()`)."""
        local = local or self.state()
        if self.process_count == 1:
            return local
        streams = {}
        for host in _allgather_json(local["streams"]):
            streams |= host
        streams = dict(sorted(streams.items(), key=lambda item: int(item[0])))
        return {"version": STATE_VERSION, "batch": local["batch"], "streams": streams}

    def restore(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                "the saved data position was written by another version; start a new run"
            )
        for stream in self.streams:
            readers = state["streams"].get(str(stream.index))
            if readers is None or len(readers) != len(stream.sources):
                raise ConfigError(
                    "the saved data position does not match this config's datasets or input "
                    "streams (set input_streams to the value the run started with)"
                )
            for source, reader_state in zip(stream.sources, readers, strict=True):
                source.reader.restore(reader_state)
        self.batch = int(state["batch"])

    def next_batch(self) -> np.ndarray:
        rows = [row for s in self.streams for row in s.rows(self.batch, self.rows_per_stream)]
        self.batch += 1
        return np.stack(rows)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_batch()


def _allgather_json(value) -> list:
    """`value` (JSON-able) from every process, in process order."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(row[:size].tobytes()) for row, size in zip(rows, sizes, strict=True)]


# --------------------------------------------------------------------------------------------
# main.py --check_dataset


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token distribution given by `counts`."""
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log(p)).sum())


def what_training_uses(mode: str, lengths: list[int], length: int, stitch: int) -> tuple[str, bool]:
    """(one line for --check_dataset: what a training example takes from these records,
    whether training can use them)."""
    if mode != "chunks":
        window = "a random window" if mode == "documents_random" else "the first"
        return (
            f"sampling mode {mode}: training joins {stitch}+ records with end-of-text between "
            f"them and takes {window} of n_ctx + 1 = {length} tokens"
        ), True
    shortest, longest = min(lengths, default=0), max(lengths, default=0)
    if shortest < length:
        return (
            f"records shorter than n_ctx + 1 = {length} tokens (the shortest has {shortest}): "
            "sampling mode chunks cannot use them; re-create the records or sample documents"
        ), False
    if longest > length:
        return (
            f"sampling mode chunks: training uses the first n_ctx + 1 = {length} tokens of each "
            f"record (records hold {shortest}..{longest}), as GPT-Neo did"
        ), True
    return f"sampling mode chunks: training uses each record whole ({length} tokens)", True


def check_datasets(cfg: Config, *, max_records: int = 10_000, samples: int = 2, out=print) -> bool:
    """Print decoded samples and the token-id range of each dataset; False if an id is out of
    range. Reads up to `max_records` records per dataset (0: all of them)."""
    ok = True
    for entry in cfg.datasets:
        dataset = load_dataset_config(entry.dataset_id)
        encoder = dataset.encoder()
        files = list_files(dataset.path, what=f"dataset '{dataset.name}' path")
        low, high, count, lengths = None, None, 0, []
        counts = np.zeros(0, np.int64)
        for tokens in iter_records(files, limit=max_records):
            count += 1
            lengths.append(tokens.size)
            if tokens.size:
                low = int(tokens.min()) if low is None else min(low, int(tokens.min()))
                high = int(tokens.max()) if high is None else max(high, int(tokens.max()))
                seen = np.bincount(tokens[tokens >= 0])
                counts = np.pad(counts, (0, max(0, seen.size - counts.size)))
                counts[: seen.size] += seen
            if count <= samples:
                text = encoder.decode(tokens)
                out(f"--- {dataset.name} record {count - 1} ({tokens.size} tokens) ---")
                out(text[:500] + (" [...] " + text[-200:] if len(text) > 700 else ""))
        scope = "all" if max_records == 0 or count < max_records else f"the first {count}"
        out(
            f"{dataset.name}: {len(files)} files; read {scope} records; record length "
            f"{min(lengths, default=0)}..{max(lengths, default=0)} tokens; token ids {low}..{high}; "
            f"tokenizer '{encoder.name}' has {encoder.vocab_size} ids; model n_vocab {cfg.n_vocab}"
        )
        out(
            f"{dataset.name}: unigram entropy {unigram_entropy(counts):.3f} nats/token (the loss of "
            "a model that ignores context; training should go well below it)"
        )
        mode = entry.sampling_mode or default_sampling_mode(cfg, dataset)
        used, usable = what_training_uses(mode, lengths, cfg.n_ctx + 1, entry.stitch or 1)
        out(f"{'' if usable else 'error: '}{dataset.name}: {used}")
        ok = ok and usable
        if high is not None and high >= cfg.n_vocab:
            out(f"error: {dataset.name}: token id {high} >= n_vocab {cfg.n_vocab}")
            ok = False
        if encoder.vocab_size > cfg.n_vocab:
            out(
                f"error: {dataset.name}: tokenizer size {encoder.vocab_size} > n_vocab {cfg.n_vocab}"
            )
            ok = False
    return ok
