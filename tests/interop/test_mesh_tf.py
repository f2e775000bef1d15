"""Checkpoints of the original GPT-Neo (Mesh-TensorFlow) imported: GPT-Neo's own logits and eval
loss (fixture A, trained by GPT-Neo itself), the fixture's NumPy forward pass for synthetic
checkpoints written under GPT-Neo's variable names, each optional parameter's mapping, and the
errors, which name the variable."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

import gpt_neo
from gpt_neo.cli.mesh_tf import main as mesh_tf_main
from gpt_neo.config import expand_attention_types
from gpt_neo.errors import ConfigError, DataError
from gpt_neo.interop.mesh_tf import (
    checkpoint_prefix,
    checkpoint_step,
    import_checkpoint,
    neo_config,
)
from gpt_neo.mesh import make_mesh
from gpt_neo.storage import tf
from main import main
from tests.support.helpers import GPT_NEO_CONFIGS, MESH_TF_CHECKPOINT, restore_params

FIXTURE = MESH_TF_CHECKPOINT
# fp32 against GPT-Neo's fp32 logits: the fixture's README shows 1e-6 catches every usual
# mistake, the erf GELU (2.9e-6) included.
FIXTURE_ATOL = 1e-6
# Synthetic weights give logits up to ~12; fp32 against the float64 reference is off by < 7e-6.
NUMPY_ATOL = 2e-5


@pytest.fixture(scope="module")
def numpy_ref():
    """The fixture's independent NumPy forward pass, `forward(W, cfg, tokens)`."""
    spec = importlib.util.spec_from_file_location("neo_numpy_ref", FIXTURE / "numpy_ref.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Synthetic checkpoints under GPT-Neo's names (models/gpt2/gpt2.py and models/layers.py)

SMALL = {
    "n_embd": 32,
    "n_head": 4,
    "n_layer": 2,
    "n_ctx": 16,
    "n_vocab": 96,
    "attention_types": [[["global", "local"], 1]],
    "local_attention_radius": 5,
    "mesh_shape": "x:1",
    "layout": "batch:x",
}


def neo_weights(model: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with the names and shapes GPT-Neo's graph creates for `model` (a GPT-Neo
    config dict); every gain and bias is away from its init."""
    rng = np.random.default_rng(seed)
    d, h, n_vocab = model["n_embd"], model["n_head"], model["n_vocab"]
    hidden = 4 * d * (2 if model.get("mlp_glu") else 1)

    def normal(*shape, std=0.2):
        return (std * rng.standard_normal(shape)).astype(np.float32)

    w = {"gpt2/wte": normal(n_vocab, d, std=0.5)}
    if model.get("rotary_emb") is None and model.get("axial_pos_emb") is not None:
        for i, rows in enumerate(model["axial_pos_emb"], 1):
            w[f"gpt2/axial_wpe_{i}"] = normal(rows, d)
    elif model.get("rotary_emb") is None:
        w["gpt2/wpe"] = normal(model["n_ctx"], d)

    def norm(scope):
        if model.get("rezero"):
            return
        w[f"{scope}/g"] = 1 + normal(*(() if model.get("scalenorm") else (d,)))
        if not model.get("scalenorm"):
            w[f"{scope}/b"] = normal(d)

    def mlp(scope):
        w[f"{scope}/conv1d_main/c_fc/kernel"] = normal(d, hidden, std=d**-0.5)
        w[f"{scope}/conv1d_main/c_fc/bias"] = normal(hidden)
        w[f"{scope}/conv1d_main/c_proj/kernel"] = normal(4 * d, d, std=(4 * d) ** -0.5)
        w[f"{scope}/conv1d_main/c_proj/bias"] = normal(d)

    for i, kind in enumerate(expand_attention_types(model["attention_types"])):
        # share_parameters: scope "" under gpt2, which TensorFlow writes as gpt2//
        p = "gpt2//" if model.get("share_parameters") else f"gpt2/h{i}/"
        if model.get("macaron"):
            mlp(p + "mlp_macaron")
        if kind != "none":
            norm(p + "norm_1")
            for name in "qkvo":
                w[f"{p}attn/{name}"] = normal(d, d, std=d**-0.5)
            w[p + "attn/compute_output_bias/o_b"] = normal(d)
            if model.get("num_mem_kv") and kind == "global":
                for name in ("mem_k", "mem_v"):
                    w[f"{p}attn/attention/{name}"] = normal(model["num_mem_kv"], h, d // h)
        if model.get("rezero"):
            w[p + "norm_rezero_1/g"] = normal()
            w[p + "norm_rezero_2/g"] = normal()
        norm(p + "norm_2")
        if i in model.get("moe_layers", ()):
            experts, expert_hidden = (
                model["moe_params"][k] for k in ("moe_num_experts", "moe_hidden_size")
            )
            gating = model["moe_params"].get("moe_gating", "top_2")
            w[f"{p}{gating}_gating/kernel"] = normal(d, experts)
            w[p + "wi/kernel"] = normal(experts, d, expert_hidden)
            w[p + "wo/kernel"] = normal(experts, expert_hidden, d)
        else:
            mlp(p + "mlp")
    if model.get("no_weight_tie"):
        w["gpt2/wte_final_linear/conv1d_main/linear_out/kernel"] = normal(d, n_vocab)
        w["gpt2/wte_final_linear/conv1d_main/linear_out/bias"] = normal(n_vocab)
    else:
        w |= {"gpt2/ln_f/g": 1 + normal(d), "gpt2/ln_f/b": normal(d)}
    return w


def adam_slots(weights):
    return {
        f"{n}{s}": np.full_like(a, 0.5) for n, a in weights.items() for s in ("/adam_m", "/adam_v")
    }


def adafactor_slots(weights):
    """mesh_tensorflow/optimize.py: factored second moments of matrices, whole ones otherwise,
    and a first moment with beta1."""
    slots = {}
    for name, a in weights.items():
        if a.ndim >= 2:
            slots[name + "_slot_vr"] = np.ones(a.shape[:-1], np.float32)
            slots[name + "_slot_vc"] = np.ones(a.shape[:-2] + a.shape[-1:], np.float32)
        else:
            slots[name + "_slot_v"] = np.ones_like(a)
        slots[name + "_slot_m"] = np.zeros_like(a)
    return slots


def write_checkpoint(
    folder: Path, model: dict, weights: dict, *, step=7, slots=None, dtype=None
) -> Path:
    """A TF checkpoint as GPT-Neo's Saver writes it (model.ckpt-<step> + `checkpoint`) and the
    GPT-Neo config.json beside it; returns the folder."""
    t = tf()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.cast(t.constant(a), dtype or t.float32) for n, a in weights.items()}
    tensors |= {n: t.constant(a) for n, a in (slots or {}).items()}
    tensors["global_step"] = t.constant(step, t.int64)
    prefix = str(folder / f"model.ckpt-{step}")
    names = sorted(tensors)
    t.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tensors[n] for n in names],
    )
    (folder / "checkpoint").write_text(f'model_checkpoint_path: "model.ckpt-{step}"\n')
    assert sorted(n for n, _ in t.train.list_variables(prefix)) == names  # GPT-Neo's exact names
    (folder / "config.json").write_text(json.dumps(model))
    return folder


def as_float64(weights):
    return {n.replace("//", "/"): a.astype(np.float64) for n, a in weights.items()}


def tokens_for(model, seed=1):
    return np.random.default_rng(seed).integers(0, model["n_vocab"], (2, model["n_ctx"]))


def max_diff_to_numpy(numpy_ref, cfg, params, weights, model):
    tokens = tokens_for(model)
    expected = numpy_ref.forward(as_float64(weights), model, tokens)
    return float(np.abs(np.asarray(gpt_neo.apply(cfg, params, tokens)) - expected).max())


def imported(folder, **kwargs):
    return import_checkpoint(folder, folder / "config.json", **kwargs)


# --------------------------------------------------------------------------------------------
# Fixture A: trained by GPT-Neo itself


def test_gpt_neo_logits_are_reproduced_from_its_checkpoint():
    cfg, params = import_checkpoint(FIXTURE, FIXTURE / "config.json")
    assert cfg.attention_types == ("global", "local") and cfg.local_attention_radius == 16
    assert cfg.activation_function == "gelu" and cfg.precision == "float32"
    ours = np.asarray(gpt_neo.apply(cfg, params, np.load(FIXTURE / "tokens.npy")))
    diff = np.abs(ours - np.load(FIXTURE / "logits.npy")).max()
    print(f"max |logit difference| to GPT-Neo: {diff:.2e}")
    assert diff < FIXTURE_ATOL
    # the trained weights, not an initialisation
    assert np.abs(ours - np.load(FIXTURE / "logits_init.npy")).max() > 0.1


def test_the_fixture_imports_sharded_over_a_mesh():
    overrides = {"mesh_shape": "x:2,y:4", "layout": "batch:x,heads:y,vocab:y"}
    mesh = make_mesh(neo_config(FIXTURE / "config.json", overrides))
    cfg, params = import_checkpoint(
        FIXTURE, FIXTURE / "config.json", overrides=overrides, mesh=mesh
    )
    assert params["blocks"][0]["attn"]["q"].sharding.mesh == mesh
    assert not params["blocks"][0]["attn"]["q"].sharding.is_fully_replicated
    ours = np.asarray(gpt_neo.apply(cfg, params, np.load(FIXTURE / "tokens.npy")))
    assert np.abs(ours - np.load(FIXTURE / "logits.npy")).max() < FIXTURE_ATOL


def test_the_step_is_global_step_and_every_path_form_finds_the_checkpoint():
    # GPT-Neo's Saver names each checkpoint after its global_step
    prefix = str(FIXTURE / "model.ckpt-20")
    for path in (
        FIXTURE,
        f"{FIXTURE}/",
        prefix,
        f"{prefix}.index",
        f"{prefix}.data-00001-of-00002",
    ):
        assert checkpoint_prefix(path) == prefix
        assert checkpoint_step(path) == 20


@pytest.mark.process
def test_command_line_import_continues_training_at_gpt_neo_step(tmp_path, capsys):
    dataset = tmp_path / "neo_fixture_A.json"
    dataset.write_text(
        json.dumps(
            {
                "n_vocab": 512,
                "path": str(FIXTURE / "data" / "A_train_*.tfrecords"),
                "eval_path": str(FIXTURE / "data" / "A_eval_*.tfrecords"),
                "eos_id": 0,
            }
        )
    )
    run = tmp_path / "run"
    args = ["import", str(FIXTURE), "--model", str(FIXTURE / "config.json")]
    args += ["--model_path", str(run), "--override", "mesh_shape=x:4,y:2", "layout=batch:x,heads:y"]
    args += [
        f"datasets=[[{json.dumps(str(dataset))}, null, null, null]]",
        "train_steps=22",
        "iterations=1",
    ]
    assert mesh_tf_main(args) == 0
    out = capsys.readouterr().out
    assert "step 20" in out and "fresh" in out and "60 Adam" in out and "read from the start" in out
    assert mesh_tf_main(args) == 2  # model_path already holds a checkpoint
    assert "already holds checkpoints" in capsys.readouterr().err

    # the checkpoint holds GPT-Neo's trained weights at its step
    cfg = gpt_neo.load_config(str(run / "config.json"))
    params = restore_params(run / "checkpoints" / "20" / "state")
    logits = np.asarray(gpt_neo.apply(cfg, params, np.load(FIXTURE / "tokens.npy")))
    assert np.abs(logits - np.load(FIXTURE / "logits.npy")).max() < FIXTURE_ATOL

    # main.py's eval reads all 8 eval records (2 batches of 4), as GPT-Neo's did at step 20
    assert main(["--model", str(run / "config.json"), "--eval"]) == 0
    neo = json.loads((FIXTURE / "report.jsonl").read_text().splitlines()[0])
    assert neo["ckpt"] == "model.ckpt-20"
    evaluated = json.loads((run / "eval_20.json").read_text())
    assert evaluated["validation"]["loss"] == pytest.approx(neo["cross_entropy"], abs=1e-4)

    # training resumes at step 21, from the trained model's loss (init: 6.25 = ~ln 512)
    assert main(["--model", str(run / "config.json"), "--steps_per_checkpoint", "2"]) == 0
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 21
    assert math.isfinite(first["loss"]) and first["loss"] < 6.0 < math.log(512)
    assert (run / "checkpoints" / "22").is_dir()


def test_the_original_gpt_neo_configs_read_as_gpt_neo_read_them():
    """Every released config says "activation_function", which GPT-Neo's code never read (it
    read activation_fn, default gelu); the PAR config's `none` layers computed x + x."""
    paths = sorted(GPT_NEO_CONFIGS.glob("*.json"))
    assert len(paths) >= 10
    for path in paths:
        raw = json.loads(path.read_text())
        assert "activation_fn" not in raw and raw.get("activation_function") in (None, "gelu")
        cfg = neo_config(path)
        assert cfg.activation_function == "gelu"
        assert cfg.gpt_neo_none_layers == ("none" in cfg.attention_types)
    assert neo_config(GPT_NEO_CONFIGS / "gpt3_PAR_small_256.json").gpt_neo_none_layers


