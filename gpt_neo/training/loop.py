"""The training loop: resume from the newest checkpoint, feed batches to the step, log, check
that every loss is finite, save checkpoints (and stop cleanly on SIGTERM), validate, and run the
caller's hooks after each checkpoint (sampling, for one: training knows no decoding).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from gpt_neo.config import Config
from gpt_neo.data.dataset_config import check_run_tokenizer
from gpt_neo.data.feed import DeviceFeed
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.errors import EXIT_PREEMPTED, ConfigError, warn
from gpt_neo.training.checkpoint.checkpointer import DATA_FROM_THE_START
from gpt_neo.training.memory import memory_per_device
from gpt_neo.training.trainer import Trainer
from gpt_neo.training.validation import evaluate

# A fault-injection hook for tests and bench/chaos.py: the parameters turn to NaN just before
# step N runs, as an overflow would make them, so that the divergence guard is seen to stop
# the run before anything poisoned is saved. Unset in normal use.
NAN_AT_STEP_ENV = "GPT_NEO_TEST_NAN_AT_STEP"


def _poisoned_before(step: int, state):
    """`state` with NaN parameters if NAN_AT_STEP_ENV names `step`, else `state`."""
    if os.environ.get(NAN_AT_STEP_ENV) != str(step):
        return state
    return {**state, "params": jax.tree.map(lambda x: x * jnp.nan, state["params"])}


class TrainingDiverged(RuntimeError):
    pass


@dataclass(frozen=True)
class CheckpointHook:
    """Runs after each checkpoint with (step, params); returns a line to log, or None.
    `needs_tokenizer`: the run's tokenizer must load (it is checked before the hook runs)."""

    run: Callable[[int, object], str | None]
    needs_tokenizer: bool = False


def check_finite(history: list[dict], first_step: int) -> None:
    for offset, metrics in enumerate(history):
        if not all(math.isfinite(float(metrics[k])) for k in ("loss", "grad_norm")):
            step = first_step + offset + 1
            raise TrainingDiverged(
                f"step {step}: loss {float(metrics['loss'])} / gradient norm "
                f"{float(metrics['grad_norm'])} is not finite; stopped without saving it. The last "
                "checkpoint is intact: lower lr, raise warmup_steps, or check the data, then rerun"
            )


