"""Config loading: GPT-Neo keys, merging, overrides, and one clear error per bad input."""

import dataclasses
import json

import pytest

import gpt_neo
from gpt_neo.config import from_dict, load_config, to_dict
from gpt_neo.errors import ConfigError
from tests.support.helpers import GPT_NEO_CONFIGS, REPO

BASE = {"n_embd": 64, "n_head": 4, "n_layer": 2, "n_ctx": 16, "n_vocab": 100}


def write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def error_of(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, data))
    return str(err.value)


ORIGINAL_CONFIGS = sorted(GPT_NEO_CONFIGS.glob("*.json"))


def test_the_original_gpt_neo_configs_are_all_present():
    assert len(ORIGINAL_CONFIGS) == 10


@pytest.mark.parametrize("path", ORIGINAL_CONFIGS, ids=lambda p: p.stem)
def test_every_original_gpt_neo_config_loads(path):
    raw = json.loads(path.read_text())
    cfg = gpt_neo.load_config(path)  # keys, values, and the layout against the model
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (raw["n_layer"], raw["n_embd"], raw["n_head"])
    assert len(cfg.attention_types) == raw["n_layer"]
    assert cfg.activation_function == raw["activation_function"]
    assert cfg.mesh_shape == raw["mesh_shape"] and cfg.layout == raw["layout"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_preset_loads(path):
    assert gpt_neo.load_config(path).n_layer >= 1


def test_attention_types_shorthand_expands_per_layer(tmp_path):
    spec = [[["global", "local"], 2], [["none"], 1]]
    cfg = load_config(write(tmp_path, {**BASE, "n_layer": 5, "attention_types": spec}))
    assert cfg.attention_types == ("global", "local", "global", "local", "none")


def test_par_config_expands_to_five_global_and_fourteen_none_layers():
    cfg = load_config(GPT_NEO_CONFIGS / "gpt3_PAR_small_256.json")
    assert cfg.attention_types[:3] == ("global", "none", "none")
    assert cfg.attention_types.count("global") == 5 and cfg.attention_types.count("none") == 14


def test_flat_attention_types_and_default_all_global(tmp_path):
    flat = load_config(write(tmp_path, {**BASE, "attention_types": ["local", "global"]}))
    assert flat.attention_types == ("local", "global")
    assert load_config(write(tmp_path, BASE)).attention_types == ("global", "global")


def test_later_files_win_and_overrides_apply_last(tmp_path):
    first = write(tmp_path, {**BASE, "lr": 0.1, "n_ctx": 16}, "a.json")
    second = write(tmp_path, {"lr": 0.2, "precision": "bfloat16"}, "b.json")
    cfg = load_config([first, second], overrides=["lr=0.3", "layout=batch:x"])
    assert (cfg.lr, cfg.precision, cfg.n_ctx, cfg.layout) == (0.3, "bfloat16", 16, "batch:x")
    assert load_config([first, second], overrides={"n_ctx": 8}).n_ctx == 8


def test_overriding_n_layer_keeps_the_files_attention_pattern():
    cfg = load_config(REPO / "configs" / "gpt_neo_125M.json", overrides={"n_layer": 4})
    assert cfg.attention_types == ("global", "local", "global", "local")
    small = load_config(GPT_NEO_CONFIGS / "gpt3_small_256.json", overrides={"n_layer": 3})
    assert small.attention_types == ("global",) * 3
    with pytest.raises(ConfigError, match="expands to 12 layers but n_layer is 3"):
        load_config(REPO / "configs" / "gpt_neo_125M.json", overrides={"n_layer": 3})


def test_gpt_neo_aliases_n_heads_and_activation_fn(tmp_path):
    raw = {**BASE, "n_heads": 8, "activation_fn": "relu"}
    del raw["n_head"]
    cfg = load_config(write(tmp_path, raw))
    assert (cfg.n_head, cfg.activation_function) == (8, "relu")


def test_alias_conflicting_with_its_key_is_an_error(tmp_path):
    message = error_of(tmp_path, {**BASE, "n_heads": 8})
    assert "'n_heads' and 'n_head'" in message


def test_config_is_frozen_and_replace_revalidates(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layer = 3
    assert cfg.replace(n_layer=3, attention_types=[[["local"], 3]]).attention_types[2] == "local"
    with pytest.raises(ConfigError, match="expands to 2 layers but n_layer is 3"):
        cfg.replace(n_layer=3)
    with pytest.raises(ConfigError):
        cfg.replace(n_head=7)


def test_bare_name_resolves_to_configs_dir():
    assert load_config("demo").n_layer == load_config(REPO / "configs" / "demo.json").n_layer


def test_datasets_entries_bare_ids_and_tuples(tmp_path):
    cfg = load_config(
        write(tmp_path, {**BASE, "datasets": ["owt", ["pile", 25, "documents_random", 1.0]]})
    )
    assert [d.dataset_id for d in cfg.datasets] == ["owt", "pile"]
    assert (cfg.datasets[1].stitch, cfg.datasets[1].sampling_mode) == (25, "documents_random")


# ---- bad input ---------------------------------------------------------------------------


def test_malformed_json_names_file_line_and_column(tmp_path):
    text = '{\n  "n_embd": 64,\n  "n_head": 4,,\n}'
    message = error_of(tmp_path, text)
    assert "cfg.json" in message and "line 3" in message and "column 15" in message


def test_non_utf8_file_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"n_embd": 64, "model_path": "caf\xe9"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_top_level_must_be_an_object(tmp_path):
    assert "must be a JSON object" in error_of(tmp_path, "[1, 2]")


def test_unknown_key_suggests_the_closest_known_key(tmp_path):
    message = error_of(tmp_path, {**BASE, "n_layers": 3})
    assert "unknown key 'n_layers'" in message and "Did you mean 'n_layer'" in message


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("n_layer", "12", "an integer"),
        ("n_layer", True, "an integer"),
        ("lr", "fast", "a number"),
        ("recompute_grad", "yes", "true or false"),
        ("layout", 3, "a string"),
    ],
)
def test_wrong_type_names_key_and_expected_type(tmp_path, key, value, expected):
    message = error_of(tmp_path, {**BASE, key: value})
    assert f"'{key}'" in message and expected in message