# --------------------------------------------------------------------------------------------
# Synthetic checkpoints: layer kinds, optimizers, dtypes, padding, config quirks


def test_linear_layers_match_numpy_and_adam_slots_are_skipped(tmp_path, numpy_ref):
    model = {**SMALL, "attention_types": [[["global", "linear"], 1]]}
    weights = neo_weights(model)
    cfg, params = imported(write_checkpoint(tmp_path, model, weights, slots=adam_slots(weights)))
    assert max_diff_to_numpy(numpy_ref, cfg, params, weights, model) < NUMPY_ATOL


def test_none_layers_add_the_stream_to_itself_as_gpt_neo_did(tmp_path, numpy_ref):
    model = {**SMALL, "attention_types": [[["global", "none"], 1]]}
    weights = neo_weights(model)
    cfg, params = imported(write_checkpoint(tmp_path, model, weights, slots=adam_slots(weights)))
    assert cfg.gpt_neo_none_layers
    assert max_diff_to_numpy(numpy_ref, cfg, params, weights, model) < NUMPY_ATOL


def test_adafactor_slots_are_skipped(tmp_path, numpy_ref):
    model = {**SMALL, "opt_name": "adafactor"}
    weights = neo_weights(model)
    folder = write_checkpoint(tmp_path, model, weights, slots=adafactor_slots(weights))
    cfg, params = imported(folder)
    assert max_diff_to_numpy(numpy_ref, cfg, params, weights, model) < NUMPY_ATOL


