"""Model summary: counts checked against transformers, memory against real sharded arrays."""

import subprocess
import sys

import jax
import numpy as np
import pytest

import gpt_neo
from gpt_neo.interop.hf import hf_config
from gpt_neo.models.gpt import flops_per_token, param_count
from gpt_neo.planning.summary import print_summary
from gpt_neo.training.memory import memory_per_device, param_rows
from gpt_neo.training.trainer import Trainer
from main import main
from tests.support.helpers import REPO, tiny_config


@pytest.mark.parametrize("preset", ["gpt_neo_125M", "gpt_neo_1.3B", "gpt_neo_2.7B"])
def test_released_shapes_have_the_parameter_count_of_transformers_gpt_neo(preset):
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    cfg = gpt_neo.load_config(REPO / "configs" / f"{preset}.json")
    with torch.device("meta"):  # shapes only, no memory
        model = GPTNeoForCausalLM(GPTNeoConfig(**hf_config(cfg)))
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())  # lm_head is tied


@pytest.mark.parametrize("preset", ["llama_1B", "qwen3_1.7B"])
def test_the_llama_and_qwen_presets_count_what_transformers_builds_and_summarize(preset, capsys):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = gpt_neo.load_config(REPO / "configs" / f"{preset}.json")
    fields = dict(hf_config(cfg))
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(fields.pop("model_type"), **fields)
        )
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())  # tied: once
    print_summary(cfg)
    out = capsys.readouterr().out
    assert f"{cfg.n_head} heads x {cfg.head_dim} (8 key/value heads)" in out


def test_flops_per_token_conventions():
    cfg = tiny_config(n_layer=2, attention_types=["global", "none"], n_ctx=16)
    d, v, t = 64, 128, 16
    # by hand: wte + one attention (4 d^2 + d) + two MLPs (8 d^2 + 5 d) + 3 norms...
    n = v * d + (4 * d * d + d) + 2 * (8 * d * d + 5 * d) + 3 * 2 * d + 2 * d
    assert param_count(cfg, include_position_embedding=False) == n
    one_attention_layer = 1 * 8 * 8 * t  # L=1 (the none layer has no attention), H=8, Q=8
    assert flops_per_token(cfg, "6N+12LHQT") == 6 * n + 12 * one_attention_layer
    assert flops_per_token(cfg, "6N+6LHQT (causal)") == 6 * n + 6 * one_attention_layer
    with pytest.raises(ValueError, match="unknown FLOP convention"):
        flops_per_token(cfg, "8N")


def float_bytes_on(device, tree) -> int:
    return sum(
        s.data.nbytes
        for leaf in jax.tree.leaves(tree)
        if leaf.dtype == jax.numpy.float32
        for s in leaf.addressable_shards
        if s.device == device
    )


@pytest.mark.parametrize("opt_name", ["adam", "adafactor"])
@pytest.mark.parametrize(
    "layout",
    [
        {"mesh_shape": "x:2,y:4", "layout": "embd:x,heads:y,vocab:y,intermediate_expanded:y"},
        {"mesh_shape": "x:8", "layout": "batch:x", "param_layout": "embd:x"},
    ],
    ids=["tensor parallel", "fsdp"],
)
def test_per_device_memory_equals_the_bytes_of_real_sharded_train_state(opt_name, layout):
    # n_embd 128 and n_vocab 256: Adafactor factors wte and the MLP kernels, not the rest
    cfg = tiny_config(n_embd=128, n_vocab=256, train_batch_size=8, opt_name=opt_name, **layout)
    state = Trainer(cfg, gpt_neo.make_mesh(cfg)).init_state(0)
    device = jax.devices()[0]
    memory = memory_per_device(cfg)
    assert memory["parameters"] == float_bytes_on(device, state["params"])
    assert memory["optimizer state"] == float_bytes_on(device, state["opt_state"])


@pytest.mark.parametrize("kinds", [["global", "local", "linear", "none"], ["global", "local"] * 2])
def test_summary_rows_cover_every_parameter_of_every_layer(kinds):
    cfg = tiny_config(attention_types=kinds)  # looped, then stacked
    rows = param_rows(cfg)
    params = gpt_neo.init_params(cfg, 0)
    per_layer = len(jax.tree.leaves(params.get("blocks"))) + sum(
        len(jax.tree.leaves(stack)) * cfg.n_layer // len(params["stacks"])
        for stack in params.get("stacks", [])
    )
    others = len(
        jax.tree.leaves({k: v for k, v in params.items() if k not in ("blocks", "stacks")})
    )
    assert sum(r.layers for r in rows) == per_layer + others
    assert all(not r.name.startswith("stacks") for r in rows)  # rows name layers, stored either way


