"""Data throughput: create_tfrecords tokens/s (1 vs N processes) and input-pipeline tokens/s for
documents_random at n_ctx 2048, next to the forward+backward tokens/s of configs/demo.json,
all measured in this one run. The pipeline must deliver at least 20x what the model consumes.

    python bench/data_throughput.py [--megabytes 16] [--processes N]

Uses the demo tokenizer (run `python data/build_demo_corpus.py` first; `make demo` does).
"""

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

from gpt_neo.config import load_config
from gpt_neo.data import tfrecords
from gpt_neo.data.corpus import list_input_files
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.data.tfrecords import TFRecordJob, create_tfrecords

TOKENIZER = "datasets/demo/tokenizer/byte-level-bpe.tokenizer.json"


def write_corpus(folder: Path, megabytes: float, files: int) -> None:
    """Standard-library sources split over `files` jsonl.zst archives."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources, size = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if size > megabytes * 2**20:
            break
        sources.append(path)
        size += path.stat().st_size
    folder.mkdir(parents=True)
    for k in range(files):
        with zstandard.ZstdCompressor().stream_writer(
            open(folder / f"part{k}.jsonl.zst", "wb")
        ) as out:
            for path in sources[k::files]:
                text = path.read_bytes().decode("utf-8", errors="replace")
                out.write((json.dumps({"text": text}) + "\n").encode())


def tfrecord_tokens_per_second(corpus: Path, out: Path, processes: int) -> float:
    files = list_input_files(corpus)
    tfrecords.UNIT_BYTES = max(1, sum(f.stat().st_size for f in files) // (4 * processes))
    job = TFRecordJob(name="bench", output_dir=str(out), encoder=TOKENIZER, separator=(0,))
    start = time.perf_counter()
    result = create_tfrecords(job, files, processes=processes, show_progress=False)
    return result.stats.tokens / (time.perf_counter() - start)


def pipeline_tokens_per_second(cfg, seconds: float = 10.0) -> float:
    pipeline = InputPipeline(cfg, process_index=0, process_count=1)
    pipeline.next_batch()  # open files, fill buffers
    start, tokens = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        tokens += pipeline.next_batch().tokens.size
    return tokens / (time.perf_counter() - start)


def model_tokens_per_second(cfg, steps: int = 5) -> float:
    """Forward+backward tokens/s of the training loss (gpt_neo.training.step.gradients), one device."""
    import jax
    import jax.numpy as jnp

    import gpt_neo
    from gpt_neo.training.step import gradients

    cfg = cfg.replace(mesh_shape=None, layout=None)
    params = gpt_neo.init_params(cfg, 0)
    shape = (cfg.train_batch_size, cfg.n_ctx + 1)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.n_vocab, shape))
    grad = jax.jit(lambda p, t: gradients(cfg, p, t, None)[0])
    jax.block_until_ready(grad(params, tokens))
    start = time.perf_counter()
    for _ in range(steps):
        jax.block_until_ready(grad(params, tokens))
    return steps * cfg.train_batch_size * cfg.n_ctx / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=16)
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if not Path(TOKENIZER).exists():
        raise SystemExit("run `python data/build_demo_corpus.py` (or `make demo`) first")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        write_corpus(corpus, args.megabytes, files=8)
        one = tfrecord_tokens_per_second(corpus, Path(tmp) / "one", 1)
        many = tfrecord_tokens_per_second(corpus, Path(tmp) / "many", args.processes)
        print(f"create_tfrecords ({args.megabytes:g} MB of Python source, demo tokenizer):")
        print(f"  1 process:  {one:>12,.0f} tokens/s")
        print(f"  {args.processes} processes: {many:>12,.0f} tokens/s   ({many / one:.2f}x)")
        dataset = {
            "n_vocab": 8192,
            "path": f"{tmp}/one/bench_*.tfrecords",
            "eos_id": 0,
            "padding_id": 1,
            "tokenizer_path": TOKENIZER,
            "mode": "documents",
        }
        Path(tmp, "bench.json").write_text(json.dumps(dataset))
        demo = load_config("configs/demo.json")
        long = demo.replace(
            n_ctx=2048, datasets=[[f"{tmp}/bench.json", 1, "documents_random", 1.0]]
        )
        delivered = pipeline_tokens_per_second(long)
        consumed = model_tokens_per_second(demo)
        print(
            f"input pipeline, documents_random, n_ctx 2048, batch {long.train_batch_size}: {delivered:>12,.0f} tokens/s"
        )
        print(
            f"configs/demo.json forward+backward on 1 CPU device:      {consumed:>12,.0f} tokens/s"
        )
        verdict = "OK" if delivered >= 20 * consumed else "BELOW TARGET"
        print(f"pipeline / model = {delivered / consumed:.1f}x (target >= 20x): {verdict}")


if __name__ == "__main__":
    main()
