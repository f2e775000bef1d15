"""Checkpoints with orbax: `{model_path}/checkpoints/<step>/{state,data,config}`.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
crash (even `kill -9`) never leaves a half-written checkpoint under a step name; saves are
asynchronous (training continues while the previous step is written) and only the newest
`keep_checkpoints` are kept. Restoring takes the target shardings from the current mesh, so
a run may resume on another `mesh_shape`/`layout`/`param_layout`. A layout that pads the
vocabulary differently (`gpt_neo.mesh.padded_vocab`) restores too: the embedding and its
optimizer state are read at the new size, cut or filled with zeros. Only the padding rows
can differ, and they are zeros in every checkpoint (see `_check_config`).

Once orbax has committed a checkpoint, its files' checksums are recorded
(`gpt_neo.training.checkpoint.manifest`); restoring checks them and falls back, newest first, past
damaged checkpoints, which are moved to `{model_path}/damaged_checkpoints/` (never deleted).
A save that runs out of space stops the run with `StorageFull` (exit 4): orbax's unfinished
temporary folder is removed and the previous checkpoint stays the newest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gpt_neo import storage
from gpt_neo.config import Config, default_of, shape_keys, to_dict
from gpt_neo.errors import ConfigError, DataError, StorageFull, UserError, first_line, warn
from gpt_neo.mesh import make_mesh
from gpt_neo.models.gpt import abstract_params
from gpt_neo.models.stack import BLOCKS, STACKS, Stacks, stack_tree, unstack_tree
from gpt_neo.training.checkpoint import manifest

# The data position of a checkpoint made outside training (an imported model): read from the start.
DATA_FROM_THE_START = {"position": "start"}


class _SpaceErrorsReportedElsewhere(logging.Filter):
    """Drops orbax's and asyncio's own logs of a write that ran out of space (tracebacks from
    writer threads): `Checkpointer` reports it as one line (StorageFull)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (storage.is_out_of_space(error) or storage.is_out_of_space(record.getMessage()))


for _logger in ("absl", "asyncio"):
    logging.getLogger(_logger).addFilter(_SpaceErrorsReportedElsewhere())


def _quiet_closed_loop_callbacks(previous_hook=sys.excepthook, previous=sys.unraisablehook):
    """When one write of a save fails, orbax closes that save's event loop while tensorstore
    still completes the others, whose callbacks then fail on the closed loop and are printed
    from C (PyErr_WriteUnraisable or PyErr_Print): noise after an error already reported.
    Only that exact error is dropped."""

    def closed_loop(error) -> bool:
        return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"

    def unraisable(info):
        if not closed_loop(info.exc_value):
            previous(info)

    def hook(kind, error, trace):
        if not closed_loop(error):
            previous_hook(kind, error, trace)

    sys.unraisablehook = unraisable
    sys.excepthook = hook


