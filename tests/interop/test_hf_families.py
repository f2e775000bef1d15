"""Llama, Mistral, Qwen2 and Qwen3 folders both ways, against transformers itself: random-weight
models built from tiny configs (no download), imported, run, decoded, exported and reloaded.

One model per family covers between them: grouped-query attention 4:1 (Llama, Qwen2), one
key/value head (Mistral), tied (Mistral, Qwen2) and untied (Llama, Qwen3) embeddings, rope
scaling of each type at twice its original context or more (llama3, linear, yarn), Qwen2's
query/key/value biases, Qwen3's QK-norm and wider heads (head_dim 16 with 64 / 8 = 8), and
sliding windows shorter than the sequence: in every layer (Mistral), from max_window_layers on
(Qwen2), alternating through layer_types (Qwen3).
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import gpt_neo
from gpt_neo.config import from_dict, to_dict
from gpt_neo.data.encoders import load_encoder
from gpt_neo.errors import ConfigError, DataError
from gpt_neo.interop.hf import (
    TOKENIZER_FILES,
    export_hf,
    hf_architecture,
    hf_incompatibilities,
    import_hf,
    import_to_checkpoint,
)
from gpt_neo.interop.hf.llama import half_split_to_interleaved, interleaved_to_half_split
from tests.support.helpers import (
    assert_gradients_equal_transformers,
    assert_greedy_equals_hf_generate,
    hf_logits,
    random_tokens,
)

PARITY_ATOL = 1e-4
LENGTH = 64  # tokens per parity row: past every window and original rope context below

COMMON = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
FAMILIES = {
    "llama": dict(
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "mistral": dict(
        num_key_value_heads=1,
        tie_word_embeddings=True,
        sliding_window=8,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    ),
    "qwen2": dict(
        num_key_value_heads=2,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=12,
        max_window_layers=2,
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=16
        ),
    ),
    "qwen3": dict(
        num_key_value_heads=4,
        head_dim=16,
        tie_word_embeddings=False,
        use_sliding_window=True,
        sliding_window=6,
        layer_types=["full_attention", "sliding_attention"] * 2,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
}
CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def build_hf_model(family: str, folder, seed=0, **changes):
    """A random-weight model of `family`, every weight perturbed (so RMSNorm gains and Qwen2's
    biases are not at their init values), saved to `folder` as float32 safetensors."""
    import torch
    import transformers

    config_class = getattr(transformers, CLASSES[family].replace("ForCausalLM", "Config"))
    model_class = getattr(transformers, CLASSES[family])
    torch.manual_seed(seed)
    config = config_class(**{**COMMON, **FAMILIES[family], **changes})
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, folder, HF model, imported cfg, imported params, tokens, our logits), once per
    family."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    model = build_hf_model(name, folder)
    cfg, params = import_hf(folder)
    tokens = random_tokens(cfg, batch=2, length=LENGTH)
    ours = np.asarray(gpt_neo.apply(cfg, params, tokens))
    return name, folder, model, cfg, params, tokens, ours


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-refusals")
    build_hf_model("llama", folder, num_hidden_layers=2)
    return folder


# --- import: the config, the logits -----------------------------------------------------------


def test_every_architecture_field_is_read(family):
    name, _, model, cfg, _, _, _ = family
    hf = model.config
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.n_vocab) == (64, 8, 4, 211)
    head_dim = getattr(hf, "head_dim", 64 // 8)  # Qwen2Config has none: hidden / heads
    assert (cfg.n_kv_head, cfg.head_dim) == (hf.num_key_value_heads, head_dim)
    assert (cfg.intermediate_size, cfg.norm, cfg.norm_eps) == (96, "rmsnorm", 1e-5)
    assert (cfg.mlp_glu, cfg.activation_function, cfg.bias, cfg.scale_attn_weights) == (
        True,
        "silu",
        False,
        True,
    )
    assert (cfg.qkv_bias, cfg.qk_norm) == (name == "qwen2", name == "qwen3")
    assert cfg.no_weight_tie == (not hf.tie_word_embeddings)
    assert cfg.rotary_emb and cfg.rotary_emb_base == hf.rope_parameters["rope_theta"]
    rope = FAMILIES[name]["rope_parameters"]
    if rope["rope_type"] == "default":
        assert cfg.rope_scaling is None
    else:
        assert cfg.rope_scaling.rope_type == rope["rope_type"]
        assert cfg.rope_scaling.factor == rope["factor"]
    expected_kinds = {
        "llama": ["global"] * 4,
        "mistral": ["local"] * 4,
        "qwen2": ["global", "global", "local", "local"],
        "qwen3": ["global", "local"] * 2,
    }[name]
    assert list(cfg.attention_types) == expected_kinds
    if "local" in expected_kinds:
        assert cfg.local_attention_radius == FAMILIES[name]["sliding_window"]
    assert hf_architecture(cfg) == name and not hf_incompatibilities(cfg)


def test_the_context_length_of_a_rotary_folder_is_a_run_key(llama, capsys):
    """max_position_embeddings (131072 for Llama 3.1) is only the default: with no position
    table, a run picks its own n_ctx, without a warning; the architecture stays the folder's."""
    cfg, _ = import_hf(llama, overrides={"n_ctx": 32, "n_embd": 128})
    assert cfg.n_ctx == 32 and cfg.n_embd == 64
    assert "the architecture comes from the folder; ignoring n_embd\n" in capsys.readouterr().err