def test_bfloat16_weights_are_read_as_float32(tmp_path):
    model = {**SMALL, "precision": "bfloat16"}
    weights = neo_weights(model)
    cfg, params = imported(write_checkpoint(tmp_path, model, weights, dtype=tf().bfloat16))
    assert cfg.precision == "bfloat16"
    q = params["blocks"][1]["attn"]["q"]
    assert q.dtype == np.float32
    stored = tf().cast(tf().cast(weights["gpt2/h1/attn/q"], tf().bfloat16), tf().float32).numpy()
    np.testing.assert_array_equal(np.asarray(q), stored.reshape(32, 4, 8))
    assert not np.array_equal(stored, weights["gpt2/h1/attn/q"])  # bf16 rounding did happen


def test_an_odd_vocabulary_is_stored_padded_for_the_layout(tmp_path, numpy_ref):
    model = {**SMALL, "n_vocab": 91, "mesh_shape": "x:2,y:4", "layout": "batch:x,vocab:y"}
    weights = neo_weights(model)
    folder = write_checkpoint(tmp_path, model, weights)
    cfg, params = imported(folder, mesh=make_mesh(neo_config(folder / "config.json")))
    wte = np.asarray(params["wte"])
    assert wte.shape == (128, 32) and not wte[91:].any()
    np.testing.assert_array_equal(wte[:91], weights["gpt2/wte"])
    assert max_diff_to_numpy(numpy_ref, cfg, params, weights, model) < NUMPY_ATOL