def test_cli_summary_prints_counts_shardings_and_runs_a_forward_pass(capsys):
    mesh = ["mesh_shape=x:4,y:2", "layout=batch:x,heads:y,vocab:y,intermediate_expanded:y"]
    assert main(["--model", str(REPO / "configs" / "demo.json"), "--summary", "--set", *mesh]) == 0
    out = capsys.readouterr().out
    cfg = gpt_neo.load_config(REPO / "configs" / "demo.json", overrides=mesh)
    assert f"parameters: {param_count(cfg):,}" in out
    assert "layers run as one lax.scan: 2 stack(s) of 2 (scan_layers)" in out  # [global, local] x 2
    assert "6N+12LHQT" in out and "6N+6LHQT (causal)" in out
    assert "per-device memory (adam), estimated: parameters" in out
    wte_row = next(line for line in out.splitlines() if line.strip().startswith("wte "))
    assert (
        "vocab,embd" in wte_row
        and "y,-" in wte_row
        and "8192x256" in wte_row
        and "4096x256" in wte_row
    )
    assert "forward pass on 8 cpu devices" in out
    loss = float(out.split("loss at init ")[1].split()[0])
    assert abs(loss - np.log(cfg.n_vocab)) < 0.5  # a fresh model guesses uniformly


def test_cli_overrides_apply(capsys):
    demo = str(REPO / "configs" / "demo.json")
    assert (
        main(
            [
                "--model",
                demo,
                "--set",
                "n_layer=2",
                'attention_types=["global","local"]',
                "--summary",
            ]
        )
        == 0
    )
    assert "2 layers (1 global, 1 local)" in capsys.readouterr().out


BAD_CONFIGS = {
    "malformed": ('{"n_embd": 64,\n "n_head": 4,,}', "line 2, column 14"),
    "unknown key": (
        '{"n_embd": 64, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 10, "n_embed": 3}',
        "Did you mean 'n_embd'",
    ),
    "wrong type": (
        '{"n_embd": "64", "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 10}',
        "must be an integer",
    ),
    "indivisible heads": (
        '{"n_embd": 64, "n_head": 6, "n_layer": 1, "n_ctx": 8, "n_vocab": 10}',
        "divisible by n_head",
    ),
    "layer count": (
        '{"n_embd": 64, "n_head": 4, "n_layer": 3, "n_ctx": 8, "n_vocab": 10, "attention_types": [[["global", "local"], 1]]}',
        "n_layer is 3",
    ),
    "activation": (
        '{"n_embd": 64, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 10, "activation_function": "gleu"}',
        "unknown activation_function",
    ),
    "attention type": (
        '{"n_embd": 64, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 10, "attention_types": ["sparse"]}',
        "unknown attention type",
    ),
    "layout": (
        '{"n_embd": 64, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 10, "mesh_shape": "x:8", "layout": "batch:x,heads:x"}',
        "mesh axis 'x'",
    ),
    "refused": (
        '{"n_embd": 64, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 10, "entmax_loss": true}',
        "is refused",
    ),
    "mlm without mask id": (
        '{"n_embd": 64, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 10, "mlm_training": true}',
        "needs mlm_mask_id",
    ),
    "axial too small": (
        '{"n_embd": 64, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 10, "axial_pos_emb": [2, 3]}',
        "d1 * d2 >= n_ctx",
    ),
    "odd rotary dims": (
        '{"n_embd": 64, "n_head": 4, "n_layer": 1, "n_ctx": 8, "n_vocab": 10, "rotary_emb": true, "rotary_pct": 0.1875}',
        "gives 3",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_cli_bad_config_is_one_error_line_and_exit_code_2(tmp_path, capsys, case):
    text, expected = BAD_CONFIGS[case]
    path = tmp_path / "bad.json"
    path.write_text(text)
    assert main(["--model", str(path), "--summary"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1


@pytest.mark.process
def test_cli_process_exits_2_without_traceback(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"n_embd": 64}')
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--model", str(path), "--summary"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "required key 'n_head'" in result.stderr


@pytest.mark.process
def test_cli_help_documents_each_flag():
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--model", "--set", "--summary"):
        assert flag in result.stdout


def test_summary_shows_both_layouts_and_the_padded_vocabulary(capsys):
    fsdp = ["mesh_shape=x:4,y:2", "layout=batch:x,vocab:y", "param_layout=embd:x", "n_vocab=8191"]
    assert main(["--model", str(REPO / "configs" / "demo.json"), "--summary", "--set", *fsdp]) == 0
    out = capsys.readouterr().out
    assert "layout (activations): batch->x, vocab->y\n" in out
    assert "param_layout (parameters): batch->x, vocab->y, embd->x" in out
    assert "8191 tokens, embedding padded to 8192 rows" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["wte"][2:] == ["8192x256", "vocab,embd", "y,x", "4096x64"]
    assert rows["blocks/*/mlp/fc_kernel"][2:] == ["256x1024", "embd,mlp", "x,-", "64x1024"]
    assert "forward pass on 8 cpu devices" in out


def test_the_summary_of_a_sequence_split_says_what_context_parallelism_sends(capsys):
    cfg = tiny_config(
        mesh_shape="x:4,y:2",
        layout="sequence:x,batch:y",
        context_parallel="ring",
        local_attention_radius=4,
        train_batch_size=8,
    )  # n_ctx 32, 8 heads x 8, float32; global, local, linear and none layers
    print_summary(cfg)
    out = capsys.readouterr().out
    assert "context parallelism (ring): each sequence split 4 ways, chunks of 4 tokens" in out
    # keys and values of one device's tokens: 2 x 4 rows x 8 tokens x 8 heads x 8 x 4 bytes =
    # 16 KiB; to the 3 other devices in the forward pass, again in the backward pass, and
    # their float32 gradients back: 9 x 16 KiB per softmax layer (global and local), 2 layers
    assert "each device sends 288.00 KiB of keys, values and their gradients" in out