@contextlib.contextmanager
def explain_out_of_memory(cfg: Config):
    """Turn XLA's out-of-memory error into a ConfigError that carries `--summary`'s estimate."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err) and "Out of memory" not in str(err):
            raise
        need = memory_per_device(cfg)
        raise ConfigError(
            f"out of device memory ({str(err).splitlines()[0][:200]}). Parameters and optimizer "
            f"state alone need {(need['parameters'] + need['optimizer state']) / 2**30:.2f} GiB per "
            "device under this mesh (see --summary), before activations. Split more dimensions "
            "in layout or use more devices, set recompute_grad, or lower train_batch_size / "
            "tokens_per_mb_per_replica"
        ) from None


@dataclass
class Preemption:
    """SIGTERM (a preempted TPU VM, SLURM's time limit) asks the loop to stop at a step boundary."""

    requested: bool = False

    def install(self):
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "requested", True))
        return self

    def agreed(self) -> bool:
        """Whether any process was asked to stop (all processes then stop at the same step)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))


def train(
    cfg: Config,
    mesh: Mesh,
    *,
    steps_per_checkpoint: int,
    checkpointer,
    metrics,
    pipeline=None,
    hooks: Sequence[CheckpointHook] = (),
) -> int:
    """Train to `train_steps`, resuming from the latest checkpoint, running `hooks` after each
    checkpoint. Returns the exit code."""
    with explain_out_of_memory(cfg):
        return _train(cfg, mesh, steps_per_checkpoint, checkpointer, metrics, pipeline, hooks)


def _train(
    cfg: Config, mesh: Mesh, steps_per_checkpoint: int, checkpointer, metrics, pipeline, hooks
) -> int:
    if not cfg.train_steps:
        raise ConfigError("set train_steps in the config")
    trainer = Trainer(cfg, mesh)
    pipeline = pipeline or InputPipeline(cfg)
    restored = checkpointer.restore_latest(cfg, trainer.abstract_state())
    tokenizer = None  # the identity of the tokenizer the run started with, saved with the data
    if restored is None:
        state = trainer.init_state(cfg.seed)
    else:
        state, data_state = restored
        tokenizer = data_state.get("tokenizer")
        if data_state != DATA_FROM_THE_START:
            pipeline.restore(data_state)
    needs_tokenizer = any(hook.needs_tokenizer for hook in hooks)
    tokenizer = check_run_tokenizer(cfg, tokenizer, needed=needs_tokenizer)
    step = int(state["step"])
    if step >= cfg.train_steps:
        metrics.message(
            f"training is complete: step {step} of {cfg.train_steps} is in {checkpointer.directory}"
        )
        return 0
    metrics.start(step, trainer)
    preemption = Preemption().install()
    iterations = cfg.iterations or 1
    feed = DeviceFeed(pipeline.next_batch, pipeline.state, trainer.place, cfg.input_prefetch)
    report = DeferredReport(metrics, feed)
    with feed, jax.set_mesh(mesh):  # activation shardings are traced against this mesh
        while step < cfg.train_steps:
            until_checkpoint = steps_per_checkpoint - step % steps_per_checkpoint
            todo = min(iterations, cfg.train_steps - step, until_checkpoint)
            history = []
            for _ in range(todo):
                batch, data_state = feed.next()
                state = _poisoned_before(step + len(history) + 1, state)
                state, step_metrics = trainer.step(state, batch)
                history.append(step_metrics)
                if jax.process_count() == 1 and preemption.requested:
                    break  # finish this step, then save
            report.flush()  # the previous block, while the device works through this one
            report.hold(step, history)
            step += len(history)
            stop = preemption.agreed()
            boundary = step % steps_per_checkpoint == 0 or step == cfg.train_steps
            if boundary or stop:
                report.flush()  # this block's losses are checked before its state is saved
                position = pipeline.global_state(data_state)
                checkpointer.save(step, state, position | {"tokenizer": tokenizer}, cfg)
            if boundary and cfg.eval_steps:
                metrics.log_eval(step, evaluate(cfg, trainer, state["params"], cfg.eval_steps))
            for hook in hooks if boundary else ():
                if hook.needs_tokenizer:
                    tokenizer = check_run_tokenizer(cfg, tokenizer, needed=True)
                if line := hook.run(step, state["params"]):
                    metrics.message(line)
            if boundary and (cfg.eval_steps or hooks):
                report.restart_clock()  # evaluation has its own line; tok/s counts training
            if stop:
                checkpointer.wait()
                metrics.message(
                    f"preempted: saved step {step} to {checkpointer.directory}; rerun to resume"
                )
                return EXIT_PREEMPTED
        report.flush()
    checkpointer.wait()
    metrics.finish(step, checkpointer.directory)
    if skipped := pipeline.skipped_files():
        warn(f"{len(skipped)} damaged file(s) were cut short: {', '.join(skipped)}")
    return 0


class DeferredReport:
    """A block's metrics are read (a host-device sync) only after the next block is queued,
    so the device never idles while the host logs. `flush()` reports the held block: its
    losses are checked (a `TrainingDiverged` names the step) and logged with the wall time
    since the previous block was done, and how much of that time the loop waited for input."""

    def __init__(self, metrics, feed: DeviceFeed):
        self.metrics, self.feed = metrics, feed
        self.held: tuple[int, list] | None = None
        self.last_done = time.perf_counter()

    def hold(self, first_step: int, history: list) -> None:
        """A block: its first step and its steps' metrics (still on the devices)."""
        self.held = (first_step, history)

    def restart_clock(self) -> None:
        """Time the next block from now: what ran since the last flush was not training."""
        self.last_done = time.perf_counter()

    def flush(self) -> None:
        if self.held is None:
            return
        (first_step, history), self.held = self.held, None
        history = jax.device_get(history)
        done, waited = time.perf_counter(), self.feed.take_waited()
        check_finite(history, first_step)
        seconds, self.last_done = done - self.last_done, done
        self.metrics.log_train(first_step + len(history), history, seconds, waited)
