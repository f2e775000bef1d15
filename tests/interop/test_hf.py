"""Hugging Face GPT-Neo parity: import, export, reload in transformers, same logits."""

import json

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import gpt_neo
from gpt_neo.errors import ConfigError, DataError
from gpt_neo.interop.hf import compress_attention_types, export_hf, hf_state_dict, import_hf
from tests.support.helpers import (
    HF_CONFIG,
    assert_gradients_equal_transformers,
    hf_logits,
    random_hf_model,
    random_tokens,
    tiny_config,
)

PARITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    model = random_hf_model(folder, **HF_CONFIG)
    return folder, model


@pytest.mark.slow
def test_imported_logits_match_transformers(hf_folder):
    folder, model = hf_folder
    cfg, params = import_hf(folder)
    assert cfg.attention_types == ("global", "local") * 2 and cfg.local_attention_radius == 7
    assert cfg.activation_function == "gelu"
    tokens = random_tokens(cfg, batch=3, length=64)
    ours = np.asarray(gpt_neo.apply(cfg, params, tokens))
    diff = np.abs(ours - hf_logits(model, tokens)).max()
    print(f"max abs logit diff vs transformers: {diff:.2e}")
    assert diff < PARITY_ATOL


def test_training_gradients_match_transformers(hf_folder):
    """The loss and every parameter's gradient equal PyTorch autograd through HF GPT-Neo's
    forward on the same weights (the tied wte gathers both the embedding and head terms)."""
    folder, model = hf_folder
    cfg, params = import_hf(folder, overrides={"z_loss": 0.0})
    tokens = random_tokens(cfg, batch=2, length=64, seed=2)
    assert_gradients_equal_transformers(cfg, params, model, tokens)


