"""Evaluation: scoring continuations, rolling log-likelihood, and GPT-Neo-style tasks.

Everything scores through `Scorer`, which batches token rows to a fixed shape (so one compiled
forward serves every request) and reads log-probabilities off the logits. The tasks and the
lm-eval adapter (`gpt_neo.interop.lm_eval`) are thin layers over it.

Tasks (files on local disk or gs://; nothing is downloaded):
- `lambada`: jsonl of {"text": ...}. The context is the passage up to its last space and the
  target the last *word* (" word", however many tokens). Accuracy = greedy decoding reproduces
  every target token; perplexity = exp(mean negative log-likelihood of the target per passage).
  `last_token=True` scores only the final token instead, as GPT-Neo's `tasks.py` did.
- `wikitext`: a plain text file; word-level perplexity = exp(-log-likelihood / words), with
  byte perplexity and bits per byte, from a rolling log-likelihood over n_ctx windows.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from gpt_neo import storage
from gpt_neo.config import Config, require_causal
from gpt_neo.errors import ConfigError, DataError
from gpt_neo.inference.apply import apply
from gpt_neo.storage import write_text_atomic

DEFAULT_BATCH = 8


@dataclass
class Scorer:
    """Log-likelihoods of continuations under (cfg, params), batched into [batch, n_ctx] rows."""

    cfg: Config
    params: dict
    batch_size: int = DEFAULT_BATCH

    def __post_init__(self):
        require_causal(self.cfg, "scoring continuations (lambada, wikitext, lm-eval)")

    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives exactly the
        continuation) per (context ids, continuation ids). Contexts longer than fit are cut from
        the left; an empty context is refused (there is no token to predict the first from)."""
        rows = []
        for context, continuation in requests:
            context, continuation = list(context), list(continuation)
            if not context or not continuation:
                raise ConfigError("each request needs a non-empty context and continuation")
            if len(continuation) > self.cfg.n_ctx:
                raise ConfigError(
                    f"a continuation of {len(continuation)} tokens exceeds n_ctx {self.cfg.n_ctx}"
                )
            whole = (context + continuation)[-(self.cfg.n_ctx + 1) :]
            rows.append((whole, len(continuation)))
        return self._score(rows)

    def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """rows of (ids, n), at most n_ctx + 1 ids: score the last n ids given those before."""
        results = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            # Right-padded to one shape, so that one compiled forward serves every batch.
            tokens = np.zeros((self.batch_size, self.cfg.n_ctx), np.int32)
            targets = np.zeros_like(tokens)
            for i, (ids, _) in enumerate(chunk):
                tokens[i, : len(ids) - 1] = ids[:-1]
                targets[i, : len(ids) - 1] = ids[1:]
            logp, greedy = map(np.asarray, _token_scores(self.cfg)(self.params, tokens, targets))
            for i, (ids, n) in enumerate(chunk):
                scored = slice(len(ids) - 1 - n, len(ids) - 1)
                results.append((float(logp[i, scored].sum()), bool(greedy[i, scored].all())))
        return results

    def loglikelihood_rolling(self, tokens: Sequence[int], prefix_token: int) -> float:
        """log p(tokens), every token predicted once: windows of n_ctx predictions, each
        conditioned on as much preceding text as fits (the first on `prefix_token`)."""
        tokens = list(tokens)
        stream = [prefix_token, *tokens]
        requests, n_ctx = [], self.cfg.n_ctx
        for end in range(1, len(stream), n_ctx):
            stop = min(end + n_ctx, len(stream))
            context = stream[max(0, stop - n_ctx - 1) : end]
            requests.append((context, stream[end:stop]))
        return sum(ll for ll, _ in self.loglikelihood(requests))


@functools.lru_cache(maxsize=16)
def _token_scores(cfg: Config):
    """Jitted (params, tokens, targets) -> log p(target) and whether target is the argmax, at
    every position: [batch, n_ctx] each."""

    def scores(params, tokens, targets):
        logits = apply(cfg, params, tokens)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return target_logp, jnp.argmax(logits, axis=-1) == targets

    return jax.jit(scores)


# --------------------------------------------------------------------------------------------
# Tasks


def _read_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a local or `gs://` text file."""
    if not storage.exists(str(path)):
        raise DataError(f"{what} file not found: {path}")
    return storage.read_text(str(path)).splitlines()


def lambada(scorer: Scorer, encoder, path: str | Path, *, last_token: bool = False) -> dict:
    """LAMBADA-style last-word prediction over a local jsonl of {"text": ...}."""
    requests = []
    for number, line in enumerate(_read_lines(path, "LAMBADA"), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"].strip()
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise DataError(
                f"{path}:{number}: expected a JSON object with a 'text' string"
            ) from None
        if last_token:
            ids = encoder.encode(text)
            requests.append((ids[:-1], ids[-1:]))
        else:
            context, _, word = text.rpartition(" ")
            if not context:
                raise DataError(f"{path}:{number}: a passage needs a context before its last word")
            requests.append((encoder.encode(context), encoder.encode(" " + word)))
    if not requests:
        raise DataError(f"{path}: no passages")
    scores = scorer.loglikelihood(requests)
    mean_nll = -float(np.mean([ll for ll, _ in scores]))
    return {
        "accuracy": float(np.mean([greedy for _, greedy in scores])),
        "perplexity": math.exp(mean_nll),
        "examples": len(scores),
        "scored": "last token" if last_token else "last word",
    }


def wikitext(scorer: Scorer, encoder, path: str | Path, *, prefix_token: int) -> dict:
    """Word-level perplexity of a local text file (wikitext style), plus byte-level figures."""
    text = "\n".join(_read_lines(path, "wikitext"))
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    tokens = encoder.encode(text)
    loglik = scorer.loglikelihood_rolling(tokens, prefix_token)
    words, n_bytes = len(text.split()), len(text.encode("utf-8"))
    return {
        "word_perplexity": math.exp(-loglik / words),
        "byte_perplexity": math.exp(-loglik / n_bytes),
        "bits_per_byte": -loglik / n_bytes / math.log(2),
        "token_perplexity": math.exp(-loglik / len(tokens)),
        "words": words,
        "tokens": len(tokens),
    }


def write_results(results: dict, model_path: str, step: int) -> str:
    """`model_path/eval_<step>.json`; returns its path."""
    path = f"{model_path.rstrip('/')}/eval_{step}.json"
    write_text_atomic(path, json.dumps({"step": step, **results}, indent=2) + "\n")
    return path


def print_table(results: dict, step: int) -> None:
    table = Table(title=f"evaluation at step {step}")
    for column in ("task", "metric", "value"):
        table.add_column(column)
    for task, metrics in results.items():
        for name, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            table.add_row(task, name, shown)
    Console().print(table)
