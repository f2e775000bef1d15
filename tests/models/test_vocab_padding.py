"""A vocabulary its mesh axes do not divide is padded: GPT-Neo's 50257 split two ways, an odd
vocabulary split four ways. The padding never shows: logits, losses, gradients, training,
sampling and exports equal the unpadded model's, and checkpoints move between paddings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import gpt_neo
from gpt_neo.interop.hf import export_hf
from gpt_neo.mesh import padded_vocab
from gpt_neo.training.checkpoint.checkpointer import Checkpointer, load_params
from gpt_neo.training.step import gradients
from gpt_neo.training.trainer import Trainer
from tests.support.helpers import hf_logits, random_tokens, tiny_config, train_steps

SEED = 5
GPT_NEO = {"n_vocab": 50257, "n_layer": 2, "attention_types": ["global", "local"], "n_ctx": 16}
GPT_NEO_SPLIT = {"mesh_shape": "x:4,y:2", "layout": "batch:x,vocab:y,heads:y"}
ODD = {
    "n_vocab": 1001,
    "n_layer": 2,
    "attention_types": ["global", "local"],
    "mesh_shape": "x:2,y:4",
    "layout": "batch:x,vocab:y,heads:y",
}
RUN = {"train_batch_size": 8, "train_steps": 3, "lr": 1e-2, "weight_decay": 0.1}


def unpadded(cfg):
    return cfg.replace(mesh_shape="x:1", layout="batch:x", param_layout=None)


def single_device_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))


@pytest.mark.slow
@pytest.mark.parametrize("keys, rows", [(GPT_NEO | GPT_NEO_SPLIT, 50304), (ODD, 1024)])
def test_padded_model_equals_the_unpadded_one(keys, rows):
    cfg = tiny_config(**keys, **RUN)
    assert padded_vocab(cfg) == rows and padded_vocab(unpadded(cfg)) == cfg.n_vocab
    params = gpt_neo.init_params(cfg, SEED, gpt_neo.make_mesh(cfg))
    ref = gpt_neo.init_params(unpadded(cfg), SEED)
    wte = np.asarray(params["wte"])
    assert wte.shape == (rows, cfg.n_embd)
    np.testing.assert_array_equal(wte[: cfg.n_vocab], ref["wte"])  # the same init, then zeros
    assert not wte[cfg.n_vocab :].any()

    tokens = random_tokens(cfg, batch=8, length=cfg.n_ctx + 1)
    logits = gpt_neo.apply(cfg, params, tokens[:, :-1])
    assert logits.shape == (8, cfg.n_ctx, cfg.n_vocab)
    np.testing.assert_allclose(logits, gpt_neo.apply(unpadded(cfg), ref, tokens[:, :-1]), atol=1e-5)

    mesh = gpt_neo.make_mesh(cfg)
    with jax.set_mesh(mesh):
        grads, metrics = jax.jit(lambda p, t: gradients(cfg, p, t, None))(params, tokens)
    ref_grads, ref_metrics = jax.jit(lambda p, t: gradients(unpadded(cfg), p, t, None))(ref, tokens)
    assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)
    np.testing.assert_allclose(np.asarray(grads["wte"])[: cfg.n_vocab], ref_grads["wte"], atol=1e-6)
    assert not np.asarray(grads["wte"])[cfg.n_vocab :].any()  # masked logits: no gradient


@pytest.fixture(scope="module")
def trained():
    """GPT-Neo's vocabulary: a few Adam steps with weight decay, padded (50304 rows over y:2)
    and unpadded (one device)."""
    cfg = tiny_config(**GPT_NEO, **GPT_NEO_SPLIT, **RUN)
    batches = [random_tokens(cfg, batch=8, length=cfg.n_ctx + 1, seed=s) for s in range(3)]
    padded = train_steps(cfg, gpt_neo.make_mesh(cfg), batches, SEED)
    plain = train_steps(unpadded(cfg), single_device_mesh(), batches, SEED)
    return cfg, padded, plain


def test_training_a_padded_model_equals_training_the_unpadded_one(trained):
    cfg, padded, plain = trained
    wte = np.asarray(padded["params"]["wte"])
    assert not wte[cfg.n_vocab :].any()  # zero rows stay zero under Adam and weight decay
    # Adam divides by the root of the squared gradient: where a row's gradient is rounding
    # noise (a token the batches hardly hold), the two reduction orders may move it by up to
    # lr per step, so a few of 3.2M values differ by more than the rest
    np.testing.assert_allclose(wte[: cfg.n_vocab], plain["params"]["wte"], atol=1e-3)
    assert np.mean(np.abs(wte[: cfg.n_vocab] - plain["params"]["wte"]) > 1e-4) < 1e-4
    for a, b in zip(
        jax.tree.leaves(padded["params"]["blocks"]),
        jax.tree.leaves(plain["params"]["blocks"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_padded_rows_are_never_sampled_even_when_their_logits_would_win():
    cfg = tiny_config(**ODD)
    params = gpt_neo.init_params(cfg, SEED, gpt_neo.make_mesh(cfg))
    # Rows past n_vocab are zeros in real checkpoints; make them dominate if they were scored.
    sharding = params["wte"].sharding
    params["wte"] = jax.device_put(params["wte"].at[cfg.n_vocab :].set(5.0), sharding)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    for temperature in (0.0, 1.0, 5.0):
        out = gpt_neo.generate(cfg, params, prompts, max_new_tokens=12, temperature=temperature)
        assert max(max(row) for row in out) < cfg.n_vocab
    logits = gpt_neo.models.gpt.forward(cfg, params, jnp.asarray([[1, 2, 3]])).logits
    assert logits.shape[-1] == 1024 and float(jax.nn.softmax(logits)[..., cfg.n_vocab :].max()) == 0


def test_export_from_a_padded_model_writes_the_true_vocabulary(trained, tmp_path):
    cfg, padded, _ = trained
    out = export_hf(cfg, padded["params"], tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 50257
    tensors = load_file(out / "model.safetensors")
    assert tensors["transformer.wte.weight"].shape == (50257, cfg.n_embd)

    from transformers import GPTNeoForCausalLM

    model = GPTNeoForCausalLM.from_pretrained(out).eval()
    tokens = random_tokens(cfg, batch=4)
    ours = gpt_neo.apply(cfg, padded["params"], tokens)  # the padded model, as exported
    np.testing.assert_allclose(hf_logits(model, tokens), ours, atol=2e-4)


@pytest.mark.parametrize("direction", ["padded -> unpadded", "unpadded -> padded"])
def test_a_checkpoint_restores_under_another_padding(trained, tmp_path, direction):
    cfg, padded, plain = trained
    other = unpadded(cfg).replace(mesh_shape="x:8")  # 50257 rows, split by batch only
    saved_cfg, saved, target_cfg = (cfg, padded, other)
    if direction == "unpadded -> padded":
        saved_cfg, saved, target_cfg = (other, plain, cfg)
    checkpointer = Checkpointer(str(tmp_path), keep=2)
    checkpointer.save(3, saved, {"position": "start"}, saved_cfg.replace(model_path=str(tmp_path)))
    checkpointer.wait()
    target = Trainer(target_cfg, gpt_neo.make_mesh(target_cfg)).abstract_state()
    restored, _ = checkpointer.restore_latest(target_cfg, target)
    checkpointer.close()

    rows = padded_vocab(target_cfg)
    for name in ("params", "opt_state"):
        for got, want in zip(
            jax.tree.leaves(restored[name]), jax.tree.leaves(saved[name]), strict=True
        ):
            got, want = np.asarray(got), np.asarray(want)
            if got.shape[:1] == (rows,) and got.ndim == 2:  # the embedding and its moments
                n = cfg.n_vocab
                np.testing.assert_array_equal(got[:n], want[:n])
                assert not got[n:].any()
            else:
                np.testing.assert_array_equal(got, want)
    # sampling, evaluation and export read the params alone, across the padding too
    params, step = load_params(target_cfg.replace(model_path=str(tmp_path)))
    assert step == 3 and params["wte"].shape == (rows, cfg.n_embd)
    want = np.asarray(saved["params"]["wte"])[: cfg.n_vocab]
    np.testing.assert_array_equal(np.asarray(params["wte"])[: cfg.n_vocab], want)