def test_exported_folder_reloads_in_transformers_with_the_same_logits(hf_folder, tmp_path):
    from transformers import GPTNeoForCausalLM

    folder, model = hf_folder
    cfg, params = import_hf(folder)
    out = export_hf(cfg, params, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = GPTNeoForCausalLM.from_pretrained(out).eval()
    tokens = random_tokens(cfg, batch=2, length=64, seed=1)
    ours = np.asarray(gpt_neo.apply(cfg, params, tokens))
    assert np.abs(hf_logits(reloaded, tokens) - ours).max() < PARITY_ATOL
    assert np.abs(hf_logits(reloaded, tokens) - hf_logits(model, tokens)).max() < 1e-5


def test_export_of_our_own_initialised_model_loads_in_transformers(tmp_path):
    from transformers import GPTNeoForCausalLM

    cfg = tiny_config(attention_types=["global", "local", "local", "global"], n_ctx=40)
    params = gpt_neo.init_params(cfg, seed=4)
    reloaded = GPTNeoForCausalLM.from_pretrained(export_hf(cfg, params, tmp_path / "ours")).eval()
    tokens = random_tokens(cfg, batch=2)
    diff = np.abs(hf_logits(reloaded, tokens) - np.asarray(gpt_neo.apply(cfg, params, tokens)))
    assert diff.max() < PARITY_ATOL


def test_pytorch_bin_folders_load_with_weights_only(tmp_path):
    model = random_hf_model(tmp_path, safetensors=False, seed=2, **HF_CONFIG)
    assert (tmp_path / "pytorch_model.bin").exists()
    cfg, params = import_hf(tmp_path)
    tokens = random_tokens(cfg, batch=2, length=30)
    assert (
        np.abs(np.asarray(gpt_neo.apply(cfg, params, tokens)) - hf_logits(model, tokens)).max()
        < PARITY_ATOL
    )


def test_activation_is_carried_through_import(tmp_path):
    model = random_hf_model(tmp_path, activation_function="relu", **HF_CONFIG)
    cfg, params = import_hf(tmp_path)
    assert cfg.activation_function == "relu"
    tokens = random_tokens(cfg, batch=1, length=20)
    assert (
        np.abs(np.asarray(gpt_neo.apply(cfg, params, tokens)) - hf_logits(model, tokens)).max()
        < PARITY_ATOL
    )


def test_run_keys_apply_and_architecture_keys_are_ignored_with_a_warning(hf_folder, capsys):
    folder, _ = hf_folder
    cfg, _ = import_hf(folder, overrides={"n_layer": 2, "n_ctx": 64, "lr": 0.5, "n_head": 9})
    assert (cfg.n_layer, cfg.n_head, cfg.lr) == (
        HF_CONFIG["num_layers"],
        HF_CONFIG["num_heads"],
        0.5,
    )
    # n_ctx equals the folder's: not a change, not named
    assert (
        "the architecture comes from the folder; ignoring n_head, n_layer"
        in capsys.readouterr().err
    )


def test_import_places_params_sharded_on_a_mesh(hf_folder):
    folder, model = hf_folder
    overrides = {"mesh_shape": "x:2,y:4", "layout": "batch:x,heads:y"}
    mesh = gpt_neo.make_mesh(import_hf(folder, overrides=overrides)[0])
    cfg, params = import_hf(folder, overrides=overrides, mesh=mesh)
    # stacked (two stacks of two layers): the layers axis unsplit, each layer's q by heads
    assert params["stacks"][0]["attn"]["q"].sharding.spec == P(None, None, "y", None)
    tokens = random_tokens(cfg, batch=4, length=64)
    diff = np.abs(np.asarray(gpt_neo.apply(cfg, params, tokens)) - hf_logits(model, tokens))
    assert diff.max() < PARITY_ATOL


def test_an_odd_vocabulary_split_four_ways_imports_padded_and_exports_whole(hf_folder, tmp_path):
    folder, model = hf_folder
    overrides = {"mesh_shape": "x:2,y:4", "layout": "batch:x,vocab:y"}
    mesh = gpt_neo.make_mesh(import_hf(folder, overrides=overrides)[0])
    cfg, params = import_hf(folder, overrides=overrides, mesh=mesh)
    assert params["wte"].shape == (256, 64) and params["wte"].sharding.spec == P("y", None)
    assert not np.asarray(params["wte"])[211:].any()
    tokens = random_tokens(cfg, batch=4, length=64)
    logits = np.asarray(gpt_neo.apply(cfg, params, tokens))
    assert logits.shape == (4, 64, 211)
    assert np.abs(logits - hf_logits(model, tokens)).max() < PARITY_ATOL
    exported = hf_state_dict(cfg, params)["transformer.wte.weight"]
    np.testing.assert_array_equal(exported, model.transformer.wte.weight.detach().numpy())


def test_attention_types_compress_to_the_shortest_repeat():
    assert compress_attention_types(("global", "local") * 3) == [[["global", "local"], 3]]
    assert compress_attention_types(("global", "global", "local")) == [
        [["global", "global", "local"], 1]
    ]


def test_configs_hf_cannot_express_are_refused_with_the_offending_keys(tmp_path):
    cfg = tiny_config(activation_function="snake")  # also has linear and none layers
    with pytest.raises(ConfigError) as err:
        export_hf(cfg, gpt_neo.init_params(cfg, 0), tmp_path / "x")
    assert "['linear', 'none']" in str(err.value) and "'snake'" in str(err.value)
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_non_empty_directory_unless_forced(tmp_path):
    cfg = tiny_config(attention_types=["global"] * 4)
    params = gpt_neo.init_params(cfg, 0)
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        export_hf(cfg, params, tmp_path)
    export_hf(cfg, params, tmp_path, force=True)
    assert (tmp_path / "keep.txt").read_text() == "user data"
    assert json.loads((tmp_path / "config.json").read_text())["num_layers"] == 4


def test_a_folder_that_is_not_gpt_neo_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ConfigError, match="model_type is 'gpt2'; the folders that import are"):
        import_hf(tmp_path)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        import_hf(tmp_path / "missing")


def test_a_folder_without_weights_is_refused(tmp_path, hf_folder):
    folder, _ = hf_folder
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(DataError, match=r"no model\.safetensors"):
        import_hf(tmp_path)
