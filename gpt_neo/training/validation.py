"""Validation during training and for `--eval`: the loss and perplexity (and a masked LM's
masked-token accuracy) over batches from the start of the eval data."""

from __future__ import annotations

import functools

import jax
import numpy as np

from gpt_neo.config import Config
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import make_mesh
from gpt_neo.training.objectives import make_example
from gpt_neo.training.step import loss_fn
from gpt_neo.training.trainer import Trainer


def evaluate(cfg: Config, trainer: Trainer, params, steps: int) -> dict:
    """Mean cross-entropy (without z-loss) over `steps` eval batches from the start of eval_path;
    for a masked LM also the accuracy at the masked positions (the same positions every
    evaluation: batch i is masked with a key from `seed` and i)."""
    pipeline = InputPipeline(cfg, eval=True, out=None)  # the training pipeline says what it has to
    eval_fn = _eval_fn(cfg, trainer)
    batches = [
        eval_fn(params, trainer.place(pipeline.next_batch()), np.int32(i)) for i in range(steps)
    ]
    means = {name: float(np.mean([b[name] for b in batches])) for name in batches[0]}
    results = {"eval_loss": means["loss"], "eval_perplexity": float(np.exp(means["loss"]))}
    if "accuracy" in means:
        results["eval_accuracy"] = means["accuracy"]
    return results


def validation(cfg: Config, params) -> dict:
    """`--eval`'s validation figures for `params`: loss and perplexity (and a masked LM's
    masked-token accuracy) over `eval_steps` batches of `eval_batch_size` (default
    train_batch_size) from eval_path."""
    batch = cfg.eval_batch_size or cfg.train_batch_size
    if not batch:
        raise ConfigError("set eval_batch_size (or train_batch_size) for the validation loss")
    mesh = make_mesh(cfg)
    with jax.set_mesh(mesh):
        metrics = evaluate(cfg, Trainer(cfg, mesh, batch_size=batch), params, cfg.eval_steps)
    return {name.removeprefix("eval_"): value for name, value in metrics.items()}


@functools.lru_cache(maxsize=8)
def _eval_fn(cfg: Config, trainer: Trainer):
    def scores(params, tokens, index):
        masking_rng = jax.random.fold_in(jax.random.key(cfg.seed), index)
        example = make_example(cfg, tokens, masking_rng)
        metrics = loss_fn(cfg, params, example, None, train=False)[1]
        return {name: metrics[name] for name in ("loss", "accuracy") if name in metrics}

    return jax.jit(
        scores,
        in_shardings=(trainer.state_shardings["params"], trainer.batch_sharding, None),
    )