@pytest.mark.parametrize("key", ["input_prefetch", "input_threads"])
def test_input_knobs_must_be_at_least_one(tmp_path, key):
    assert f"'{key}' must be at least 1, got 0" in error_of(tmp_path, {**BASE, key: 0})


def test_missing_required_key(tmp_path):
    raw = dict(BASE)
    del raw["n_vocab"]
    assert "required key 'n_vocab'" in error_of(tmp_path, raw)


def test_n_embd_not_divisible_by_n_head(tmp_path):
    message = error_of(tmp_path, {**BASE, "n_head": 5})
    assert "n_embd (64) must be divisible by n_head (5)" in message


def test_attention_types_must_sum_to_n_layer(tmp_path):
    message = error_of(tmp_path, {**BASE, "attention_types": [[["global", "local"], 2]]})
    assert "expands to 4 layers but n_layer is 2" in message


def test_unknown_attention_type(tmp_path):
    message = error_of(tmp_path, {**BASE, "attention_types": ["global", "lokal"]})
    assert "unknown attention type 'lokal'" in message and "'local'" in message


def test_unknown_activation_suggests(tmp_path):
    message = error_of(tmp_path, {**BASE, "activation_function": "gelu2"})
    assert "unknown activation_function 'gelu2'" in message and "Did you mean 'gelu'" in message


@pytest.mark.parametrize("value", [True, 1.3])
def test_entmax_loss_is_refused_with_the_reason(tmp_path, value):
    message = error_of(tmp_path, {**BASE, "entmax_loss": value})
    assert "key 'entmax_loss'" in message and "NaN gradients" in message


@pytest.mark.parametrize("value", [False, None, 0])
def test_refused_keys_may_be_present_switched_off(tmp_path, value):
    assert load_config(write(tmp_path, {**BASE, "entmax_loss": value}))


@pytest.mark.parametrize("value", [False, None])
def test_rotary_emb_false_means_off_unlike_gpt_neo(tmp_path, value):
    """GPT-Neo's `exists()` switched rotary on for `false` too; here false is false."""
    cfg = load_config(write(tmp_path, {**BASE, "rotary_emb": value}))
    assert not cfg.rotary_emb and "wpe" in gpt_neo.init_params(cfg, 0)