def test_logits_equal_transformers(family):
    name, _, model, _, _, tokens, ours = family
    diff = np.abs(ours - hf_logits(model, tokens)).max()
    print(f"{name}: max abs logit diff vs transformers {diff:.2e}")
    assert diff < PARITY_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"], indirect=True)
def test_training_gradients_equal_transformers(family):
    """The loss and every parameter's gradient equal PyTorch autograd through the family's
    forward on the same weights: grouped keys read by blocks of queries (Llama, 4:1), one
    key/value head in sliding windows (Mistral), QK-norm and alternating windows (Qwen3)."""
    _, _, model, cfg, params, tokens, _ = family
    assert_gradients_equal_transformers(cfg.replace(z_loss=0.0), params, model, tokens)


# --- export: reloads in transformers, and round trips exactly ---------------------------------


def test_export_reloads_in_transformers_and_imports_back_exactly(family, tmp_path):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    name, folder, model, cfg, params, tokens, _ = family
    out = Path(export_hf(cfg, params, tmp_path / "out"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [CLASSES[name]] and config["model_type"] == name
    original, exported = (
        load_file(folder / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        np.testing.assert_array_equal(exported[key], tensor, err_msg=key)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == CLASSES[name]
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(model, tokens))
    again_cfg, again = import_hf(out)
    assert to_dict(again_cfg) == to_dict(cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def own_config(**changes):
    """A Mistral-shaped config of our own: GQA 2:1, untied, every layer sliding, linear rope."""
    keys = dict(
        n_embd=64,
        n_head=4,
        n_kv_head=2,
        n_layer=2,
        n_ctx=48,
        n_vocab=150,
        intermediate_size=80,
        norm="rmsnorm",
        bias=False,
        mlp_glu=True,
        activation_function="swiglu",
        rotary_emb=True,
        rotary_emb_base=5000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
        scale_attn_weights=True,
        attention_types=["local"] * 2,
        local_attention_radius=9,
        no_weight_tie=True,
        eos_id=3,
    )
    return from_dict({**keys, **changes}, source="own_config")


def random_params(cfg, seed=0):
    """Our parameter tree for `cfg` with random values (norm scales about 1): the tree of
    `init_params`, without compiling it."""
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        return noise + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else noise

    shapes = jax.eval_shape(lambda: gpt_neo.init_params(cfg, seed))
    return jax.tree_util.tree_map_with_path(value, shapes)


def test_our_own_model_exports_in_float32_and_bfloat16(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = own_config()
    params = random_params(cfg, seed=3)
    tokens = random_tokens(cfg, batch=2)
    assert hf_architecture(cfg) == "mistral"
    out = Path(export_hf(cfg, params, tmp_path / "f32"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "MistralForCausalLM"
    ours = np.asarray(gpt_neo.apply(cfg, params, tokens))
    assert np.abs(hf_logits(reloaded, tokens) - ours).max() < PARITY_ATOL

    # bfloat16: the weights rounded once; import reads back exactly those, widened
    out = Path(export_hf(cfg, params, tmp_path / "bf16", dtype="bfloat16"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    rounded = jax.tree.map(lambda a: np.asarray(a.astype(jax.numpy.bfloat16), np.float32), params)
    back_cfg, back = import_hf(out)
    assert to_dict(back_cfg) == to_dict(cfg.replace(activation_function="silu"))  # the same gate
    jax.tree.map(np.testing.assert_array_equal, back, rounded)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = np.asarray(gpt_neo.apply(cfg, rounded, tokens))
    assert np.abs(hf_logits(reloaded, tokens) - ours).max() < PARITY_ATOL


def test_configs_no_family_expresses_are_refused_naming_the_keys(tmp_path):
    mixed = own_config(attention_types=["global", "local"])
    assert "attention_types mixes global and local" in " ".join(hf_incompatibilities(mixed))
    layer_norm = own_config(norm="layernorm")  # a GPT-NeoX then, which has none of the rest
    problems = " ".join(hf_incompatibilities(layer_norm))
    assert "bias false" in problems and "n_kv_head 2" in problems and "mlp_glu" in problems
    for cfg, names in (
        (own_config(bias=True), ["bias true"]),
        (own_config(activation_function="gelu"), ["activation_function 'gelu'"]),
        (own_config(scale_attn_weights=False), ["scale_attn_weights false"]),
        (own_config(rotary_pct=0.5), ["rotary_pct 0.5"]),
        (own_config(qk_norm=True, qkv_bias=True), ["qk_norm with qkv_bias"]),
        (mixed, ["attention_types mixes"]),
        (layer_norm, ["Llama, Mistral, Qwen2 or Qwen3 with norm rmsnorm"]),
    ):
        with pytest.raises(ConfigError) as err:
            export_hf(cfg, {}, tmp_path / "x")  # refused before the parameters are read
        assert all(n in str(err.value) for n in names), str(err.value)
        assert "\n" not in str(err.value) and not (tmp_path / "x").exists()


# --- decoding, sharding ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"], indirect=True)
def test_greedy_decoding_equals_transformers_generate(family):
    """32 new tokens past every window and original rope context; Llama's features in
    decoding are Qwen2's (GQA 4:1, scaled rope) less its biases, so it is left out."""
    _, _, model, cfg, params, _, _ = family
    assert_greedy_equals_hf_generate(cfg, params, model, new_tokens=32)


@pytest.mark.parametrize("family", ["llama"], indirect=True)  # one GQA family is enough
def test_sharded_import_equals_one_device(family):
    """Heads over y (4), FSDP weights over x (2): Llama's 2 key/value heads (4:1 grouping)
    do not split four ways and stay whole on each device."""
    _, folder, _, _, _, tokens, ours = family
    overrides = {"mesh_shape": "x:2,y:4", "layout": "batch:x,heads:y", "param_layout": "embd:x"}
    mesh = gpt_neo.make_mesh(import_hf(folder, overrides=overrides)[0])
    cfg, params = import_hf(folder, overrides=overrides, mesh=mesh)
    attn = params["stacks"][0]["attn"]
    assert attn["q"].sharding.spec == P(None, "x", "y", None)
    assert attn["k"].sharding.spec == P(None, "x", None, None)
    sharded = np.asarray(gpt_neo.apply(cfg, params, tokens))
    assert np.abs(sharded - ours).max() < 1e-5


# --- folder formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3"], indirect=True)  # one family is enough
def test_bfloat16_and_sharded_folders_import(family, tmp_path):
    import torch

    _, _, model, cfg, params, _, _ = family
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded_cfg, sharded = import_hf(tmp_path / "sharded")
    assert to_dict(sharded_cfg) == to_dict(cfg)
    jax.tree.map(np.testing.assert_array_equal, sharded, params)

    for dtype, ours in ((torch.bfloat16, jax.numpy.bfloat16), (torch.float16, np.float16)):
        half = type(model)(model.config).to(dtype)
        half.load_state_dict(model.state_dict())
        half.save_pretrained(tmp_path / str(dtype))
        _, widened = import_hf(tmp_path / str(dtype))
        rounded = jax.tree.map(lambda a, t=ours: np.asarray(a.astype(t), np.float32), params)
        jax.tree.map(np.testing.assert_array_equal, widened, rounded)


# --- rotary layouts ---------------------------------------------------------------------------


def test_interleaved_checkpoints_permute_to_hugging_faces_rotate_half_layout():
    """Meta's consolidated q/k rows turn pairs (2i, 2i+1); HF's (and ours) turn (i, i + d/2).
    The row permutation makes the two rotary conventions give the same q.k scores, and it is
    transformers' own conversion (so the HF path needs none)."""
    rng = np.random.default_rng(0)
    heads, head_dim, embd, positions = 3, 8, 12, np.arange(10)
    x = rng.standard_normal((len(positions), embd))
    wq, wk = rng.standard_normal((2, heads * head_dim, embd))  # [out, in], interleaved rows
    angles = positions[:, None] * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]  # [t, 1, d/2]

    def interleaved(v):  # v [t, heads, d]: pairs (2i, 2i+1)
        a, b = v[..., 0::2], v[..., 1::2]
        return np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(v.shape)

    def half_split(v):  # HF's rotate_half: pairs (i, i + d/2)
        a, b = np.split(v, 2, axis=-1)
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)

    def scores(rotary, wq, wk):
        q = rotary((x @ wq.T).reshape(-1, heads, head_dim))
        k = rotary((x @ wk.T).reshape(-1, heads, head_dim))
        return np.einsum("qhd,khd->hqk", q, k)

    hq, hk = interleaved_to_half_split(wq, heads), interleaved_to_half_split(wk, heads)
    np.testing.assert_allclose(scores(half_split, hq, hk), scores(interleaved, wq, wk), atol=1e-9)
    assert not np.allclose(scores(half_split, wq, wk), scores(interleaved, wq, wk))
    np.testing.assert_array_equal(half_split_to_interleaved(hq, heads), wq)

    # transformers' convert_llama_weights_to_hf permute, written out
    def permute(w, n_heads, dim1, dim2):
        return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).swapaxes(1, 2).reshape(dim1, dim2)

    np.testing.assert_array_equal(hq, permute(wq, heads, heads * head_dim, embd))


# --- what an import refuses -------------------------------------------------------------------


def edited_copy(source, target, config_changes=None, drop=(), add=None):
    """A copy of the folder `source` with config.json keys changed (None deletes) and
    tensors dropped or added."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    for key, value in (config_changes or {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    if drop or add:
        tensors = load_file(target / "model.safetensors")
        tensors = {k: v for k, v in tensors.items() if k not in drop} | (add or {})
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


LLAMA_ROPE = FAMILIES["llama"]["rope_parameters"]
REFUSED = [
    ({"model_type": "gpt2"}, ConfigError, "model_type is 'gpt2'; the folders that import are"),
    (
        {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
        ConfigError,
        'rope_scaling type "dynamic" is not supported; supported: linear, llama3, yarn',
    ),
    (
        {"rope_parameters": None, "rope_scaling": {"type": "longrope", "factor": 2.0}},
        ConfigError,
        r'\(rope_scaling\): rope_scaling type "longrope" is not supported',
    ),
    ({"attention_bias": True}, ConfigError, "attention_bias is true; llama imports without"),
    ({"mlp_bias": True}, ConfigError, "mlp_bias is true; llama imports without MLP biases"),
    ({"hidden_act": "gelu"}, ConfigError, "hidden_act 'gelu' is not supported"),
    (
        {"rope_parameters": {**LLAMA_ROPE, "partial_rotary_factor": 0.5}},
        ConfigError,
        "partial_rotary_factor 0.5 is not supported",
    ),
    (
        {"quantization_config": {"quant_method": "gptq", "bits": 4}},
        ConfigError,
        "quantization_config is set",
    ),
    (
        {"num_key_value_heads": 3},
        ConfigError,
        r"n_kv_head \(3\) must divide n_head \(8\)",
    ),
    (
        {"intermediate_size": 128},
        DataError,
        r"weight model.layers.0.mlp.gate_proj.weight has shape \[96, 64\], but config.json "
        r"makes it \[128, 64\]",
    ),
]


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    REFUSED,
    ids=[
        "architecture",
        "dynamic-rope",
        "longrope",
        "attention-bias",
        "mlp-bias",
        "gelu",
        "partial-rotary",
        "quantized",
        "kv-heads",
        "shape",
    ],
)
def test_a_folder_that_cannot_import_is_refused_in_one_line_writing_nothing(
    llama, tmp_path, changes, error, message
):
    folder = edited_copy(llama, tmp_path / "hf", changes)
    model_path = tmp_path / "run"
    with pytest.raises(error, match=message) as err:
        import_to_checkpoint(folder, str(model_path))
    assert "\n" not in str(err.value)
    assert not model_path.exists()


def test_missing_and_unknown_tensors_are_refused_by_name(llama, tmp_path):
    missing = edited_copy(llama, tmp_path / "missing", drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(DataError, match=r"weight model.layers.1.mlp.up_proj.weight is missing"):
        import_to_checkpoint(missing, str(tmp_path / "run"))
    bias = {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    extra = edited_copy(llama, tmp_path / "extra", add=bias)
    with pytest.raises(DataError, match=r"weight model.layers.0.self_attn.q_proj.bias has no"):
        import_to_checkpoint(extra, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_qwen_layer_types_follow_transformers(tmp_path, llama):
    """Without layer_types, Qwen slides from max_window_layers on, and only with
    use_sliding_window; sliding layers without a window cannot run in transformers."""
    from gpt_neo.interop.hf.llama import derive

    qwen = {**COMMON, **FAMILIES["qwen2"], "model_type": "qwen2"}
    qwen.pop("rope_parameters")
    assert derive(qwen, "q")["attention_types"] == ["global"] * 2 + ["local"] * 2
    assert derive({**qwen, "use_sliding_window": False}, "q")["attention_types"] == ["global"] * 4
    no_window = {**qwen, "use_sliding_window": False, "layer_types": ["sliding_attention"] * 4}
    with pytest.raises(ConfigError, match="layer_types has 'sliding_attention' layers but"):
        derive(no_window, "q")
    mistral = {**COMMON, "model_type": "mistral", "sliding_window": None}
    assert derive(mistral, "m")["attention_types"] == ["global"] * 4
    # older folders: rope_theta and rope_scaling ("type") at the top level
    legacy = {**COMMON, "model_type": "llama", "rope_theta": 5e5}
    legacy["rope_scaling"] = {"type": "linear", "factor": 3.0}
    derived = derive(legacy, "l")
    assert derived["rotary_emb_base"] == 5e5
    assert derived["rope_scaling"] == {"rope_type": "linear", "factor": 3.0}


def test_gpt_neo_folders_carry_their_mlp_width_and_norm_epsilon():
    from gpt_neo.interop.hf.neo import derive

    hf = {"model_type": "gpt_neo", "hidden_size": 64, "intermediate_size": 96}
    derived = derive({**hf, "layer_norm_epsilon": 1e-6}, "neo")
    assert (derived["intermediate_size"], derived["norm_eps"]) == (96, 1e-6)
    assert derive({**hf, "intermediate_size": None}, "neo")["intermediate_size"] == 256


# --- the tokenizer, both ways -----------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
)


def save_tokenizer(folder):
    """A word-level tokenizer with a chat template in tokenizer_config.json (as Hub folders
    have it) and special_tokens_map.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant"]
    words += [f"w{i}" for i in range(100)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", unk_token="<unk>"
    ).save_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**settings, "chat_template": CHAT_TEMPLATE})
    )
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))


@pytest.mark.slow
def test_tokenizer_and_chat_template_travel_through_import_and_export_commands(
    llama, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gpt_neo.cli.hf import main as hf_main
    from main import main

    folder = edited_copy(llama, tmp_path / "hf", {"eos_token_id": [0, 3]})
    save_tokenizer(folder)
    assert hf_main(["import", str(folder), "--model_path", str(tmp_path / "run")]) == 0
    kept = tmp_path / "run" / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (kept / name).read_bytes() == (folder / name).read_bytes(), name
    assert (kept / "generation_config.json").is_file()
    assert set(p.name for p in kept.iterdir()) <= set(TOKENIZER_FILES)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["eos_id"] == 3  # of the list, the tokenizer's eos token <|im_end|>
    dataset = json.loads(next((tmp_path / "run" / "dataset_configs").iterdir()).read_text())
    assert dataset["eos_id"] == 3 and load_encoder(kept).encode("w1 w2") == [7, 8]

    out = tmp_path / "exported"
    model_config = str(tmp_path / "run" / "config.json")
    assert main(["--model", model_config, "--export", str(out)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.eos_token_id == 3
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False)
    assert chat == "<|im_start|>user w1 w2<|im_end|>"
    original = AutoModelForCausalLM.from_pretrained(folder).eval()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(0).integers(0, 211, (1, 20))
    np.testing.assert_array_equal(hf_logits(exported, tokens), hf_logits(original, tokens))
    assert (out / "generation_config.json").read_bytes() == (
        folder / "generation_config.json"
    ).read_bytes()
