"""The built-in demo dataset, from text every machine has offline: the Python standard
library's source files (`gpt-neo data demo`, `python data/build_demo_corpus.py`).

Writes, under datasets/demo/: raw/{train,eval}/stdlib.jsonl.zst (one source file per document,
every 20th file held out for eval), tokenizer/byte-level-bpe.tokenizer.json (a byte-level BPE
trained on the train split), tfrecords/demo_{train,eval}_*.tfrecords (documents mode), and the
dataset config configs/dataset_configs/demo.json. Deterministic for a given Python; re-running
reuses what is already built.
"""

import json
import sysconfig
import time
from pathlib import Path

import zstandard

from gpt_neo.data.corpus import CorpusStats, list_input_files, read_documents
from gpt_neo.data.dataset_config import DatasetConfig, write_dataset_config
from gpt_neo.data.encoders import TRAINED_TOKENIZER_NAME, load_encoder, train_byte_level_bpe
from gpt_neo.data.tfrecords import TFRecordJob, create_tfrecords
from gpt_neo.errors import DataError

ROOT = Path("datasets/demo")
EVAL_EVERY = 20


def stdlib_sources(megabytes: float) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in stdlib.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )
    chosen, size = [], 0
    for path in files:
        if size >= megabytes * 2**20:
            break
        chosen.append(path)
        size += path.stat().st_size
    if not chosen:
        raise DataError(f"no Python sources found under {stdlib}")
    return chosen


def write_archive(path: Path, sources: list[Path], stdlib: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as out:
        for source in sources:
            text = source.read_bytes().decode("utf-8", errors="replace")
            meta = {"path": str(source.relative_to(stdlib))}
            out.write((json.dumps({"text": text, "meta": meta}) + "\n").encode())
    tmp.replace(path)


def build(megabytes: float = 6.0, vocab_size: int = 8192, *, quiet: bool = False) -> Path:
    """Build (or finish building) the demo dataset under the working directory; returns the
    dataset config's path."""
    start = time.perf_counter()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = stdlib_sources(megabytes)
    splits = {
        "train": [p for i, p in enumerate(sources) if i % EVAL_EVERY],
        "eval": sources[::EVAL_EVERY],
    }
    for split, files in splits.items():
        archive = ROOT / "raw" / split / "stdlib.jsonl.zst"
        if not archive.exists():
            write_archive(archive, files, stdlib)
    tokenizer_path = ROOT / "tokenizer" / TRAINED_TOKENIZER_NAME
    if not tokenizer_path.exists():
        stats = CorpusStats()
        texts = read_documents(ROOT / "raw" / "train" / "stdlib.jsonl.zst", stats)
        tokenizer = train_byte_level_bpe(texts, vocab_size)
        tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(tokenizer_path))
    encoder = load_encoder(tokenizer_path)
    eos, padding = encoder.eos_id, encoder.padding_id
    assert eos is not None and padding is not None  # train_byte_level_bpe makes both (0 and 1)
    for split in splits:
        job = TFRecordJob(
            name=f"demo_{split}",
            output_dir=str(ROOT / "tfrecords"),
            encoder=str(tokenizer_path),
            separator=(eos,),
            files_per=2000,
        )
        result = create_tfrecords(
            job, list_input_files(ROOT / "raw" / split), show_progress=not quiet
        )
        print(f"demo_{split}: {result.stats.records} documents, {result.stats.tokens:,} tokens")
    config = DatasetConfig(
        name="demo",
        n_vocab=encoder.vocab_size,
        path=str(ROOT / "tfrecords" / "demo_train_*.tfrecords"),
        eval_path=str(ROOT / "tfrecords" / "demo_eval_*.tfrecords"),
        tokenizer_path=str(tokenizer_path),
        eos_id=eos,
        padding_id=padding,
        mode="documents",
    )
    written = write_dataset_config(config, "configs/dataset_configs/demo.json")
    print(
        f"demo corpus ready in {time.perf_counter() - start:.1f}s: {written} ({encoder.vocab_size} token vocabulary)"
    )
    return written