MODEL_OPTION_ERRORS = {
    "axial too small": ({"axial_pos_emb": [3, 5]}, "d1 * d2 >= n_ctx (16)"),
    "axial rank": ({"axial_pos_emb": [16]}, "axial_pos_emb must be [d1, d2]"),
    "axial type": ({"axial_pos_emb": True}, "must be a list of integers"),
    "rotary pct zero": ({"rotary_emb": True, "rotary_pct": 0}, "rotary_pct must be in (0, 1]"),
    "rotary pct above 1": ({"rotary_emb": True, "rotary_pct": 1.5}, "rotary_pct must be in (0, 1]"),
    "rotary odd dims": ({"rotary_emb": True, "rotary_pct": 0.5625}, "gives 9"),
    "rotary pct alone": ({"rotary_pct": 0.5}, "rotary_emb is not true"),
    "rotary and axial": ({"rotary_emb": True, "axial_pos_emb": [4, 4]}, "Keep one"),
    "mlm without mask id": ({"mlm_training": True}, "needs mlm_mask_id"),
    "mlm fractions": (
        {
            "mlm_training": True,
            "mlm_mask_id": 3,
            "mlm_same_token_prob": 0.6,
            "mlm_random_token_prob": 0.5,
        },
        "together <= 1",
    ),
    "mlm negative fraction": (
        {"mlm_training": True, "mlm_mask_id": 3, "mlm_random_token_prob": -0.1},
        "each >= 0",
    ),
    "mlm mask prob": ({"mlm_training": True, "mlm_mask_id": 3, "mlm_mask_prob": 0}, "(0, 1]"),
    "mlm mask id outside vocab": (
        {"mlm_training": True, "mlm_mask_id": 100},
        "outside the vocabulary",
    ),
    "mlm keys without mlm": ({"mlm_mask_id": 3}, "mlm_training is not true"),
    "mlm predicts": ({"mlm_training": True, "mlm_mask_id": 3, "predict_steps": 5}, "predict_steps"),
    "gpt-neo head without untying": ({"gpt_neo_untied_head": True}, "set no_weight_tie"),
    "gpt-neo none without none layers": ({"gpt_neo_none_layers": True}, "no 'none' layer"),
    "memory without global layers": (
        {"num_mem_kv": 2, "attention_types": [[["local"], 2]]},
        "add a global layer",
    ),
    "memory negative": ({"num_mem_kv": -1}, "num_mem_kv must be >= 0"),
    "rezero and scalenorm": ({"rezero": True, "scalenorm": True}, "Keep one"),
    "shared experts": (
        {"share_parameters": True, "moe_layers": [0], "moe_params": {}},
        "share_parameters with moe_layers",
    ),
    "kv heads not dividing heads": ({"n_kv_head": 3}, "Pick one of [1, 2, 4]"),
    "kv heads negative": ({"n_kv_head": -2}, "'n_kv_head' must be at least 1"),
    "swiglu ungated": ({"activation_function": "swiglu"}, '"mlp_glu": true'),
    "rmsnorm and scalenorm": ({"norm": "rmsnorm", "scalenorm": True}, "keep one"),
    "unknown norm": ({"norm": "batchnorm"}, "Choose one of: layernorm, rmsnorm"),
    "norm eps": ({"norm_eps": 0}, "norm_eps must be > 0"),
    "qk norm with memory": ({"qk_norm": True, "num_mem_kv": 2}, "Use one of them"),
    "rope scaling without rotary": (
        {"rope_scaling": {"rope_type": "linear", "factor": 2}},
        "rotary_emb is not true",
    ),
    "rope scaling of an unsupported type": (
        {"rotary_emb": True, "rope_scaling": {"rope_type": "dynamic", "factor": 2}},
        "supported: linear, llama3, yarn",
    ),
    "rope scaling key of another type": (
        {"rotary_emb": True, "rope_scaling": {"type": "linear", "factor": 2, "beta_fast": 8}},
        "'beta_fast' is not read by type 'linear'",
    ),
    "llama3 scaling without its original context": (
        {"rotary_emb": True, "rope_scaling": {"rope_type": "llama3", "factor": 8}},
        "needs original_max_position_embeddings",
    ),
    "rope scaling shrinking": (
        {"rotary_emb": True, "rope_scaling": {"rope_type": "linear", "factor": 0.5}},
        "factor must be >= 1",
    ),
}


def test_derived_sizes_follow_their_keys_and_save_as_derived():
    cfg = from_dict({**BASE, "n_kv_head": 2})
    assert (cfg.head_dim, cfg.n_kv_head, cfg.intermediate_size) == (16, 2, 256)
    saved = to_dict(cfg)
    assert (saved["head_dim"], saved["n_kv_head"], saved["intermediate_size"]) == (0, 2, 0)
    wider = cfg.replace(n_embd=128)  # derived sizes follow; the given one stays
    assert (wider.head_dim, wider.n_kv_head, wider.intermediate_size) == (32, 2, 512)
    explicit = from_dict({**BASE, "n_embd": 48, "head_dim": 32})  # 4 heads of 32 on 48 wide
    attn = gpt_neo.init_params(explicit, 0)["stacks"][0]["attn"]
    assert attn["q"].shape == (2, 48, 4, 32) and attn["o"].shape == (2, 4, 32, 48)


@pytest.mark.parametrize("case", sorted(MODEL_OPTION_ERRORS))
def test_bad_model_options_are_one_clear_error(tmp_path, case):
    keys, expected = MODEL_OPTION_ERRORS[case]
    assert expected in error_of(tmp_path, {**BASE, **keys})


