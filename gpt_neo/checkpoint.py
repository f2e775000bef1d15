"""Checkpoints with orbax: `{model_path}/checkpoints/<step>/{state,data,config}`.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash (even `kill -9`) never leaves a half-written checkpoint under a step name; saves are
asynchronous (training continues while the previous step is written) and only the newest
`keep_checkpoints` are kept. Restoring takes the target shardings from the current mesh, so
a run may resume on another `mesh_shape`/`layout`/`param_layout`. A layout that pads the
vocabulary differently (`gpt_neo.mesh.padded_vocab`) restores too: the embedding and its
optimizer state are read at the new size, cut or filled with zeros. Only the padding rows
can differ, and they are zeros in every checkpoint (see `_check_config`).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import orbax.checkpoint as ocp

from gpt_neo.config import SHAPE_KEYS, Config, default_of, to_dict
from gpt_neo.errors import ConfigError
from gpt_neo.mesh import make_mesh
from gpt_neo.models.gpt import abstract_params

# The parameters' and the optimizer state's shapes: a checkpoint fits only a config that
# agrees on these.
ARCHITECTURE_KEYS = (*SHAPE_KEYS, "opt_name")


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
        handlers = {
            "state": state_handler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        try:
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_handlers=handlers
            )
        except OSError as err:
            raise ConfigError(
                f"model_path {model_path} is not writable ({err.strerror or err}); choose another"
            ) from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, cfg: Config) -> None:
        """Start writing checkpoint `step`: the arrays are copied to host memory, the files
        are written in the background (`wait()` waits for them)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(to_dict(cfg)),
            ),
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def _check_config(self, step: int, cfg: Config) -> None:
        """A ConfigError when checkpoint `step` was written for a model of other shapes. Past
        this check, stored and wanted shapes can differ only in the vocabulary padding, so the
        restores below may let orbax cut or zero-fill arrays (`strict=False`)."""
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]
        current = to_dict(cfg)
        if differences := [
            k for k in ARCHITECTURE_KEYS if saved.get(k, default_of(k)) != current[k]
        ]:
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
            args=ocp.args.Composite(state=_restore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return restored["state"], restored["data"]

    def restore_latest_params(self, cfg: Config, target_params):
        """(params, step) of the newest checkpoint without reading the optimizer state (a third
        of the memory for sampling, evaluation and export); None when there is none."""
        step = self.latest_step()
        if step is None:
            return None
        self._check_config(step, cfg)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=_restore({"params": target_params}, partial_restore=True)
            ),
        )
        return restored["state"]["params"], step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# Orbax splits the writing of a replicated array (every array of a data-parallel run) across its
# replicas, cutting it with one small compiled slice per array shape: seconds of compilation at
# a run's first save, on the training loop's critical path (2.4 s for a 2-layer model on 8
# devices). It pays off only where each replica's slice is large.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 16 * 2**20


def state_handler() -> ocp.PyTreeCheckpointHandler:
    """The train state's handler: orbax's, with replica-parallel writes for large slices only,
    and without the file of each array's sharding. Every restore here names its target
    shardings (those of the mesh it runs on), so that file is never read, and writing it is a
    quarter of a save's CPU time (38 of 140 ms for 94 arrays), which a CPU-hosted step feels."""
    arrays = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES,
        enable_write_sharding_file=False,
    )
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, arrays))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore(target, **options) -> ocp.args.PyTreeRestore:
    """Restore `target`'s leaves with their shardings; a stored vocabulary padding other than
    the target's is cut or zero-filled (`strict=False`; see `_check_config`)."""
    restore_args = jax.tree.map(
        lambda a: dataclasses.replace(a, strict=False),
        ocp.checkpoint_utils.construct_restore_args(target),
    )
    return ocp.args.PyTreeRestore(target, restore_args=restore_args, **options)


def load_params(cfg: Config):
    """(params, step) of the newest checkpoint under `model_path`, sharded per the layout; the
    optimizer state is not read. What sampling, evaluation and export start from."""
    if not cfg.model_path:
        raise ConfigError("set model_path in the config (where the checkpoints are)")
    checkpointer = Checkpointer(cfg.model_path, cfg.keep_checkpoints)
    try:
        restored = checkpointer.restore_latest_params(cfg, abstract_params(cfg, make_mesh(cfg)))
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError(
            f"no checkpoint in {checkpointer.directory}: train first (python main.py --model ...) "
            "or import a Hugging Face model (python -m gpt_neo.cli.hf import HF_DIR --model_path DIR)"
        )
    return restored