def test_activation_function_is_ignored_as_gpt_neo_ignored_it(tmp_path, numpy_ref, capsys):
    """GPT-Neo read `activation_fn` only: the official configs' `activation_function` did
    nothing, and the model trained with gelu (which the NumPy reference computes)."""
    model = {**SMALL, "activation_function": "relu"}
    weights = neo_weights(model)
    cfg, params = imported(write_checkpoint(tmp_path, model, weights))
    assert cfg.activation_function == "gelu"
    assert "ignored this file's 'activation_function': 'relu'" in capsys.readouterr().out
    assert max_diff_to_numpy(numpy_ref, cfg, params, weights, model) < NUMPY_ATOL


def test_shared_parameters_are_read_from_gpt_neo_unscoped_names(tmp_path, numpy_ref):
    model = {**SMALL, "share_parameters": True}
    weights = neo_weights(model)
    assert "gpt2//attn/q" in weights  # TensorFlow's name for scope "" under gpt2
    cfg, params = imported(write_checkpoint(tmp_path, model, weights))
    assert len(params["blocks"]) == 1
    # the reference with every layer holding the one set of weights
    per_layer = {n: a for n, a in weights.items() if "//" not in n}
    for name, value in weights.items():
        if "//" in name:
            for i in range(model["n_layer"]):
                per_layer[name.replace("//", f"/h{i}/")] = value
    unshared = {k: v for k, v in model.items() if k != "share_parameters"}
    assert max_diff_to_numpy(numpy_ref, cfg, params, per_layer, unshared) < NUMPY_ATOL


