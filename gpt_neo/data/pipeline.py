"""Training and eval batches from TFRecords: dataset mixtures, sampling modes, exact resume.

tf.data (TensorFlow pinned to the CPU) reads, parses, interleaves and shuffles records; this
module turns records into examples and batches. Its position is a small JSON-able state,
saved in the training checkpoint, from which the next batch is exactly the one an
uninterrupted run would have produced.

How that is possible without saving shuffle buffers: the readers of `records` resume from a
small state (a group of files and the records consumed in it). Which dataset each example of
batch b comes from is drawn from a generator seeded by (seed, b), so
the mixture needs no state beyond the batch counter. The random window of `documents_random`
is drawn from a generator seeded by the example's first record's position.

Sampling modes (`datasets` entries `[dataset_id, stitch, sampling_mode, weight]`):
- `documents_random`: join `stitch` documents (more if they are shorter than n_ctx + 1
  tokens together) with end-of-text between them, take a random n_ctx + 1 window;
- `documents_fixed`: the same join, its first n_ctx + 1 tokens;
- `chunks` (and bare ids, GPT-Neo's `sequential_input`): records of exactly n_ctx + 1 tokens;
- `packed` (not GPT-Neo's): whole documents side by side, each its own segment, no attention
  across them (`gpt_neo.data.packing`); the default for fine-tuning records.
Examples are [n_ctx + 1] int32: inputs are [:-1], labels [1:]. A batch is a `Batch`: the
tokens, and where any source of the mixture is packed or fine-tuning records, the segment ids
and loss masks of every row (an unpacked row is one segment, every target counting).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from gpt_neo.config import Config
from gpt_neo.data.batch import Batch, stack_rows
from gpt_neo.data.dataset_config import DatasetConfig, load_dataset_config
from gpt_neo.data.packing import Packer
from gpt_neo.data.records import RecordReader, list_files
from gpt_neo.errors import ConfigError, DataError

SAMPLING_MODES = ("documents_random", "documents_fixed", "chunks", "packed")
STATE_VERSION = 1


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
    packer: Packer | None = None

    def __post_init__(self):
        if self.mode == "packed":
            self.packer = Packer(
                self._next_document,
                self.reader.state,
                self.reader.restore,
                length=self.n_ctx + 1,
                pad_id=self.config.eos_id,
            )

    def state(self) -> dict:
        """This source's position: its reader's, or for a packed source the packer's."""
        if self.packer is None:
            return self.reader.state()
        return {"packed": self.packer.state()}

    def restore(self, state: dict) -> None:
        if (self.packer is None) != ("packed" not in state):
            raise ConfigError(
                f"dataset '{self.config.name}': the saved data position is from another "
                "sampling mode (packed or not); set the mode the run started with"
            )
        if self.packer is None:
            self.reader.restore(state)
        else:
            self.packer.restore(state["packed"])

    def _next_document(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The next non-empty record as a document: its tokens ending with end-of-text, and
        its loss mask (fine-tuning records) or None."""
        while True:
            record = self.reader.next_record()
            tokens = self._checked(record.tokens, record.path, record.index)
            if tokens.size:
                break
        loss_mask = record.loss_mask
        if tokens[-1] != self.config.eos_id:  # documents-mode records already end with it
            tokens = np.append(tokens, np.int32(self.config.eos_id))
            if loss_mask is not None:
                loss_mask = np.append(loss_mask, loss_mask[-1:])
        return tokens, loss_mask

    def _checked(self, tokens: np.ndarray, path: str, index: int) -> np.ndarray:
        if tokens.size and (int(tokens.max()) >= self.n_vocab or int(tokens.min()) < 0):
            bad = int(tokens.max()) if int(tokens.max()) >= self.n_vocab else int(tokens.min())
            raise DataError(
                f"dataset '{self.config.name}': {path} record {index} holds token id {bad}, "
                f"outside the model's n_vocab {self.n_vocab}; the data was made with another "
                "tokenizer, or n_vocab is too small"
            )
        return tokens

    def next_example(self) -> Batch:
        """One row [n_ctx + 1] as this source's sampling mode makes it."""
        if self.packer is not None:
            window = self.packer.next_window()
            assert window is not None  # a training reader never ends: epochs follow
            return window
        length = self.n_ctx + 1
        if self.mode == "chunks":
            tokens, path, index, loss_mask = self.reader.next_record()
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
            loss_mask = None if loss_mask is None else loss_mask[:length]
            return Batch(self._checked(tokens, path, index), None, loss_mask)
        start = (self.reader.group, self.reader.offset)
        pieces, masks, total = [], [], 0
        while len(pieces) < self.stitch or total < length:
            tokens, loss_mask = self._next_document()
            pieces.append(tokens)
            masks.append(loss_mask)
            total += tokens.size
        joined = np.concatenate(pieces)
        offset = 0
        if self.mode == "documents_random":
            rng = np.random.default_rng([self.reader.seed, *start, 2])
            offset = int(rng.integers(0, joined.size - length + 1))
        window = slice(offset, offset + length)
        joined_mask = None if masks[0] is None else np.concatenate(masks)[window]
        return Batch(joined[window], None, joined_mask)


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

    def rows(self, batch: int, rows: int) -> list[Batch]:
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
    if dataset.mode == "sft":
        return "packed"
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
    if mode == "packed":
        check_packable(dataset)
    key = "eval_path" if eval else "path"
    pattern = getattr(dataset, key)
    if not pattern:
        raise DataError(
            f"dataset '{dataset.name}' has no {key}"
            + ("" if dataset.path else ": it names only a tokenizer; list a dataset of TFRecords")
        )
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
        loss_mask=dataset.mode == "sft",
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


def check_packable(dataset: DatasetConfig) -> None:
    """Packing needs documents and the id that ends each one."""
    if "eos_id" not in dataset.given:
        raise ConfigError(
            f"dataset '{dataset.name}': sampling mode 'packed' needs 'eos_id' in its dataset "
            "config (the id that ends each document); add it"
        )
    if dataset.mode == "chunks":
        raise ConfigError(
            f"dataset '{dataset.name}': its records are fixed-length chunks of a token stream, "
            "not documents, so they cannot be packed; re-create them with --mode documents, or "
            "sample them with 'chunks'"
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
            "streams": {str(s.index): [src.state() for src in s.sources] for s in self.streams},
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
            for source, source_state in zip(stream.sources, readers, strict=True):
                source.restore(source_state)
        self.batch = int(state["batch"])

    def next_batch(self) -> Batch:
        rows = [row for s in self.streams for row in s.rows(self.batch, self.rows_per_stream)]
        self.batch += 1
        return stack_rows(rows)

    def __iter__(self) -> Iterator[Batch]:
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