_quiet_closed_loop_callbacks()


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
        self.aside = f"{model_path.rstrip('/')}/damaged_checkpoints"
        self._unsealed: int | None = None  # saved, its checksums not yet recorded
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return f"{self.directory}/{step}"

    def save(self, step: int, state, data_state: dict, cfg: Config) -> None:
        """Start writing checkpoint `step`: the arrays are copied to host memory, the files
        are written in the background (`wait()` waits for them). The previous checkpoint is
        finished and its checksums recorded first."""
        self.wait()
        with self._out_of_space(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(to_dict(cfg)),
                ),
            )
        self._unsealed = step

    def wait(self) -> None:
        """Wait for the checkpoint being written, then record its checksums."""
        with self._out_of_space(self._unsealed):
            self.manager.wait_until_finished()
            if self._unsealed is not None and jax.process_index() == 0:
                manifest.write(self.step_dir(self._unsealed))
        self._unsealed = None

    @contextlib.contextmanager
    def _out_of_space(self, step: int | None):
        """A write that fails for lack of space becomes `StorageFull`, with orbax's unfinished
        folder removed (the previous checkpoint stays the newest)."""
        try:
            yield
        except Exception as err:
            if not storage.is_out_of_space(err):
                raise
            self._failed = True
            self._remove_unfinished()
            latest = self.manager.latest_step() if step is None else _previous(self, step)
            if latest is None:
                need, kept = "", "no earlier checkpoint exists"
            else:
                size = _tree_bytes(self.step_dir(latest)) / 2**20
                need = f"a checkpoint takes about {size:.1f} MiB: "
                kept = f"step {latest} is intact and a rerun resumes from it"
            raise StorageFull(
                f"out of space writing checkpoint {step} under {self.directory} "
                f"({storage.space_problem(err)}); {need}free space or point model_path "
                f"elsewhere; {kept}"
            ) from None

    def _remove_unfinished(self) -> None:
        if jax.process_index() != 0:
            return
        for name in storage.listdir(self.directory):
            if "orbax-checkpoint-tmp" in name:
                with contextlib.suppress(Exception):
                    storage.delete_tree(storage.join(self.directory, name))

    def _check_config(self, step: int, cfg: Config) -> None:
        """A ConfigError when checkpoint `step` was written for a model of other shapes. Past
        this check, stored and wanted shapes can differ only in the vocabulary padding, so the
        restores below may let orbax cut or zero-fill arrays (`strict=False`)."""
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]
        current = to_dict(cfg)
        # the parameters' shapes, and the optimizer whose state is stored beside them
        keys = (*shape_keys(cfg), "opt_name")
        if differences := [k for k in keys if saved.get(k, default_of(k)) != current[k]]:
            detail = "; ".join(
                f"{k}: checkpoint {saved.get(k)!r}, config {current[k]!r}" for k in differences
            )
            raise ConfigError(
                f"{self.directory}/{step} was written for another model ({detail}). Point model_path "
                "elsewhere, or start over with --new"
            )

    def _newest_intact(self, cfg: Config, read):
        """`read(step)` of the newest checkpoint whose files match their checksums and that
        orbax can read; damaged ones on the way are moved aside with a warning. None when
        there is no checkpoint; DataError when none is intact."""
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = self.step_dir(step)
            problem = self._damage(step_dir)
            if problem is None:
                try:
                    self._check_config(step, cfg)
                    return read(step)
                except UserError:
                    raise
                except Exception as err:  # orbax and tensorstore raise bare errors on bad bytes
                    if manifest.recorded(step_dir):
                        raise  # its bytes are as written: not damage, a bug to see whole
                    problem = f"orbax cannot read it: {first_line(err)}"
            damaged.append(self._set_aside(step, problem))
        if damaged:
            raise DataError(
                f"no intact checkpoint in {self.directory}: {'; '.join(damaged)}. Restore a "
                f"copy of one, or start over with --new"
            )
        return None

    def _damage(self, step_dir: str) -> str | None:
        """`manifest.damage`, read by process 0 only (on a pod, every host reading
        every file of a `gs://` checkpoint would multiply the traffic) and shared."""
        problem = manifest.damage(step_dir) if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            damaged = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
            if damaged and problem is None:
                problem = "its files do not match their checksums (process 0 read them)"
        return problem

    def _set_aside(self, step: int, problem: str) -> str:
        """Move a damaged checkpoint out of orbax's sight (kept, never deleted)."""
        if jax.process_count() > 1:  # every process has judged it before any moves it
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        destination = f"{self.aside}/{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            storage.move_tree(self.step_dir(step), destination)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
        note = f"checkpoint {self.step_dir(step)} is damaged ({problem}); moved to {destination}"
        warn(f"{note}; trying the one before")
        return note

    def restore_latest(self, cfg: Config, abstract_state):
        """(state, data_state) of the newest intact checkpoint, placed per `abstract_state`'s
        shardings; None when there is none. A checkpoint of another model is a ConfigError."""

        def read(step):
            stored, convert = self._as_stored(step, abstract_state)
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=_restore(stored), data=ocp.args.JsonRestore()),
            )
            return convert(restored["state"]), restored["data"]

        return self._newest_intact(cfg, read)

    def restore_latest_params(self, cfg: Config, target_params):
        """(params, step) of the newest intact checkpoint without reading the optimizer state
        (a third of the memory for sampling, evaluation and export); None when there is none."""

        def read(step):
            stored, convert = self._as_stored(step, {"params": target_params})
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(state=_restore(stored, partial_restore=True)),
            )
            return convert(restored["state"])["params"], step

        return self._newest_intact(cfg, read)

    def _as_stored(self, step: int, target):
        """(what to restore checkpoint `step` into, a function taking that to `target`). The
        identity, unless the checkpoint stores the layers the other way (stacked or one block
        per layer, `gpt_neo.models.stack`: `scan_layers` changed, or a checkpoint written
        before stacking existed): then it is read in its own layout and converted, every
        array placed per `target`'s shardings (the whole state twice, once, while it is)."""
        metadata = self.manager.item_metadata(step)["state"]
        stored = getattr(metadata, "tree", metadata)["params"]
        wanted = target["params"]
        if (STACKS in stored) == (STACKS in wanted):
            return target, lambda tree: tree
        stacked_layers, per_layer = (wanted, stored) if STACKS in wanted else (stored, wanted)
        period = len(stacked_layers[STACKS])
        stacks = Stacks(period, len(per_layer[BLOCKS]) // period)
        if STACKS in wanted:
            source, convert = unstack_tree(stacks, target), functools.partial(stack_tree, stacks)
        else:
            source, convert = stack_tree(stacks, target), functools.partial(unstack_tree, stacks)
        shardings = jax.tree.map(lambda a: a.sharding, target)
        return source, jax.jit(convert, out_shardings=shardings)

    def close(self) -> None:
        if self._failed:  # the error was reported; orbax's state after it is not worth a second
            with contextlib.suppress(Exception):
                self.manager.close()
            return
        self.wait()
        self.manager.close()


def _previous(checkpointer: Checkpointer, step: int) -> int | None:
    earlier = [s for s in checkpointer.manager.all_steps() if s < step]
    return max(earlier) if earlier else None


def _tree_bytes(path: str) -> int:
    gfile = storage.tf().io.gfile
    return sum(
        gfile.stat(storage.join(root, name)).length
        for root, _, names in gfile.walk(path)
        for name in names
    )


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


def load_params(cfg: Config, devices=None):
    """(params, step) of the newest checkpoint under `model_path`, sharded per the layout over
    `devices` (default: all); the optimizer state is not read. What sampling, evaluation and
    export start from."""
    model_path = cfg.require_model_path("where the checkpoints are")
    checkpointer = Checkpointer(model_path, cfg.keep_checkpoints)
    mesh = make_mesh(cfg, devices)
    try:
        restored = checkpointer.restore_latest_params(cfg, abstract_params(cfg, mesh))
    finally:
        checkpointer.close()
    if restored is None:
        raise ConfigError(
            f"no checkpoint in {checkpointer.directory}: train first (python main.py --model ...) "
            "or import a Hugging Face model (python -m gpt_neo.cli.hf import HF_DIR --model_path DIR)"
        )
    return restored
