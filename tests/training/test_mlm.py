"""Masked-LM training (`mlm_training`): BERT-style masking, the loss on masked positions only,
training end to end, --eval's masked-token figures, and the modes a masked LM refuses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt_neo
from gpt_neo.errors import ConfigError
from gpt_neo.training.objectives import masked_example
from gpt_neo.training.step import gradients, loss_fn
from main import main
from tests.support.helpers import SMALL_RUN, perturbed_params, tiny_config, write_text_dataset

MLM = dict(mlm_training=True, mlm_mask_id=5, mlm_mask_ignore_ids=[7, 8])


def _records(cfg, batch, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.n_vocab, (batch, cfg.n_ctx + 1)).astype(np.int32)


def test_masking_follows_the_configured_fractions():
    cfg = tiny_config(
        n_ctx=256, mlm_mask_prob=0.3, mlm_same_token_prob=0.2, mlm_random_token_prob=0.1, **MLM
    )
    records = _records(cfg, 64)
    records[:, ::17] = 7  # an ignored id: never selected
    example = masked_example(cfg, jnp.asarray(records), jax.random.key(3))
    inputs, targets, weights = map(np.asarray, example[:3])
    assert example.segments is None  # masked LMs read unpacked rows
    original = records[:, : cfg.n_ctx]
    selected = weights == 1.0
    np.testing.assert_array_equal(targets, original)  # BERT: targets are the original tokens
    assert not selected[original == 7].any()
    maskable = original != 7
    assert selected[maskable].mean() == pytest.approx(0.3, abs=0.01)
    np.testing.assert_array_equal(inputs[~selected], original[~selected])
    masked = inputs[selected] == 5
    kept = (inputs[selected] == original[selected]) & ~masked
    changed = ~masked & ~kept
    # 70% masked, 20% kept, 10% random (a random draw rarely equals the original: 1/128)
    assert masked.mean() == pytest.approx(0.7, abs=0.02)
    assert kept.mean() == pytest.approx(0.2, abs=0.02)
    assert changed.mean() == pytest.approx(0.1, abs=0.02)


def test_cls_token_starts_every_example_and_is_never_selected():
    cfg = tiny_config(mlm_cls_token_id=9, mlm_mask_prob=1.0, **MLM)
    records = _records(cfg, 4)
    records[np.isin(records, [7, 8, 9])] = 10  # ids that are never selected
    example = masked_example(cfg, jnp.asarray(records), jax.random.key(0))
    targets, weights = np.asarray(example.targets), np.asarray(example.weights)
    assert (targets[:, 0] == 9).all() and (weights[:, 0] == 0).all()
    np.testing.assert_array_equal(targets[:, 1:], records[:, : cfg.n_ctx - 1])
    assert (weights[:, 1:] == 1).all()  # mask_prob 1: every other position


@pytest.mark.slow
def test_loss_and_accuracy_count_the_masked_positions_only():
    """Against a NumPy cross-entropy over the logits of the masked inputs."""
    cfg = tiny_config(**MLM, z_loss=0.0)
    params = perturbed_params(cfg)
    records = jnp.asarray(_records(cfg, 4))
    example = masked_example(cfg, records, jax.random.key(1))
    total, metrics = loss_fn(cfg, params, example, None, train=False)
    logits = np.asarray(gpt_neo.apply(cfg, params, example.inputs), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets, weights = np.asarray(example.targets), np.asarray(example.weights)
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    assert 0 < weights.sum() < weights.size
    assert float(total) == pytest.approx((nll * weights).sum() / weights.sum(), rel=1e-5)
    hits = (logits.argmax(-1) == targets) * weights
    assert float(metrics["accuracy"]) == pytest.approx(hits.sum() / weights.sum(), abs=1e-6)


@pytest.mark.slow
def test_microbatches_share_the_whole_batch_mask():
    cfg = tiny_config(**MLM, mesh_shape="x:4,y:2", layout="batch:x,heads:y")
    params = perturbed_params(cfg.replace(mesh_shape=None, layout=None))
    batch = jnp.asarray(_records(cfg, 8))
    rng = jax.random.key(4)
    with jax.set_mesh(gpt_neo.make_mesh(cfg)):
        whole = jax.jit(lambda p, b: gradients(cfg, p, b, rng))(params, batch)
        split = jax.jit(lambda p, b: gradients(cfg, p, b, rng, 2))(params, batch)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_a_masked_lm_refuses_to_generate():
    cfg = tiny_config(**MLM)
    with pytest.raises(ConfigError, match="masked LM"):
        gpt_neo.generate(cfg, perturbed_params(cfg), [[1, 2]], max_new_tokens=2)


@pytest.fixture(scope="module")
def trained_mlm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlm")
    dataset = write_text_dataset(folder / "text")
    config = {
        **SMALL_RUN,
        "attention_types": ["global", "local", "linear", "global"],
        "n_layer": 4,
        "mlm_training": True,
        "mlm_mask_id": 300,
        "mlm_cls_token_id": 301,
        "mlm_mask_ignore_ids": [256],
        "train_steps": 60,
        "eval_steps": 4,
        "datasets": [[dataset, 1, "documents_random", 1.0]],
        "model_path": str(folder / "run"),
    }
    model = folder / "mlm.json"
    model.write_text(json.dumps(config))
    assert main(["--model", str(model), "--steps_per_checkpoint", "20"]) == 0
    return folder, str(model)


def test_masked_lm_learns_to_fill_in_masked_tokens(trained_mlm):
    folder, _ = trained_mlm
    lines = [
        json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [line for line in lines if "eval_accuracy" in line]
    assert [e["step"] for e in evals] == [20, 40, 60]
    # 27 symbols in the text: a uniform guess scores about 4%
    assert evals[-1]["eval_accuracy"] > max(0.15, 1.5 * evals[0]["eval_accuracy"])
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_eval_reports_masked_token_loss_and_accuracy(trained_mlm, capsys):
    folder, model = trained_mlm
    assert main(["--model", model, "--eval"]) == 0
    results = json.loads((folder / "run" / "eval_60.json").read_text())["validation"]
    history = [
        json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    at_60 = next(line for line in history if line.get("step") == 60 and "eval_accuracy" in line)
    # the same eval batches and masks as the evaluation during training
    assert results["accuracy"] == pytest.approx(at_60["eval_accuracy"], abs=1e-6)
    assert results["loss"] == pytest.approx(at_60["eval_loss"], rel=1e-5)
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags", [["--predict"], ["--eval", "--lambada_path", "x.jsonl"]], ids=["predict", "lambada"]
)
def test_generating_and_continuation_tasks_are_refused(trained_mlm, capsys, flags):
    _, model = trained_mlm
    assert main(["--model", model, *flags]) == 2
    err = capsys.readouterr().err
    assert "masked LM" in err and len(err.strip().splitlines()) == 1
