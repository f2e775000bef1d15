"""Training: schedule, optimizers, microbatching, the loop, checkpoints, resume, bad input."""

import base64
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt_neo
from gpt_neo.config import from_dict
from gpt_neo.training.optim import learning_rate, make_optimizer
from gpt_neo.training.step import context_data_parallel, gradients, loss_fn
from gpt_neo.training.trainer import Trainer
from main import main
from tests.support.helpers import (
    SMALL_MODEL,
    SMALL_RUN,
    parse_report,
    restore_params,
    write_config,
    write_text_dataset,
)

ARCH = SMALL_MODEL


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text"))


def run_config(tmp_path, dataset, **overrides):
    keys = {
        **SMALL_RUN,
        "train_steps": 8,
        "iterations": 2,
        "lr_decay_end": 8,
        "datasets": [[dataset, 1, "documents_random", 1.0]],
        "model_path": str(tmp_path / "run"),
        **overrides,
    }
    return write_config(tmp_path / "model.json", keys)


def final_params(model_path, step):
    return restore_params(f"{model_path}/checkpoints/{step}/state")


# ---- optimizer and schedule ----------------------------------------------------------------


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_learning_rate_schedule_is_gpt_neos(decay):
    cfg = from_dict({**ARCH, "lr": 1e-3, "warmup_steps": 10, "lr_decay": decay, "train_steps": 100})
    for step in (0, 5, 10, 50, 100, 150):
        t = min(step, 100) / 100
        decayed = {
            "cosine": 1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t))),
            "linear": 1e-3 * (1 - 0.9 * t),
            "constant": 1e-3,
        }[decay]
        expected = decayed * min(1.0, step / 10)
        assert float(learning_rate(cfg, step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def _one_update(cfg, grad_value):
    params = gpt_neo.init_params(cfg, 0)
    optimizer = make_optimizer(cfg)
    grads = jax.tree.map(lambda p: jnp.full_like(p, grad_value), params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    return params, updates


def test_weight_decay_hits_matrices_only_not_biases_or_any_norm():
    cfg = from_dict(
        {**ARCH, "lr": 1.0, "weight_decay": 0.1, "lr_decay": "constant", "gradient_clipping": 0}
    )
    params, updates = _one_update(cfg, 0.0)  # zero gradients: only decay moves anything
    np.testing.assert_allclose(updates["wte"], -0.1 * params["wte"], rtol=1e-6)
    np.testing.assert_allclose(
        updates["blocks"][0]["mlp"]["fc_kernel"],
        -0.1 * params["blocks"][0]["mlp"]["fc_kernel"],
        rtol=1e-6,
    )
    for leaf in (
        updates["ln_f"]["scale"],
        updates["ln_f"]["bias"],
        updates["blocks"][1]["attn"]["o_bias"],
    ):
        assert float(jnp.abs(leaf).max()) == 0.0


def test_adam_has_bias_correction():
    cfg = from_dict({**ARCH, "lr": 1e-2, "lr_decay": "constant", "gradient_clipping": 0})
    _, updates = _one_update(cfg, 0.5)
    # corrected first step: m_hat / sqrt(v_hat) = 1, so every update is -lr (BERT's Adam: -0.45 lr)
    np.testing.assert_allclose(updates["ln_f"]["bias"], -1e-2, rtol=1e-4)


def test_adafactor_follows_the_schedule():
    cfg = from_dict(
        {**ARCH, "opt_name": "adafactor", "lr": 1e-2, "warmup_steps": 4, "train_steps": 10}
    )
    params = gpt_neo.init_params(cfg, 0)
    optimizer = make_optimizer(cfg)
    grads = jax.tree.map(jnp.ones_like, params)
    state = optimizer.init(params)
    first, state = optimizer.update(grads, state, params)  # step 0: warmup lr is 0
    second, _ = optimizer.update(grads, state, params)
    assert float(jnp.abs(first["wte"]).max()) == 0.0 and float(jnp.abs(second["wte"]).max()) > 0


# ---- the step ------------------------------------------------------------------------------


def _batch(cfg, seed=0):
    return np.random.default_rng(seed).integers(0, 258, (8, cfg.n_ctx + 1)).astype(np.int32)


def test_reported_loss_is_cross_entropy_with_z_loss_apart(tmp_path):
    cfg = from_dict({**ARCH, "train_batch_size": 8, "mesh_shape": "x:8", "z_loss": 0.01})
    trainer = Trainer(cfg, gpt_neo.make_mesh(cfg))
    state = trainer.init_state(0)
    params = jax.device_get(state["params"])
    tokens = _batch(cfg)
    with jax.set_mesh(trainer.mesh):
        _, metrics = trainer.step(state, trainer.place(tokens))
    logits = np.asarray(gpt_neo.apply(cfg, params, tokens[:, :-1]), np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = np.mean(lse - np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0])
    assert float(metrics["loss"]) == pytest.approx(ce, rel=1e-5)
    assert float(metrics["z_loss"]) == pytest.approx(0.01 * np.mean(lse**2), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("param_layout", ["", "embd:x"], ids=["replicated", "fsdp"])
def test_microbatched_gradients_equal_the_unsplit_batch(param_layout):
    # FSDP runs the microbatches through an optimization barrier (gpt_neo.training.step.gradients)
    layout = {"mesh_shape": "x:4,y:2", "layout": "batch:x,heads:y", "param_layout": param_layout}
    cfg = from_dict({**ARCH, "train_batch_size": 8, **layout})
    trainer = Trainer(cfg.replace(tokens_per_mb_per_replica=32), gpt_neo.make_mesh(cfg))
    assert trainer.n_micro == 2  # 1 sequence per microbatch, 2 per replica
    state = trainer.init_state(0)
    rng = jax.random.key(0)
    with jax.set_mesh(trainer.mesh):
        batch = trainer.place(_batch(cfg))
        whole = jax.jit(lambda p, b: gradients(cfg, p, b, rng))(state["params"], batch)
        split = jax.jit(lambda p, b: gradients(cfg, p, b, rng, 2))(state["params"], batch)
    assert float(split[1]["loss"]) == pytest.approx(float(whole[1]["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(whole[0]), jax.tree.leaves(split[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # float32 reassociation


def test_the_step_reads_the_data_parallel_split_from_the_mesh_it_is_traced_under():
    cfg = from_dict({**ARCH, "mesh_shape": "x:4,y:2", "layout": "batch:x,heads:y"})
    assert context_data_parallel(cfg) == 1  # no mesh: one piece
    with jax.set_mesh(gpt_neo.make_mesh(cfg)):
        assert context_data_parallel(cfg) == 4
        assert context_data_parallel(cfg.replace(layout="batch:x+y")) == 8


def numpy_cross_entropy(logits, targets, counted):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    token_loss = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return (token_loss * counted).sum() / counted.sum()


def padded_batch(cfg, pad):
    """Rows padded at their ends with `pad`, different lengths per row (as records shorter than
    n_ctx + 1 padded up to it)."""
    tokens = _batch(cfg, seed=3)
    for row, keep in zip(tokens, [33, 30, 20, 33, 5, 12, 33, 2], strict=True):
        row[keep:] = pad
    return tokens


def test_padding_targets_are_left_out_of_the_loss():
    cfg = from_dict({**ARCH, "z_loss": 0.0, "padding_id": 319})
    params = gpt_neo.init_params(cfg, 0)
    tokens = padded_batch(cfg, 319)
    logits = gpt_neo.apply(cfg, params, tokens[:, :-1])
    counted = tokens[:, 1:] != 319
    assert 0.3 < counted.mean() < 0.9
    ce = loss_fn(cfg, params, jnp.asarray(tokens), None)[1]["loss"]
    assert float(ce) == pytest.approx(numpy_cross_entropy(logits, tokens[:, 1:], counted), rel=1e-5)
    all_targets = loss_fn(cfg.replace(padding_id=None), params, jnp.asarray(tokens), None)[1][
        "loss"
    ]
    everything = numpy_cross_entropy(logits, tokens[:, 1:], np.ones_like(counted))
    assert float(all_targets) == pytest.approx(everything, rel=1e-5)


@pytest.mark.slow
def test_microbatches_with_uneven_padding_equal_the_unsplit_batch():
    # each microbatch has its own number of real targets: the loss is normalised by the
    # whole batch's count, not averaged per microbatch
    cfg = from_dict(
        {
            **ARCH,
            "train_batch_size": 8,
            "mesh_shape": "x:4,y:2",
            "layout": "batch:x",
            "padding_id": 319,
        }
    )
    mesh = gpt_neo.make_mesh(cfg)
    trainer = Trainer(cfg.replace(tokens_per_mb_per_replica=32), mesh)
    assert trainer.n_micro == 2
    params = trainer.init_state(0)["params"]
    with jax.set_mesh(mesh):
        batch = trainer.place(padded_batch(cfg, 319))
        whole = jax.jit(lambda p, b: gradients(cfg, p, b, None))(params, batch)
        split = jax.jit(lambda p, b: gradients(cfg, p, b, None, 2))(params, batch)
    assert float(split[1]["loss"]) == pytest.approx(float(whole[1]["loss"]), rel=1e-6)
    for a, b in zip(jax.tree.leaves(whole[0]), jax.tree.leaves(split[0]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_log_grads_reports_each_layers_gradient_norm():
    cfg = from_dict({**ARCH, "train_batch_size": 8, "mesh_shape": "x:8", "log_grads": True})
    trainer = Trainer(cfg, gpt_neo.make_mesh(cfg))
    state = trainer.init_state(0)
    tokens = _batch(cfg)
    grads = jax.device_get(
        jax.jit(lambda p, b: gradients(cfg, p, b, None)[0])(state["params"], tokens)
    )
    with jax.set_mesh(trainer.mesh):
        _, metrics = trainer.step(state, trainer.place(tokens))
    parts = {"wte": grads["wte"], "wpe": grads["wpe"], "ln_f": grads["ln_f"]}
    parts |= {f"blocks/{i}": block for i, block in enumerate(grads["blocks"])}
    assert sorted(k for k in metrics if k.startswith("grad_norm/")) == sorted(
        f"grad_norm/{name}" for name in parts
    )
    for name, tree in parts.items():
        flat = np.concatenate([np.ravel(leaf).astype(np.float64) for leaf in jax.tree.leaves(tree)])
        assert float(metrics[f"grad_norm/{name}"]) == pytest.approx(np.linalg.norm(flat), rel=1e-5)
    squares = sum(float(metrics[f"grad_norm/{name}"]) ** 2 for name in parts)
    assert squares == pytest.approx(float(metrics["grad_norm"]) ** 2, rel=1e-5)
    quiet = Trainer(cfg.replace(log_grads=False), trainer.mesh)
    with jax.set_mesh(trainer.mesh):
        _, metrics = quiet.step(quiet.init_state(0), quiet.place(tokens))
    assert not [k for k in metrics if k.startswith("grad_norm/")]


def test_loss_fn_without_rng_is_deterministic_and_finite():
    cfg = from_dict(ARCH)
    params = gpt_neo.init_params(cfg, 0)
    total, metrics = loss_fn(cfg, params, jnp.asarray(_batch(cfg)), None)
    ce, z = metrics["loss"], metrics["z_loss"]
    assert (
        float(total) == pytest.approx(float(ce) + float(z)) and abs(float(ce) - np.log(320)) < 0.5
    )


# ---- the loop ------------------------------------------------------------------------------


@pytest.mark.process
def test_training_runs_logs_and_saves_then_reports_complete(tmp_path, dataset, capsys):
    model = run_config(
        tmp_path, dataset, train_steps=20, lr_decay_end=20, eval_steps=2, eval_batch_size=8
    )
    assert main(["--model", model, "--steps_per_checkpoint", "10"]) == 0
    out = capsys.readouterr().out
    assert (
        "step 20/20 | loss" in out
        and "tok/s | MFU" in out
        and "ETA" in out
        and "eval at step 20" in out
    )
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5  # it learns
    assert all(0.0 <= r["input_wait"] <= 1.0 for r in train)  # share of the interval
    assert evals[-1]["eval_perplexity"] == pytest.approx(np.exp(evals[-1]["eval_loss"]))
    assert (run / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = parse_report((run / "report.html").read_text())
    shown = [
        (int(step), float(value)) for step, _, name, value in report["rows"] if name == "eval_loss"
    ]
    assert shown == [(r["step"], pytest.approx(r["eval_loss"], abs=1e-4)) for r in evals]
    [image] = report["images"]
    assert base64.b64decode(image.split(",", 1)[1]) == (run / "loss_curve.png").read_bytes()
    assert any((run / "tensorboard").iterdir())
    sacred_run = run / "sacred" / "1"
    assert json.loads((sacred_run / "config.json").read_text())["n_embd"] == 32
    sacred_losses = json.loads((sacred_run / "metrics.json").read_text())["loss"]
    assert sacred_losses["steps"][-1] == 20 and sacred_losses["values"][-1] == pytest.approx(
        train[-1]["loss"]
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10",
        "20",
    ]
    assert main(["--model", model]) == 0
    assert "training is complete: step 20 of 20" in capsys.readouterr().out


@pytest.mark.process
def test_log_grads_goes_to_metrics_jsonl_and_tensorboard(tmp_path, dataset):
    from gpt_neo.storage import tf

    model = run_config(tmp_path, dataset, train_steps=2, iterations=1, log_grads=True)
    assert main(["--model", model, "--steps_per_checkpoint", "2"]) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    names = {
        "grad_norm/wte",
        "grad_norm/wpe",
        "grad_norm/ln_f",
        "grad_norm/blocks/0",
        "grad_norm/blocks/1",
    }
    for record in records:
        assert names <= record.keys()
        squares = sum(record[name] ** 2 for name in names)
        assert squares == pytest.approx(record["grad_norm"] ** 2, rel=1e-4)
    t = tf()
    values = {
        value.tag: value
        for path in (run / "tensorboard").iterdir()
        for event in t.compat.v1.train.summary_iterator(str(path))
        for value in event.summary.value
    }
    assert names <= values.keys()
    text = t.make_ndarray(values["config"].tensor).item().decode()  # TensorBoard's text tab
    logged = json.loads(text.removeprefix("```json\n").removesuffix("\n```"))
    written = json.loads(Path(model).read_text())
    assert {key: logged[key] for key in written} == written and logged["log_grads"] is True


@pytest.mark.process
def test_resuming_continues_exactly_and_on_another_mesh(tmp_path, dataset):
    full = run_config(tmp_path / "full", dataset, res_dropout=0.1)
    assert main(["--model", full, "--steps_per_checkpoint", "4"]) == 0
    reference = final_params(tmp_path / "full" / "run", 8)

    half = run_config(tmp_path / "half", dataset, res_dropout=0.1, train_steps=4)
    assert main(["--model", half, "--steps_per_checkpoint", "4"]) == 0
    assert main(["--model", half, "--set", "train_steps=8", "--steps_per_checkpoint", "4"]) == 0
    resumed = final_params(tmp_path / "half" / "run", 8)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)  # bit for bit

    moved = run_config(tmp_path / "moved", dataset, res_dropout=0.1, train_steps=4)
    assert main(["--model", moved, "--steps_per_checkpoint", "4"]) == 0
    other_mesh = [
        "train_steps=8",
        "mesh_shape=x:2,y:4",
        "layout=batch:x,heads:y,intermediate_expanded:y",
    ]
    assert main(["--model", moved, "--set", *other_mesh, "--steps_per_checkpoint", "4"]) == 0
    for a, b in zip(
        jax.tree.leaves(reference),
        jax.tree.leaves(final_params(tmp_path / "moved" / "run", 8)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=2e-5)  # same math, other reduction order


@pytest.mark.process
def test_a_checkpoint_of_another_model_is_refused(tmp_path, dataset, capsys):
    model = run_config(tmp_path, dataset, train_steps=2)
    assert main(["--model", model, "--steps_per_checkpoint", "2"]) == 0
    assert main(["--model", model, "--set", "n_embd=64", "train_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "written for another model (n_embd: checkpoint 32, config 64)" in err
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


@pytest.mark.process
def test_a_rotary_model_resumes_at_another_context_length(tmp_path, dataset):
    """No position table: n_ctx fixes no parameter, so a run may lengthen its sequences (as
    continued pretraining of an imported Llama or Qwen does)."""
    model = run_config(tmp_path, dataset, train_steps=2, rotary_emb=True)
    assert main(["--model", model, "--steps_per_checkpoint", "2"]) == 0
    longer = ["--set", f"n_ctx={2 * SMALL_RUN['n_ctx']}", "train_steps=4"]
    assert main(["--model", model, *longer, "--steps_per_checkpoint", "2"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "4").is_dir()


@pytest.mark.process
def test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, dataset, capsys
):
    model = run_config(tmp_path, dataset, train_steps=2, iterations=1, lr_decay="constant")
    assert main(["--model", model, "--steps_per_checkpoint", "2"]) == 0
    code = main(
        [
            "--model",
            model,
            "--set",
            "train_steps=8",
            "lr=1e30",
            "gradient_clipping=0",
            "--steps_per_checkpoint",
            "2",
        ]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "is not finite" in err and "The last checkpoint is intact" in err
    step = int(err.split("error: step ")[1].split(":")[0])
    assert 3 <= step <= 4  # the first step after the restore that sees the blown-up weights
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert (
        kept == ["2"] and np.isfinite(jax.tree.leaves(final_params(tmp_path / "run", 2))[0]).all()
    )


def test_bad_run_settings_exit_2(tmp_path, dataset, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--model", run_config(tmp_path, dataset, model_path=str(blocker / "run"))]) == 2
    assert "not writable" in capsys.readouterr().err
    missing = run_config(
        tmp_path, dataset, datasets=[["no_such_dataset", 1, "documents_random", 1.0]]
    )
    assert main(["--model", missing]) == 2
    assert "no_such_dataset" in capsys.readouterr().err
    assert main(["--model", run_config(tmp_path, dataset, model_path=None)]) == 2
    assert "set model_path" in capsys.readouterr().err


@pytest.mark.process
def test_out_of_memory_is_explained_with_the_memory_estimate(
    tmp_path, dataset, monkeypatch, capsys
):
    from gpt_neo.training import trainer
    from gpt_neo.training.memory import memory_per_device

    def exhausted(self, seed):
        raise jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 7.00GiB"
        )

    monkeypatch.setattr(trainer.Trainer, "init_state", exhausted)
    model = run_config(tmp_path, dataset)
    assert main(["--model", model]) == 2
    err = capsys.readouterr().err
    cfg = gpt_neo.load_config(model)
    need = sum(memory_per_device(cfg).values()) / 2**30
    assert (
        "out of device memory (RESOURCE_EXHAUSTED" in err
        and f"need {need:.2f} GiB per device" in err
    )
    assert not (tmp_path / "run" / "checkpoints" / "0").exists()


@pytest.mark.process
def test_new_deletes_model_path_after_confirmation(tmp_path, dataset, monkeypatch, capsys):
    model = run_config(tmp_path, dataset, train_steps=2)
    assert main(["--model", model, "--steps_per_checkpoint", "2"]) == 0
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(SystemExit):
        main(["--model", model, "--new"])
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert main(["--model", model, "--new", "--yes", "--steps_per_checkpoint", "2"]) == 0
    assert "training from step 0" in capsys.readouterr().out


@pytest.mark.process
def test_evaluation_time_is_not_counted_as_training_time(tmp_path, dataset, monkeypatch):
    from gpt_neo.training import loop

    def slow_evaluate(*args):
        time.sleep(2.0)  # far longer than two steps of this model
        return {"eval_loss": 1.0, "eval_perplexity": math.e}

    monkeypatch.setattr(loop, "evaluate", slow_evaluate)
    model = run_config(tmp_path, dataset, train_steps=4, eval_steps=1)
    assert main(["--model", model, "--steps_per_checkpoint", "2"]) == 0
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    after_eval = next(r for r in records if r.get("step") == 4 and "loss" in r)
    tokens = 2 * SMALL_RUN["train_batch_size"] * SMALL_RUN["n_ctx"]
    assert tokens / after_eval["tokens_per_s"] < 1.0  # the interval's seconds: no 2 s of eval
    assert sum(1 for r in records if "eval_loss" in r) == 2  # the evaluations did run
