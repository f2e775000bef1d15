"""GPT-Neo's model options (positions, heads, block variants, masked LM) against independent
references: the NumPy forward pass of tests/oracles/reference.py, Hugging Face GPT-NeoX for rotary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt_neo
from gpt_neo.config import from_dict
from gpt_neo.models import positions
from gpt_neo.models.gpt import init_params, param_count
from tests.oracles import reference
from tests.support.helpers import perturbed_params, random_tokens, tiny_config

# Each option on the tiny model with every layer kind (global, local with a window of 8 < 32,
# linear, none); tolerances are float32 against float64.
OPTIONS = {
    "rotary": dict(rotary_emb=True),
    "rotary-partial": dict(rotary_emb=True, rotary_pct=0.25, rotary_emb_base=500.0),
    "axial": dict(axial_pos_emb=[4, 9]),
    "swiglu": dict(mlp_glu=True, activation_function="silu"),
    "geglu": dict(mlp_glu=True, activation_function="gelu"),
    "untied": dict(no_weight_tie=True),
    "untied-gpt-neo": dict(no_weight_tie=True, gpt_neo_untied_head=True),
    "scalenorm": dict(scalenorm=True),
    "rezero": dict(rezero=True),
    "macaron": dict(macaron=True),
    "shared": dict(share_parameters=True),
    "memory-kv": dict(num_mem_kv=3),
    "none-doubles": dict(gpt_neo_none_layers=True),
    "rezero-none-doubles": dict(rezero=True, gpt_neo_none_layers=True),
    "masked-lm": dict(mlm_training=True, mlm_mask_id=1),
    "masked-lm-memory": dict(mlm_training=True, mlm_mask_id=1, num_mem_kv=2, rotary_emb=True),
    # the families of today (Llama, Mistral, Qwen), on every layer kind and GPT-Neo's options
    "llama": dict(
        rotary_emb=True,
        norm="rmsnorm",
        norm_eps=1e-6,
        bias=False,
        mlp_glu=True,
        activation_function="swiglu",
        scale_attn_weights=True,
        n_kv_head=2,
        intermediate_size=96,
    ),
    "qwen2-mqa": dict(
        rotary_emb=True, norm="rmsnorm", bias=False, qkv_bias=True, n_kv_head=1, mlp_glu=True
    ),
    "qwen3-wide-heads": dict(
        rotary_emb=True,
        norm="rmsnorm",
        bias=False,
        qk_norm=True,
        head_dim=16,
        n_kv_head=4,
        scale_attn_weights=True,
    ),
    "gqa-gpt-neo-options": dict(n_kv_head=4, num_mem_kv=2, macaron=True, bias=False),
    "all-at-once": dict(
        rotary_emb=True,
        rotary_pct=0.5,
        mlp_glu=True,
        no_weight_tie=True,
        scalenorm=True,
        macaron=True,
        share_parameters=True,
        num_mem_kv=2,
    ),
}


def option_params(cfg, seed=0):
    """Perturbed params, with rezero gates far from 0 so that their branches matter."""
    params = perturbed_params(cfg, seed)
    for block in params["blocks"]:
        if "rezero" in block:
            block["rezero"] = {name: jnp.float32(0.7) for name in block["rezero"]}
    return params


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_option_matches_numpy_reference(name):
    cfg = tiny_config(**OPTIONS[name])
    params = option_params(cfg)
    tokens = random_tokens(cfg, batch=2)
    expected = reference.forward(cfg, params, tokens)
    np.testing.assert_allclose(gpt_neo.apply(cfg, params, tokens), expected, atol=2e-5)


def test_options_shape_the_parameter_tree():
    plain = tiny_config()
    rotary = init_params(tiny_config(rotary_emb=True), 0)
    assert "wpe" not in rotary and "wpe" in init_params(plain, 0)
    axial = init_params(tiny_config(axial_pos_emb=[4, 9]), 0)
    assert axial["axial_wpe_1"].shape == (4, 64) and axial["axial_wpe_2"].shape == (9, 64)
    untied = init_params(tiny_config(no_weight_tie=True, gpt_neo_untied_head=True), 0)
    assert untied["head"]["kernel"].shape == (128, 64) and "ln_f" not in untied
    shared = tiny_config(share_parameters=True)
    assert len(init_params(shared, 0)["blocks"]) == 1
    # one block for four layers: as many parameters as a one-layer model
    assert param_count(shared) == param_count(tiny_config(n_layer=1, attention_types=["global"]))
    memory = init_params(tiny_config(num_mem_kv=3), 0)["blocks"]
    assert memory[0]["attn"]["mem_k"].shape == (3, 8, 8) and "mem_k" not in memory[1]["attn"]
    rezero = init_params(tiny_config(rezero=True), 0)["blocks"]
    assert "ln_1" not in rezero[0] and float(rezero[0]["rezero"]["attn"]) == 0.0
    assert set(rezero[3]["rezero"]) == {"mlp"}  # a plain `none` layer has no attention branch


def test_rezero_starts_as_the_identity_on_the_residual_stream():
    """Gates at 0: every block passes x through, so logits depend on the embeddings only."""
    cfg = tiny_config(rezero=True)
    params = perturbed_params(cfg)
    for block in params["blocks"]:
        block["rezero"] = {name: jnp.float32(0.0) for name in block["rezero"]}
    tokens = random_tokens(cfg, batch=1)
    p = reference._to_float64(params)
    x = p["wte"][tokens[0]] + p["wpe"]
    expected = reference.layer_norm(x, p["ln_f"]) @ p["wte"].T
    np.testing.assert_allclose(gpt_neo.apply(cfg, params, tokens)[0], expected, atol=1e-4)


def _neox_model(cfg, params):
    """transformers' GPTNeoXForCausalLM holding our rotary GPT-Neo: sequential residual, fused
    per-head [q; k; v] rows, q scaled by sqrt(head_dim) to cancel HF's 1/sqrt(head_dim)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    d, h, hd = cfg.n_embd, cfg.n_head, cfg.head_dim
    hf_cfg = GPTNeoXConfig(
        vocab_size=cfg.n_vocab,
        hidden_size=d,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=h,
        intermediate_size=4 * d,
        hidden_act="gelu_new",
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_emb_base,
        max_position_embeddings=cfg.n_ctx,
        layer_norm_eps=1e-5,
        use_parallel_residual=False,
        tie_word_embeddings=True,
        attention_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    model = GPTNeoXForCausalLM(hf_cfg).eval()
    p = jax.tree.map(np.asarray, params)
    state = {"gpt_neox.embed_in.weight": p["wte"], "embed_out.weight": p["wte"]}
    state["lm_head.weight"] = p["wte"]
    for i in range(cfg.n_layer):  # stacked (all layers global): the oracle's own indexing
        b = reference.layer_weights(cfg, p, i)
        pre = f"gpt_neox.layers.{i}"
        q, k, v = (b["attn"][n].reshape(d, h, hd).transpose(1, 2, 0) for n in "qkv")
        fused = np.concatenate([q * hd**0.5, k, v], axis=1).reshape(3 * d, d)  # per head
        state |= {
            f"{pre}.attention.query_key_value.weight": fused,
            f"{pre}.attention.query_key_value.bias": np.zeros(3 * d, np.float32),
            f"{pre}.attention.dense.weight": b["attn"]["o"].reshape(d, d).T,
            f"{pre}.attention.dense.bias": b["attn"]["o_bias"],
            f"{pre}.input_layernorm.weight": b["ln_1"]["scale"],
            f"{pre}.input_layernorm.bias": b["ln_1"]["bias"],
            f"{pre}.post_attention_layernorm.weight": b["ln_2"]["scale"],
            f"{pre}.post_attention_layernorm.bias": b["ln_2"]["bias"],
            f"{pre}.mlp.dense_h_to_4h.weight": b["mlp"]["fc_kernel"].T,
            f"{pre}.mlp.dense_h_to_4h.bias": b["mlp"]["fc_bias"],
            f"{pre}.mlp.dense_4h_to_h.weight": b["mlp"]["proj_kernel"].T,
            f"{pre}.mlp.dense_4h_to_h.bias": b["mlp"]["proj_bias"],
        }
    state |= {
        "gpt_neox.final_layer_norm.weight": p["ln_f"]["scale"],
        "gpt_neox.final_layer_norm.bias": p["ln_f"]["bias"],
    }
    own = model.state_dict()
    missing = set(own) - set(state)
    assert not [k for k in missing if "rotary" not in k and "inv_freq" not in k], missing
    model.load_state_dict(
        {k: torch.tensor(np.array(v)) for k, v in state.items() if k in own},
        strict=False,
    )
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "keys", [dict(), dict(rotary_pct=0.25, rotary_emb_base=500.0)], ids=["full", "partial"]
)
def test_rotary_matches_transformers_gpt_neox(keys):
    import torch

    cfg = tiny_config(rotary_emb=True, attention_types=["global"] * 2, n_layer=2, n_head=4, **keys)
    params = perturbed_params(cfg)
    tokens = random_tokens(cfg, batch=2)
    with torch.no_grad():
        expected = _neox_model(cfg, params)(torch.as_tensor(tokens, dtype=torch.long)).logits
    np.testing.assert_allclose(gpt_neo.apply(cfg, params, tokens), expected.numpy(), atol=1e-5)


