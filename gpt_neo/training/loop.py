"""Training: the train state, the jitted step (with gradient accumulation), and the loop.

The train state is one pytree: `{"params", "opt_state", "step", "rng"}`; the input pipeline's
position is saved next to it in every checkpoint, so a restored run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_neo import axes
from gpt_neo.config import Config, to_dict
from gpt_neo.data.dataset_config import check_run_tokenizer, model_tokenizer
from gpt_neo.data.feed import DeviceFeed
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.errors import EXIT_PREEMPTED, ConfigError, warn
from gpt_neo.inference.predict import DEFAULT_PROMPT, write_predictions
from gpt_neo.mesh import activation_spec, batch_axes, data_parallel_size, make_mesh
from gpt_neo.models.gpt import abstract_params, head_inputs, init_params, trunk
from gpt_neo.models.loss import head_loss
from gpt_neo.storage import write_text_atomic
from gpt_neo.training.checkpoint.checkpointer import Checkpointer
from gpt_neo.training.checkpoint.run_lock import writer_lock
from gpt_neo.training.memory import gathers_weights, memory_per_device, num_microbatches
from gpt_neo.training.objectives import MASKING_STREAM, Example, make_example
from gpt_neo.training.optim import learning_rate, make_optimizer, state_shardings

# The data position of a checkpoint made outside training (an imported model): read from the start.
DATA_FROM_THE_START = {"position": "start"}

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


def loss_fn(cfg: Config, params, batch, rng, target_count=None, *, train=True, share=1.0):
    """Cross-entropy of `batch` (records [batch, n_ctx + 1], or an `Example` made from them:
    see `gpt_neo.training.objectives`) plus GPT-Neo's z-loss (z_loss * logsumexp(logits)^2), summed
    over the counted targets and divided by `target_count` (default: how many targets the
    batch counts, which makes it the mean; a microbatch passes its whole batch's count, so
    that microbatch losses add up to the batch's).
    MoE layers add their load-balancing loss (and router z-loss) times `share`, the batch's
    fraction that `tokens` is (1 / microbatches: Mesh-TensorFlow divides it there, once).
    Returns (total, metrics): `loss` (cross-entropy), `z_loss`, for a masked LM `accuracy`
    (of the argmax at the masked positions), and with MoE layers `moe_loss`,
    `router_z_loss` and per layer `moe/<i>/aux_loss`, `moe/<i>/dropped`,
    `moe/<i>/load/<expert>`, all already weighted by `share`."""
    example = batch if isinstance(batch, Example) else make_example(cfg, batch)
    x, _, moe_stats = trunk(cfg, params, example.inputs, rng=rng, train=train)
    if target_count is None:
        target_count = jnp.maximum(example.weights.sum(), 1.0)
    terms = head_loss(
        cfg, *head_inputs(cfg, params, x), example.targets, example.weights, target_count
    )
    metrics = {"loss": terms.cross_entropy, "z_loss": terms.z_loss}
    if cfg.mlm_training:
        metrics["accuracy"] = terms.correct
    if not moe_stats:
        return terms.total, metrics
    hp = cfg.moe
    balance = hp.moe_loss_coef * share * sum(s.aux_loss for s in moe_stats.values())
    router_z = hp.moe_router_z_loss * share * sum(s.router_z_loss for s in moe_stats.values())
    metrics |= {"moe_loss": balance, "router_z_loss": router_z}
    for layer, stats in moe_stats.items():
        metrics[f"moe/{layer}/aux_loss"] = share * stats.aux_loss
        metrics[f"moe/{layer}/dropped"] = share * stats.dropped
        metrics |= {f"moe/{layer}/load/{e}": share * v for e, v in enumerate(stats.load)}
    return terms.total + balance + router_z, metrics


def uses_randomness(cfg: Config) -> bool:
    """Whether a training step draws random numbers (dropout, random MoE routing)."""
    if max(cfg.embed_dropout, cfg.attn_dropout, cfg.res_dropout) > 0:
        return True
    if not cfg.moe_layers:
        return False
    hp = cfg.moe
    if hp.moe_gating == "top_2":
        return hp.moe_second_policy_train == "random" or hp.moe_dropout_rate > 0
    if hp.moe_gating == "rand_1":
        return hp.moe_rand_1_policy_train != "argmax" or hp.moe_dropout_rate > 0
    return hp.moe_dropout_rate > 0


def split_microbatches(batch, n_micro: int, data_parallel: int):
    """[B, T] -> [n_micro, B / n_micro, T] so that every microbatch takes an equal share of
    each data-parallel replica's rows (the rows stay on their devices)."""
    b, t = batch.shape
    rows = b // (data_parallel * n_micro)
    return (
        batch.reshape(data_parallel, n_micro, rows, t)
        .swapaxes(0, 1)
        .reshape(n_micro, b // n_micro, t)
    )


def gradients(
    cfg: Config,
    params,
    batch,
    step_rng,
    n_micro: int = 1,
    data_parallel: int = 1,
    batch_spec=(None, None),
):
    """(grads, metrics) of the mean loss over batch [B, n_ctx + 1], accumulated over
    `n_micro` microbatches (a lax.scan) when the batch does not fit at once; the metrics are
    `loss_fn`'s, for the whole batch. A masked LM masks the whole batch first (so that the
    microbatches share one count of masked positions)."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, cfg), has_aux=True)
    masking_rng = None if step_rng is None else jax.random.fold_in(step_rng, MASKING_STREAM)
    example = make_example(cfg, batch, masking_rng)
    target_count = jnp.maximum(example.weights.sum(), 1.0)

    def grads_of(params, example, index):
        rng = jax.random.fold_in(step_rng, index) if uses_randomness(cfg) else None
        (_, metrics), grads = grad_fn(params, example, rng, target_count, share=1.0 / n_micro)
        return grads, metrics

    if n_micro == 1:
        return grads_of(params, example, 0)
    micro = jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(
            split_microbatches(a, n_micro, data_parallel), P(None, *batch_spec)
        ),
        example,
    )

    # With FSDP, XLA overlaps the microbatches' weight gathers and passes so much that 1.3B
    # on v5e:2x2 needs 8.1 GiB of temporaries for 2 microbatches against 4.1 for one. Making
    # each microbatch's weights and tokens wait for the running sum keeps the microbatches in
    # sequence (6.6 GiB; 125M: 1.29 -> 1.19). Not without FSDP: there the barrier costs a
    # copy of the sum (125M data parallel: 1.87 -> 2.24 GiB).
    in_sequence = gathers_weights(cfg)

    def accumulate(total, xs):
        index, example = xs
        looped_params = params
        if in_sequence:
            total, looped_params, example = jax.lax.optimization_barrier((total, params, example))
        return jax.tree.map(jnp.add, total, grads_of(looped_params, example, index)), None

    metric_shapes = jax.eval_shape(grads_of, params, jax.tree.map(lambda a: a[0], micro), 0)[1]
    zero_metrics = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), metric_shapes)
    zero = (jax.tree.map(jnp.zeros_like, params), zero_metrics)
    total, _ = jax.lax.scan(accumulate, zero, (jnp.arange(n_micro), micro))
    return total  # every microbatch's terms were already divided by the whole batch's size


def gradient_norms(grads) -> dict[str, jax.Array]:
    """`log_grads`: the norm of each layer's gradient and of the embeddings' and ln_f's, as
    `grad_norm/blocks/3`, `grad_norm/wte`, ...; their squares add up to the global norm's."""
    parts = {name: g for name, g in grads.items() if name != "blocks"}
    parts |= {f"blocks/{i}": g for i, g in enumerate(grads["blocks"])}
    return {f"grad_norm/{name}": optax.tree.norm(g) for name, g in parts.items()}


def train_step(cfg: Config, optimizer, n_micro: int, data_parallel: int, batch_spec, state, batch):
    """One optimizer step on a global batch [B, n_ctx + 1]; returns (state, metrics)."""
    params = state["params"]
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grads, loss_metrics = gradients(
        cfg, params, batch, step_rng, n_micro, data_parallel, batch_spec
    )
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_state = {
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": state["rng"],
    }
    metrics = {
        **loss_metrics,
        "grad_norm": optax.tree.norm(grads),
        "lr": learning_rate(cfg, state["step"]),
    }
    if cfg.log_grads:
        metrics |= gradient_norms(grads)
    return new_state, metrics


class Trainer:
    """The jitted step and the shardings of everything it touches, for one config and mesh."""

    def __init__(self, cfg: Config, mesh: Mesh, *, batch_size: int | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.batch_size = batch_size or cfg.train_batch_size
        if not self.batch_size:
            raise ConfigError("set train_batch_size in the config")
        batch_spec = activation_spec(cfg, (axes.BATCH, None))
        self.data_parallel = data_parallel_size(cfg, mesh)
        if self.batch_size % self.data_parallel:
            raise ConfigError(
                f"train_batch_size {self.batch_size} is not divisible by the data-parallel size "
                f"{self.data_parallel} (mesh axes {'+'.join(batch_axes(cfg))})"
            )
        self.n_micro = num_microbatches(cfg, self.batch_size, self.data_parallel)
        self.optimizer = make_optimizer(cfg)
        self.batch_sharding = NamedSharding(mesh, batch_spec)
        self.replicated = NamedSharding(mesh, P())
        self.state_shardings = self._state_shardings()
        step = functools.partial(
            train_step, cfg, self.optimizer, self.n_micro, self.data_parallel, tuple(batch_spec)
        )
        self.step = jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=0,
        )

    def _state_shardings(self):
        params = abstract_params(self.cfg, self.mesh)
        return {
            "params": jax.tree.map(lambda p: p.sharding, params),
            "opt_state": state_shardings(self.optimizer, params, self.replicated),
            "step": self.replicated,
            "rng": self.replicated,
        }

    def abstract_state(self):
        """Shapes, dtypes and shardings of the state (the target of a checkpoint restore)."""
        params = abstract_params(self.cfg, self.mesh)
        shapes = {
            "params": params,
            "opt_state": jax.eval_shape(self.optimizer.init, params),
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        }
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            shapes,
            self.state_shardings,
        )

    def init_state(self, seed: int):
        params = init_params(self.cfg, seed, self.mesh)
        opt_state = jax.jit(self.optimizer.init, out_shardings=self.state_shardings["opt_state"])(
            params
        )
        rng = jax.random.key_data(jax.random.key(seed ^ 0x5EED))
        return {
            "params": params,
            "opt_state": opt_state,
            "step": jax.device_put(jnp.int32(0), self.replicated),
            "rng": jax.device_put(rng.astype(jnp.uint32), self.replicated),
        }

    def place(self, host_batch: np.ndarray):
        """This host's rows -> one global array sharded over the data-parallel axis."""
        return jax.make_array_from_process_local_data(self.batch_sharding, host_batch)


# --------------------------------------------------------------------------------------------
# The loop


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


def check_finite(history: list[dict], first_step: int) -> None:
    for offset, metrics in enumerate(history):
        if not all(math.isfinite(float(metrics[k])) for k in ("loss", "grad_norm")):
            step = first_step + offset + 1
            raise TrainingDiverged(
                f"step {step}: loss {float(metrics['loss'])} / gradient norm "
                f"{float(metrics['grad_norm'])} is not finite; stopped without saving it. The last "
                "checkpoint is intact: lower lr, raise warmup_steps, or check the data, then rerun"
            )


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


def sample_now(cfg: Config, params, step: int) -> str:
    """GPT-Neo's `predict_steps > 0`: sample from the default prompt after a checkpoint.
    Returns the line to log."""
    if jax.process_count() > 1:  # decoded text would need every host's rows gathered first
        return "predict_steps: sampling during multi-process training is skipped; use --predict"
    encoder, eos_id = model_tokenizer(cfg)
    path = write_predictions(cfg, params, step, DEFAULT_PROMPT, encoder, eos_id, seed=step)[1]
    return f"samples at step {step}: {path}"


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


def train(
    cfg: Config, mesh: Mesh, *, steps_per_checkpoint: int, checkpointer, metrics, pipeline=None
) -> int:
    """Train to `train_steps`, resuming from the latest checkpoint. Returns the exit code."""
    with explain_out_of_memory(cfg):
        return _train(cfg, mesh, steps_per_checkpoint, checkpointer, metrics, pipeline)


def _train(
    cfg: Config, mesh: Mesh, steps_per_checkpoint: int, checkpointer, metrics, pipeline
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
    tokenizer = check_run_tokenizer(cfg, tokenizer, needed=bool(cfg.predict_steps))
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
            if boundary and cfg.predict_steps:
                tokenizer = check_run_tokenizer(cfg, tokenizer, needed=True)
                metrics.message(sample_now(cfg, state["params"], step))
            if boundary and (cfg.eval_steps or cfg.predict_steps):
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
    with writer_lock(cfg.model_path):
        checkpointer = Checkpointer(cfg.model_path, cfg.keep_checkpoints)
        try:
            if checkpointer.latest_step() is not None:
                raise ConfigError(
                    f"{cfg.model_path} already holds checkpoints; import into an empty model_path"
                )
            save_initial_checkpoint(cfg, make_mesh(cfg), params, checkpointer, step)
        finally:
            checkpointer.close()
    config_path = f"{cfg.model_path.rstrip('/')}/config.json"
    write_text_atomic(config_path, json.dumps(to_dict(cfg), indent=2) + "\n")
    return config_path