def test_axial_position_tables_give_gpt_neo_position_embedding(tmp_path, numpy_ref):
    model = {**SMALL, "axial_pos_emb": [4, 5]}
    weights = neo_weights(model)
    cfg, params = imported(write_checkpoint(tmp_path, model, weights))
    assert "wpe" not in params
    # GPT-Neo: broadcast both tables to [d1, d2, embd], average, flatten to [d1 * d2, embd]
    first, second = weights["gpt2/axial_wpe_1"], weights["gpt2/axial_wpe_2"]
    wpe = ((first[:, None] + second[None]) / 2).reshape(20, 32)
    reference = {**weights, "gpt2/wpe": wpe}
    assert max_diff_to_numpy(numpy_ref, cfg, params, reference, model) < NUMPY_ATOL


def test_scalenorm_scalar_gains(tmp_path, numpy_ref):
    model = {**SMALL, "scalenorm": True}
    weights = neo_weights(model)
    assert weights["gpt2/h0/norm_1/g"].shape == ()
    cfg, params = imported(write_checkpoint(tmp_path, model, weights))
    # GPT-Neo's scale_norm is its LayerNorm with one gain and no bias
    reference = dict(weights)
    for name in [n for n in weights if "/norm_" in n]:
        reference[name] = np.full(32, weights[name], np.float32)
        reference[name.replace("/g", "/b")] = np.zeros(32, np.float32)
    assert max_diff_to_numpy(numpy_ref, cfg, params, reference, model) < NUMPY_ATOL


def test_rotary_emb_false_meant_rotary_on(tmp_path, capsys):
    """GPT-Neo switched rotary on with any non-null value (`exists()`), false included; such a
    checkpoint has no position embedding at all."""
    model = {**SMALL, "rotary_emb": False}
    weights = neo_weights(model)
    assert not any("wpe" in n for n in weights)
    cfg, params = imported(write_checkpoint(tmp_path, model, weights))
    assert cfg.rotary_emb and cfg.rotary_pct == 1.0 and cfg.rotary_emb_base == 10000.0
    assert "wpe" not in params
    assert "rotary_emb false turned rotary embeddings ON" in capsys.readouterr().out


def test_untied_head_is_transposed_and_has_no_ln_f(tmp_path):
    model = {**SMALL, "no_weight_tie": True}
    weights = neo_weights(model)
    cfg, params = imported(write_checkpoint(tmp_path, model, weights))
    assert cfg.no_weight_tie and cfg.gpt_neo_untied_head and "ln_f" not in params
    head = "gpt2/wte_final_linear/conv1d_main/linear_out/"
    np.testing.assert_array_equal(params["head"]["kernel"], weights[head + "kernel"].T)
    np.testing.assert_array_equal(params["head"]["bias"], weights[head + "bias"])


def test_block_options_read_their_gpt_neo_variables(tmp_path):
    model = {
        **SMALL,
        "attention_types": ["global", "local", "none"],
        "n_layer": 3,
        "rezero": True,
        "macaron": True,
        "mlp_glu": True,
        "num_mem_kv": 3,
    }
    weights = neo_weights(model)
    cfg, params = imported(write_checkpoint(tmp_path, model, weights))
    assert cfg.gpt_neo_none_layers and cfg.num_mem_kv == 3
    block = params["blocks"][0]
    assert "ln_1" not in block and "ln_2" not in block
    for i, b in enumerate(params["blocks"]):
        assert float(b["rezero"]["attn"]) == weights[f"gpt2/h{i}/norm_rezero_1/g"]
        assert float(b["rezero"]["mlp"]) == weights[f"gpt2/h{i}/norm_rezero_2/g"]
    mem = weights["gpt2/h0/attn/attention/mem_k"]
    np.testing.assert_array_equal(block["attn"]["mem_k"], mem)
    assert "mem_k" not in params["blocks"][1]["attn"]  # memory is for global layers only
    # mlp_glu: c_fc is [embd, 8 embd]; GPT-Neo's split gives the value first, the gate second
    c_fc = weights["gpt2/h1/mlp/conv1d_main/c_fc/kernel"]
    np.testing.assert_array_equal(params["blocks"][1]["mlp"]["fc_kernel"], c_fc[:, :128])
    np.testing.assert_array_equal(params["blocks"][1]["mlp"]["gate_kernel"], c_fc[:, 128:])
    bias = weights["gpt2/h2/mlp_macaron/conv1d_main/c_fc/bias"]
    np.testing.assert_array_equal(params["blocks"][2]["mlp_macaron"]["gate_bias"], bias[128:])


