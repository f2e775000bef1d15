"""GPT-Neo's predict mode: samples continuing a prompt, written to
`model_path/predictions_<step>.txt` (by `--predict`, and after each checkpoint when the config
sets `predict_steps`)."""

from __future__ import annotations

import jax

from gpt_neo.config import Config
from gpt_neo.data.dataset_config import model_tokenizer
from gpt_neo.inference.sample import generate
from gpt_neo.storage import write_text_atomic

# GPT-Neo's built-in prompt (its main.py used it when --prompt was absent).
DEFAULT_PROMPT = (
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote, "
    "previously unexplored valley, in the Andes Mountains. Even more surprising to the "
    "researchers was the fact that the unicorns spoke perfect English."
)


def max_new_tokens(cfg: Config, prompt_ids, requested: int | None) -> int:
    """The request, else `predict_max_steps`, else up to n_ctx."""
    return requested or cfg.predict_max_steps or max(1, cfg.n_ctx - len(prompt_ids))


def write_predictions(
    cfg: Config, params, step: int, text: str, encoder, eos_id, *, max_new=None, **sampling
) -> tuple[str, str]:
    """`predict_batch_size` samples continuing `text`, keeping the prompt unless
    `remove_partial_sequences`. Returns (the report, the path it was written to)."""
    prompt_ids = encoder.encode(text)
    outputs = generate(
        cfg,
        params,
        [prompt_ids] * cfg.predict_batch_size,
        eos_id=eos_id,
        max_new_tokens=max_new_tokens(cfg, prompt_ids, max_new),
        **sampling,
    )
    samples = []
    for i, new in enumerate(outputs):
        body = encoder.decode(new) if cfg.remove_partial_sequences else text + encoder.decode(new)
        samples.append(f"======================================== SAMPLE {i}\n{body}\n")
    report = "".join(samples)
    model_path = cfg.require_model_path("where predictions go")
    path = f"{model_path.rstrip('/')}/predictions_{step}.txt"
    write_text_atomic(path, report)
    return report, path


def sample_at_checkpoint(cfg: Config, step: int, params) -> str:
    """GPT-Neo's `predict_steps > 0`: sample from the default prompt after a checkpoint.
    Returns the line to log."""
    if jax.process_count() > 1:  # decoded text would need every host's rows gathered first
        return "predict_steps: sampling during multi-process training is skipped; use --predict"
    encoder, eos_id = model_tokenizer(cfg)
    path = write_predictions(cfg, params, step, DEFAULT_PROMPT, encoder, eos_id, seed=step)[1]
    return f"samples at step {step}: {path}"
