"""`main.py --check_dataset`: what each dataset of a config holds (decoded samples, record
lengths, token-id range, unigram entropy) and whether training can use it."""

from __future__ import annotations

import numpy as np

from gpt_neo.config import Config
from gpt_neo.data.dataset_config import load_dataset_config
from gpt_neo.data.packing import packing_figures
from gpt_neo.data.pipeline import default_sampling_mode
from gpt_neo.data.records import iter_records, list_files
from gpt_neo.errors import DataError


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats of the token distribution given by `counts`."""
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log(p)).sum())


def what_training_uses(
    mode: str, lengths: list[int], length: int, stitch: int, documents: list[int] | None = None
) -> tuple[str, bool]:
    """(one line for --check_dataset: what a training example takes from these records (of
    `lengths` tokens; `documents`: the non-empty ones' lengths with their end-of-text),
    whether training can use them)."""
    if mode == "packed":
        padding, per_window = packing_figures(documents or [], length)
        return (
            f"sampling mode packed: windows of n_ctx + 1 = {length} tokens hold {per_window:.1f} "
            f"documents on average, {100 * padding:.1f}% padding (no attention across documents)"
        ), True
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
        if not dataset.path:
            raise DataError(
                f"dataset '{dataset.name}' names only a tokenizer (no 'path'): nothing to check"
            )
        files = list_files(dataset.path, what=f"dataset '{dataset.name}' path")
        low, high, count, lengths, documents = None, None, 0, [], []
        counts = np.zeros(0, np.int64)
        for tokens in iter_records(files, limit=max_records):
            count += 1
            lengths.append(tokens.size)
            if tokens.size:
                # as a packed document: training ends each one with end-of-text
                documents.append(tokens.size + int(tokens[-1] != dataset.eos_id))
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
        used, usable = what_training_uses(
            mode, lengths, cfg.n_ctx + 1, entry.stitch or 1, documents
        )
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