@pytest.mark.parametrize("gating", ["top_2", "rand_1"])
def test_moe_layers_read_mesh_tensorflow_expert_weights(tmp_path, gating):
    moe_params = {"moe_num_experts": 4, "moe_hidden_size": 24, "moe_gating": gating}
    model = {**SMALL, "moe_layers": [1], "moe_params": moe_params}
    weights = neo_weights(model)
    _, params = imported(write_checkpoint(tmp_path, model, weights))
    moe = params["blocks"][1]["moe"]
    np.testing.assert_array_equal(moe["router"], weights[f"gpt2/h1/{gating}_gating/kernel"])
    np.testing.assert_array_equal(moe["wi"], weights["gpt2/h1/wi/kernel"])  # [E, embd, H]
    np.testing.assert_array_equal(moe["wo"], weights["gpt2/h1/wo/kernel"])  # [E, H, embd]
    assert "mlp" in params["blocks"][0]


def test_learnable_activations_are_refused_with_the_reason(tmp_path):
    model = {**SMALL, "activation_fn": "aria"}
    folder = write_checkpoint(tmp_path, model, neo_weights(model))
    with pytest.raises(ConfigError, match="random names"):
        imported(folder)


# --------------------------------------------------------------------------------------------
# Bad input: the message names the variable (or the path) and the fix


@pytest.fixture
def small_checkpoint(tmp_path):
    return tmp_path, SMALL, neo_weights(SMALL)


def test_an_unknown_variable_is_named(small_checkpoint):
    folder, model, weights = small_checkpoint
    weights["gpt2/h0/attn/foo"] = np.zeros(3, np.float32)
    with pytest.raises(ConfigError, match="holds the variable gpt2/h0/attn/foo, which the config"):
        imported(write_checkpoint(folder, model, weights))


def test_a_missing_variable_is_named(small_checkpoint):
    folder, model, weights = small_checkpoint
    del weights["gpt2/h1/attn/k"]
    with pytest.raises(ConfigError, match="has no variable gpt2/h1/attn/k, which the config needs"):
        imported(write_checkpoint(folder, model, weights))


def test_a_shape_the_config_does_not_give_is_named(small_checkpoint):
    folder, model, weights = small_checkpoint
    folder = write_checkpoint(folder, model, weights)
    (folder / "config.json").write_text(json.dumps({**model, "n_embd": 16}))
    with pytest.raises(
        ConfigError,
        match=r"gpt2/h0/attn/k has shape \[32, 32\], but the config needs \[16, 16\] \(n_embd 16",
    ):
        imported(folder)


def test_more_layers_than_the_checkpoint_holds(small_checkpoint):
    folder, model, weights = small_checkpoint
    folder = write_checkpoint(folder, model, weights)
    (folder / "config.json").write_text(
        json.dumps({**model, "n_layer": 4, "attention_types": [[["global", "local"], 2]]})
    )
    with pytest.raises(
        ConfigError,
        match=r"no variable gpt2/h2/.*holds 2 layers \(h0..h1\); the config's n_layer is 4",
    ):
        imported(folder)


def test_a_checkpoint_of_another_model_is_refused(small_checkpoint):
    folder, model, _ = small_checkpoint
    folder = write_checkpoint(folder, model, {"encoder/kernel": np.zeros(2, np.float32)})
    with pytest.raises(DataError, match="no gpt2/ variables"):
        imported(folder)


def test_a_directory_without_a_checkpoint_exits_2_naming_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no TensorFlow checkpoint here"):
        checkpoint_prefix(tmp_path / "empty")
    args = ["import", str(tmp_path / "empty"), "--model", str(FIXTURE / "config.json")]
    assert mesh_tf_main([*args, "--model_path", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no TensorFlow checkpoint" in err[0]