def test_rotary_angles_stay_float32_under_bfloat16():
    """GPT-Neo rounded positions to bfloat16 (2047 -> 2048); ours turn position 2047 by its
    own angle. Compared with a float64 rotation: bfloat16 output rounding only."""
    cfg = from_dict(
        dict(n_embd=64, n_head=1, n_layer=1, n_ctx=4096, n_vocab=8, rotary_emb=True),
        source="test",
    )
    x = np.random.default_rng(0).normal(size=(1, 3, 1, 64))
    pos = np.array([[2045, 2046, 2047]])
    ours = positions.rotate(cfg, jnp.asarray(x, jnp.bfloat16), jnp.asarray(pos))
    expected = reference.rotary(np.concatenate([np.zeros((2045, 1, 64)), x[0]]), 64)[2045:]
    np.testing.assert_allclose(np.asarray(ours, np.float32)[0], expected, atol=0.03)
    rounded = reference.rotary(np.concatenate([np.zeros((2048, 1, 64)), x[0, 2:]]), 64)[2048:]
    assert np.abs(rounded - expected[2:]).max() > 0.1  # the rounding GPT-Neo had is visible


@pytest.mark.parametrize(
    "keys",
    [
        dict(rotary_emb=True),
        dict(rotary_emb=True, rotary_pct=0.5, num_mem_kv=2),
        dict(axial_pos_emb=[4, 8], mlp_glu=True, no_weight_tie=True),
        dict(
            rotary_emb=True,
            n_kv_head=2,
            qk_norm=True,
            scale_attn_weights=True,
            norm="rmsnorm",
            bias=False,
            rope_scaling={"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 8},
        ),
        dict(rotary_emb=True, n_kv_head=1, num_mem_kv=2, scale_attn_weights=True),
    ],
    ids=["rotary", "rotary-memory", "axial-glu-untied", "gqa-qk-norm-yarn", "mqa-memory"],
)
def test_kv_cache_decoding_follows_the_full_forward(keys):
    from tests.inference.test_sample import PROMPTS, assert_greedy

    cfg = tiny_config(**keys)
    params = option_params(cfg)
    out = gpt_neo.generate(cfg, params, PROMPTS, max_new_tokens=12, temperature=0.0)
    assert [len(o) for o in out] == [12, 12, 12]
    assert_greedy(cfg, params, PROMPTS, out)


@pytest.mark.parametrize(
    "kv_heads, split",
    [(4, ("y",)), (2, ())],
    ids=["kv-heads-split-like-heads", "kv-heads-whole-on-each-device"],
)
def test_grouped_query_attention_sharded_over_heads_equals_one_device(kv_heads, split):
    """Key/value heads follow `heads` where its mesh axes divide them, and stay whole on each
    device where not; both compute what one device does."""
    keys = dict(
        rotary_emb=True,
        n_kv_head=kv_heads,
        norm="rmsnorm",
        bias=False,
        qk_norm=True,
        scale_attn_weights=True,
        mesh_shape="x:2,y:4",
        layout="batch:x,heads:y,mlp:y",
        param_layout="embd:x",
    )
    cfg = tiny_config(**keys)
    assert gpt_neo.mesh.rules(cfg).parameters.get("kv_heads", ()) == split
    single = cfg.replace(mesh_shape=None, layout=None, param_layout=None)
    params = option_params(single)
    tokens = random_tokens(cfg, batch=4)
    mesh = gpt_neo.make_mesh(cfg)
    sharded = jax.device_put(params, gpt_neo.models.gpt.param_shardings(cfg, mesh))
    np.testing.assert_allclose(
        gpt_neo.apply(cfg, sharded, tokens), gpt_neo.apply(single, params, tokens), atol=2e-5
    )


def test_sharded_options_equal_single_device():
    keys = dict(
        rotary_emb=True,
        rotary_pct=0.5,
        mlp_glu=True,
        no_weight_tie=True,
        num_mem_kv=2,
        macaron=True,
        mesh_shape="x:2,y:4",
        layout="batch:x,heads:y,mlp:y,vocab:y",
    )
    cfg = tiny_config(**keys)
    single = cfg.replace(mesh_shape=None, layout=None)
    params = option_params(single)
    tokens = random_tokens(cfg, batch=4)
    sharded = jax.device_put(
        params, gpt_neo.models.gpt.param_shardings(cfg, gpt_neo.make_mesh(cfg))
    )
    np.testing.assert_allclose(
        gpt_neo.apply(cfg, sharded, tokens), gpt_neo.apply(single, params, tokens), atol=2e-5
    )


# --- export to transformers --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "keys",
    [
        dict(rotary_emb=True, attention_types=["global"] * 2, n_layer=2),
        dict(
            rotary_emb=True,
            rotary_pct=0.25,
            no_weight_tie=True,
            attention_types=["global"] * 2,
            n_layer=2,
        ),
        dict(no_weight_tie=True, attention_types=["global", "local"], n_layer=2),
    ],
    ids=["rotary-neox", "rotary-untied-neox", "untied-gpt-neo"],
)
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, keys):
    import torch
    from transformers import AutoModelForCausalLM

    from gpt_neo.interop.hf import export_hf, import_hf

    cfg = tiny_config(n_head=4, **keys)
    params = perturbed_params(cfg)
    export_hf(cfg, params, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(model).__name__ == ("GPTNeoXForCausalLM" if cfg.rotary_emb else "GPTNeoForCausalLM")
    tokens = random_tokens(cfg, batch=2)
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    ours = np.asarray(gpt_neo.apply(cfg, params, tokens))
    np.testing.assert_allclose(theirs, ours, atol=3e-5)
    if not cfg.rotary_emb:  # and back: the untied head survives the round trip
        imported_cfg, imported = import_hf(tmp_path / "hf")
        assert imported_cfg.no_weight_tie
        np.testing.assert_allclose(gpt_neo.apply(imported_cfg, imported, tokens), ours, atol=1e-5)


@pytest.mark.parametrize(
    "keys",
    [
        dict(axial_pos_emb=[4, 8]),
        dict(mlp_glu=True),
        dict(scalenorm=True),
        dict(rezero=True),
        dict(macaron=True),
        dict(share_parameters=True),
        dict(num_mem_kv=2),
        dict(no_weight_tie=True, gpt_neo_untied_head=True),
        dict(mlm_training=True, mlm_mask_id=1),
        dict(rotary_emb=True),  # with a local layer: GPT-NeoX has global attention only
    ],
    ids=lambda keys: "+".join(keys),
)
def test_export_refuses_what_transformers_cannot_express_naming_the_key(tmp_path, keys):
    from gpt_neo.errors import ConfigError
    from gpt_neo.interop.hf import export_hf

    cfg = tiny_config(attention_types=["global", "local"], n_layer=2, n_head=4, **keys)
    with pytest.raises(ConfigError) as error:
        export_hf(cfg, init_params(cfg, 0), tmp_path / "hf")
    named = [k for k in keys if k != "mlm_mask_id"][-1]
    assert named in str(error.value) and not (tmp_path / "hf").exists()
