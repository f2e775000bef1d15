"""Checkpoints with orbax: `{model_path}/checkpoints/<step>/{state,data,config}`.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash (even `kill -9`) never leaves a half-written checkpoint under a step name; saves are
asynchronous (training continues while the previous step is written) and only the newest
`keep_checkpoints` are kept. Restoring takes the target shardings from the current mesh, so
a run may resume on another `mesh_shape`/`layout`.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from gpt_neo.config import Config, ConfigError, to_dict

# Keys that fix the parameters' shapes: a checkpoint only fits a config that agrees on them.
ARCHITECTURE_KEYS = ("n_embd", "n_head", "n_layer", "n_ctx", "n_vocab", "attention_types",
                     "activation_function", "opt_name")  # fmt: skip


class Checkpointer:
    def __init__(self, model_path: str, keep: int):
        if "://" not in model_path:  # orbax wants absolute local paths
            model_path = os.path.abspath(model_path)
        self.directory = f"{model_path.rstrip('/')}/checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # remove what a killed run was still writing
        )
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "data", "config")
            )
        except OSError as err:
            raise ConfigError(
                f"model_path {model_path} is not writable ({err.strerror or err}); choose another"
            ) from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, cfg: Config) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(to_dict(cfg)),
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _check_config(self, step: int, cfg: Config) -> None:
        """A ConfigError when checkpoint `step` was written for a model of other shapes."""
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]
        current = to_dict(cfg)
        if differences := [k for k in ARCHITECTURE_KEYS if saved.get(k) != current[k]]:
            detail = "; ".join(
                f"{k}: checkpoint {saved.get(k)!r}, config {current[k]!r}" for k in differences
            )
            raise ConfigError(
                f"{self.directory}/{step} was written for another model ({detail}). Point model_path "
                "elsewhere, or start over with --new"
            )

    def restore_latest(self, cfg: Config, abstract_state):
        """(state, data_state) of the newest checkpoint, placed per `abstract_state`'s
        shardings; None when there is none. A checkpoint of another model is a ConfigError."""
        step = self.latest_step()
        if step is None:
            return None
        self._check_config(step, cfg)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def restore_latest_params(self, cfg: Config, abstract_params):
        """(params, step) of the newest checkpoint without reading the optimizer state (a third
        of the memory for sampling, evaluation and export); None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        self._check_config(step, cfg)
        # Partial restores need the PyTree handler; the training manager registered the standard
        # one for "state", so a second, read-only manager reads just the params.
        reader = ocp.CheckpointManager(
            self.directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()}
        )
        target = {"params": abstract_params}
        try:
            restored = reader.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )
                ),
            )
        finally:
            reader.close()
        return restored["state"]["params"], step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