def test_every_gpt_neo_model_key_is_implemented_or_refused():
    """Each key GPT-Neo's code reads from a model config (tests/fixtures/gpt-neo-model-keys.txt)
    is a key we read, an alias, or one refused with its reason; and each experimental
    architecture key is exercised against the NumPy reference (tests/models/test_model_options.py)."""
    from gpt_neo.config import ALIASES, KNOWN_KEYS, NOT_NEEDED, REFUSED, SINGLE_VALUE
    from tests.models.test_model_options import OPTIONS
    from tests.support.helpers import GPT_NEO_MODEL_KEYS

    lines = GPT_NEO_MODEL_KEYS.read_text().splitlines()
    keys = {line for line in lines if line and not line.startswith("#")}
    assert {"rotary_emb", "mlm_training", "entmax_loss", "n_embd"} <= keys  # the file is whole
    assert sorted(keys - KNOWN_KEYS) == []
    experimental = {
        "mlp_glu", "scalenorm", "rezero", "macaron", "num_mem_kv", "axial_pos_emb",
        "rotary_emb", "share_parameters", "no_weight_tie", "mlm_training",
    }  # fmt: skip
    assert experimental <= keys
    exercised = {key for option in OPTIONS.values() for key in option}
    assert sorted(experimental - exercised) == []
    special = set(ALIASES) | set(REFUSED) | set(NOT_NEEDED) | set(SINGLE_VALUE)
    assert experimental.isdisjoint(special)


@pytest.mark.parametrize("value", [None, []])
def test_no_moe_layers_means_a_dense_model(tmp_path, value):
    # false (and 0) crashed GPT-Neo (`layer in False`): refused, see tests/training/test_moe_training.py
    cfg = load_config(write(tmp_path, {**BASE, "moe_layers": value}))
    assert cfg.moe_layers == () and cfg.moe_params is None


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(REPO / "configs" / "demo.json", overrides=["n_layer"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("no/such/config.json")


def test_public_load_config_also_checks_the_layout_against_the_model(tmp_path):
    path = write(tmp_path, {**BASE, "mesh_shape": "x:4,y:2", "layout": "batch:x,embd:x"})
    assert load_config(path).layout == "batch:x,embd:x"  # keys and values are fine
    with pytest.raises(ConfigError, match=f"{path}: layout maps both 'batch' and 'embd'"):
        gpt_neo.load_config(path)
    assert issubclass(gpt_neo.ConfigError, ValueError)
    assert issubclass(gpt_neo.ConfigError, gpt_neo.UserError)
    assert issubclass(gpt_neo.DataError, gpt_neo.UserError)
    assert gpt_neo.UserError.exit_code == 2


# --- GPT-Neo keys that used to be accepted and ignored --------------------------------------


def test_no_dataset_is_refused_with_the_reason(tmp_path):
    message = error_of(tmp_path, {**BASE, "no_dataset": True})
    assert "'no_dataset' = true is not needed" in message and "without 'datasets'" in message
    assert load_config(write(tmp_path, {**BASE, "no_dataset": False})).n_layer == 2


def test_model_accepts_only_gpt(tmp_path):
    assert load_config(write(tmp_path, {**BASE, "model": "GPT"})).n_layer == 2
    assert 'only "GPT" exists' in error_of(tmp_path, {**BASE, "model": "Transformer"})


def test_input_fn_takes_gpt_neo_pipeline_names(tmp_path):
    assert (
        load_config(write(tmp_path, {**BASE, "input_fn": "generic_text"})).input_fn
        == "generic_text"
    )
    assert "Did you mean 'generic_text'" in error_of(tmp_path, {**BASE, "input_fn": "generic_txt"})


def test_padding_id_must_be_a_token_other_than_eos(tmp_path):
    assert "outside the vocabulary [0, 100)" in error_of(tmp_path, {**BASE, "padding_id": 100})
    message = error_of(tmp_path, {**BASE, "padding_id": 3, "eos_id": 3})
    assert "padding_id and eos_id are both 3" in message and "end-of-text target" in message


def test_every_config_field_has_a_reader_outside_config_py():
    """A key that is accepted and documented must change something: every `Config` field is
    read as `.field` somewhere in the package other than config.py."""
    import ast

    from gpt_neo.config import Config
    from gpt_neo.config.moe import MoeParams

    package = REPO / "gpt_neo"
    read = {
        node.attr
        for path in package.rglob("*.py")
        if path.name != "config.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
    }
    unread = [f.name for f in dataclasses.fields(Config) if f.name not in read]
    assert unread == []
    moe_read = {
        node.attr
        for path in package.rglob("*.py")
        if path.name not in ("config.py", "moe_config.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
    }
    assert [f.name for f in dataclasses.fields(MoeParams) if f.name not in moe_read] == []
