"""A checkpoint for a model that starts from given parameters (a Hugging Face folder, a GPT-Neo
checkpoint): written once, then resumed by `main.py` like any run's."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gpt_neo.config import Config, to_dict
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import data_parallel_size, make_mesh
from gpt_neo.storage import write_text_atomic
from gpt_neo.training.checkpoint.checkpointer import DATA_FROM_THE_START, Checkpointer
from gpt_neo.training.checkpoint.run_lock import writer_lock
from gpt_neo.training.trainer import Trainer


def save_initial_checkpoint(cfg: Config, mesh: Mesh, params, checkpointer, step: int = 0) -> None:
    """A checkpoint at `step` of a run that starts from given params (an imported model): a
    fresh optimizer state and RNG, the data read from the start. `main.py` then resumes it like
    any run (the learning-rate schedule continues from `step`)."""
    # no step is taken: any valid batch size does
    trainer = Trainer(cfg, mesh, batch_size=data_parallel_size(cfg, mesh))
    state = trainer.init_state(cfg.seed)
    state["params"] = jax.device_put(params, trainer.state_shardings["params"])
    state["step"] = jax.device_put(jnp.int32(step), trainer.replicated)
    checkpointer.save(step, state, DATA_FROM_THE_START, cfg)


def save_imported_model(cfg: Config, params, step: int = 0) -> str:
    """An imported model (a Hugging Face folder, a GPT-Neo checkpoint) -> a checkpoint at
    `step` under `cfg.model_path`, which must hold none yet, and `model_path/config.json`, which
    `python main.py --model` continues training from. Returns the config's path."""
    model_path = cfg.require_model_path("where the imported model goes")
    with writer_lock(model_path):
        checkpointer = Checkpointer(model_path, cfg.keep_checkpoints)
        try:
            if checkpointer.latest_step() is not None:
                raise ConfigError(
                    f"{model_path} already holds checkpoints; import into an empty model_path"
                )
            save_initial_checkpoint(cfg, make_mesh(cfg), params, checkpointer, step)
        finally:
            checkpointer.close()
    config_path = f"{model_path.rstrip('/')}/config.json"
    write_text_atomic(config_path, json.dumps(to_dict(cfg), indent=2) + "\n")
    return config_path
