"""Training metrics: a console progress line, `metrics.jsonl`, TensorBoard event files and a
loss-curve PNG, all under `model_path` (written by process 0 only).

MFU = achieved model FLOP/s / (devices x peak FLOP/s per device). Achieved FLOPs count
`flops_per_token` in the named convention (6N+12LHQT, PaLM's). The peak comes from a table of
accelerators' dense bf16 peaks; on CPU, where no table can know the machine, it is a float32
matmul measured when training starts, and the progress line says which.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
import typing

import jax
import numpy as np

from gpt_neo import compilation_cache, hardware, storage
from gpt_neo.config import Config, to_dict
from gpt_neo.models.gpt import flops_per_token
from gpt_neo.storage import join, tf
from gpt_neo.training import report

FLOP_CONVENTION = "6N+12LHQT"


def peak_flops_per_device() -> tuple[float, str]:
    """(FLOP/s, where the number comes from) for one of this process's devices."""
    kind = jax.devices()[0].device_kind
    if known := hardware.chip(kind):
        return known.peak_flops, f"{kind} bf16 peak"
    return measured_matmul_flops() / jax.local_device_count(), "measured f32 matmul"


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a float32 [n, n] matmul on the first device (CPU: all cores), the best of
    `repeats` runs: a peak, so a run slowed by a noisy neighbour does not lower it."""
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices()[0])
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def with_run_record(
    cfg: Config,
    model_path: str,
    body,
    *,
    sacred_id: str | None = None,
    mongo_url: str | None = None,
):
    """Run `body(run)` inside a sacred run: config, host and metrics recorded by a
    FileStorageObserver under `model_path/sacred`, or a MongoObserver when `mongo_url` is
    given. `run.log_scalar(name, value, step)` records a metric. Only process 0 records."""
    if jax.process_index() != 0:
        return body(None)
    from sacred import SETTINGS, Experiment
    from sacred.observers import FileStorageObserver

    settings: typing.Any = SETTINGS  # sacred's settings object: attributes set by name
    settings.CAPTURE_MODE = "no"  # the progress line stays on the console, unbuffered
    settings.DISCOVER_SOURCES = "none"
    settings.DISCOVER_DEPENDENCIES = "none"
    experiment = Experiment("gpt-neo", interactive=True, save_git_info=False)
    if mongo_url:
        from sacred.observers import MongoObserver

        experiment.observers.append(MongoObserver(url=mongo_url))
    elif storage.is_remote(model_path):
        experiment.observers.append(_mirrored_observer(join(model_path, "sacred")))
    else:
        experiment.observers.append(FileStorageObserver(join(model_path, "sacred")))
    experiment.add_config(to_dict(cfg))
    result = {}

    @experiment.main
    def _main(_run):
        _run.info["sacred_id"] = sacred_id
        result["code"] = body(_run)
        return result["code"]

    experiment.run(options={"--loglevel": "ERROR"})
    return result["code"]


def _mirrored_observer(remote: str):
    """sacred's FileStorageObserver for a `gs://` folder. It writes with `open`, so it writes
    into a local folder, and each file it saves is copied to `remote` right away; run ids
    continue from those already in `remote`."""
    from sacred.observers import FileStorageObserver

    class MirroredObserver(FileStorageObserver):
        def _maximum_existing_run_id(self):
            return max((int(n) for n in storage.listdir(remote) if n.isdigit()), default=0)

        def save_json(self, obj, filename):
            super().save_json(obj, filename)
            self._mirror(filename)

        def save_cout(self):
            super().save_cout()
            self._mirror("cout.txt")

        def _mirror(self, filename):
            local = str(self.dir)  # set by FileStorageObserver when the run starts
            run = os.path.basename(local)
            storage.makedirs(join(remote, run))
            storage.copy(os.path.join(local, filename), join(remote, run, filename))

    return MirroredObserver(tempfile.mkdtemp(prefix="gpt-neo-sacred-"))


class Metrics:
    def __init__(self, cfg: Config, model_path: str, *, console=print, run=None):
        self.cfg, self.model_path, self.console, self.run = cfg, model_path, console, run
        self.enabled = jax.process_index() == 0
        self.history: list[tuple[int, float]] = []
        self.evals: list[tuple[int, float]] = []
        self.tokens_per_step = (cfg.train_batch_size or 0) * cfg.n_ctx
        self.flops_per_token = flops_per_token(cfg, FLOP_CONVENTION)
        self._tb = None

    # --- sinks ---------------------------------------------------------------------------
    def _jsonl(self, record: dict) -> None:
        if self.enabled:
            storage.append_text(join(self.model_path, "metrics.jsonl"), json.dumps(record) + "\n")

    def _tensorboard(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        if self.run is not None:
            for name, value in scalars.items():
                self.run.log_scalar(name, float(value), step)
        t = tf()
        writer = self._writer()
        with writer.as_default(step=step):
            for name, value in scalars.items():
                t.summary.scalar(name, value)
        writer.flush()

    def _writer(self):
        if self._tb is None:
            self._tb = tf().summary.create_file_writer(join(self.model_path, "tensorboard"))
        return self._tb

    def _tensorboard_config(self, step: int) -> None:
        """The run's config in TensorBoard's text tab. Written before the first step, it also
        opens the event file and warms TensorFlow's summary ops, which the first logged
        interval would otherwise pay for (~0.05 s)."""
        if not self.enabled:
            return
        config = json.dumps(to_dict(self.cfg), indent=2)
        writer = self._writer()
        with writer.as_default(step=step):
            tf().summary.text("config", f"```json\n{config}\n```")
        writer.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.console(text)

    # --- events --------------------------------------------------------------------------
    def start(self, step: int, trainer) -> None:
        self.first_step, self.started = step, time.perf_counter()
        self.peak, self.peak_source = peak_flops_per_device()
        self.devices = jax.device_count()
        if self.enabled:
            storage.makedirs(self.model_path)
        self._tensorboard_config(step)
        self.message(
            f"training from step {step} to {self.cfg.train_steps} on {self.devices} "
            f"{jax.default_backend()} device(s), mesh {dict(trainer.mesh.shape)}, batch "
            f"{trainer.batch_size} x {self.cfg.n_ctx} tokens"
            + (f", {trainer.n_micro} microbatches" if trainer.n_micro > 1 else "")
        )

    def log_train(
        self, step: int, history: list[dict], seconds: float, input_wait: float = 0.0
    ) -> None:
        """`history`: the metrics of the steps up to `step`, which took `seconds`; the loop
        waited `input_wait` of them for the input pipeline."""
        last = history[-1]
        tokens_per_s = len(history) * self.tokens_per_step / max(seconds, 1e-9)
        mfu = tokens_per_s * self.flops_per_token / (self.devices * self.peak)
        remaining = ((self.cfg.train_steps or step) - step) * seconds / len(history)
        loss = float(np.mean([float(m["loss"]) for m in history]))
        self.history.append((step, loss))
        record = {
            "step": step,
            "loss": loss,
            "z_loss": float(last["z_loss"]),
            "lr": float(last["lr"]),
            "grad_norm": float(last["grad_norm"]),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu,
            "input_wait": input_wait / max(seconds, 1e-9),  # fraction of the interval
        }
        # log_grads: each part's gradient norm at the interval's last step, `grad_norm/<part>`
        record |= {k: float(v) for k, v in last.items() if k.startswith("grad_norm/")}
        # MoE: the balance and router z-losses, and per layer its balance loss, dropped
        # fraction and expert load (`moe/<layer>/...`), averaged over the interval
        for key in (k for k in last if k in ("moe_loss", "router_z_loss") or k.startswith("moe/")):
            record[key] = float(np.mean([float(m[key]) for m in history]))
        # packed data: the share of padding and the documents per row, over the interval
        for key in (k for k in ("padding", "segments_per_row") if k in last):
            record[key] = float(np.mean([float(m[key]) for m in history]))
        if "padding" in record:
            record["real_tokens_per_s"] = tokens_per_s * (1.0 - record["padding"])
        self._jsonl({**record, "time": time.time()})
        self._tensorboard(step, {k: v for k, v in record.items() if k != "step"})
        moe = ""
        if "moe_loss" in record:
            dropped = [v for k, v in record.items() if k.endswith("/dropped")]
            moe = f"MoE loss {record['moe_loss']:.4f}, dropped {100 * np.mean(dropped):.1f}% | "
        packed = ""
        if "padding" in record:
            packed = (
                f"packed {record['segments_per_row']:.1f} docs/row, padding "
                f"{100 * record['padding']:.1f}% | "
            )
        self.message(
            f"step {step}/{self.cfg.train_steps} | loss {loss:.4f} | {moe}{packed}"
            f"lr {record['lr']:.2e} | "
            f"grad norm {record['grad_norm']:.3f} | {tokens_per_s:,.0f} tok/s | MFU {100 * mfu:.1f}% "
            f"({FLOP_CONVENTION}, peak {self.peak / 1e9:,.0f} GFLOP/s/device {self.peak_source}) | "
            f"input wait {100 * record['input_wait']:.0f}% | ETA {_duration(remaining)}"
        )
        if len(self.history) == 1 and (cache := compilation_cache.report()):
            self.message(cache)  # the train step is compiled (or loaded) by now

    def log_eval(self, step: int, results: dict) -> None:
        self.evals.append((step, results["eval_loss"]))
        self._jsonl({"step": step, **results, "time": time.time()})
        self._tensorboard(step, results)
        accuracy = results.get("eval_accuracy")
        self.message(
            f"eval at step {step}: loss {results['eval_loss']:.4f}, perplexity "
            f"{results['eval_perplexity']:.2f}"
            + ("" if accuracy is None else f", masked-token accuracy {accuracy:.2%}")
        )
        self.plot()

    def plot(self) -> str | None:
        """Write loss_curve.png (train and eval loss against step) next to metrics.jsonl."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(*zip(*self.history, strict=True), label="train loss", lw=1)
        if self.evals:
            ax.plot(*zip(*self.evals, strict=True), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        path = join(self.model_path, "loss_curve.png")
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png")
        plt.close(fig)
        storage.write_bytes_atomic(path, png.getvalue())
        return path

    def finish(self, step: int, checkpoint_dir: str) -> None:
        self.message(
            f"done: step {step} in {_duration(time.perf_counter() - self.started)}; checkpoint "
            f"{checkpoint_dir}/{step}; metrics {join(self.model_path, 'metrics.jsonl')}; "
            f"TensorBoard {join(self.model_path, 'tensorboard')}; plot "
            f"{join(self.model_path, 'loss_curve.png')}; report "
            f"{join(self.model_path, report.NAME)}"
        )
        self.plot()
        if self.enabled:
            report.write_report(self.model_path)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
