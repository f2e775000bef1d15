"""The built-in demo corpus (Python's standard library) and main.py --check_dataset over it."""

import json
import sysconfig
from pathlib import Path

import pytest

from gpt_neo.cli.demo_corpus import main as build_demo
from gpt_neo.config import from_dict
from gpt_neo.data import demo_corpus
from gpt_neo.data.dataset_config import load_dataset_config
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.data.records import iter_records, list_files
from main import main
from tests.support.helpers import REPO


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert build_demo(["--megabytes", "0.3", "--vocab_size", "600", "--quiet"]) == 0
    return root


def test_demo_corpus_records_decode_to_the_standard_library_sources(demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)
    dataset = load_dataset_config("demo")
    encoder = dataset.encoder()
    sources = demo_corpus.stdlib_sources(0.3)
    train_sources = [p for i, p in enumerate(sources) if i % demo_corpus.EVAL_EVERY]
    records = list(iter_records(list_files(dataset.path, what="demo")))
    assert len(records) == len(train_sources) > 10
    for record, source in zip(records[:5], train_sources[:5], strict=True):
        assert record[-1] == dataset.eos_id
        assert encoder.decode(record[:-1]) == source.read_text(encoding="utf-8")
    assert Path(sysconfig.get_paths()["stdlib"]) in train_sources[0].parents


def test_demo_corpus_feeds_the_pipeline_and_rebuilding_reuses_it(demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)
    cfg = from_dict(
        {
            "n_embd": 8,
            "n_head": 1,
            "n_layer": 1,
            "n_ctx": 64,
            "n_vocab": 600,
            "train_batch_size": 4,
            "datasets": [["demo", 1, "documents_random", 1.0]],
        }
    )
    batch = InputPipeline(cfg, process_index=0, process_count=1).next_batch().tokens
    assert batch.shape == (4, 65) and batch.max() < 600
    eval_batch = InputPipeline(cfg, eval=True, process_index=0, process_count=1).next_batch().tokens
    assert eval_batch.shape == (4, 65)
    stamp = (demo_dir / "datasets/demo/tokenizer/byte-level-bpe.tokenizer.json").stat().st_mtime_ns
    assert build_demo(["--megabytes", "0.3", "--vocab_size", "600", "--quiet"]) == 0
    assert (
        demo_dir / "datasets/demo/tokenizer/byte-level-bpe.tokenizer.json"
    ).stat().st_mtime_ns == stamp


def test_check_dataset_cli(demo_dir, monkeypatch, capsys):
    monkeypatch.chdir(demo_dir)
    model = demo_dir / "model.json"
    keys = {
        "n_embd": 8,
        "n_head": 1,
        "n_layer": 1,
        "n_ctx": 64,
        "n_vocab": 600,
        "datasets": [["demo", 1, "documents_random", 1.0]],
    }
    model.write_text(json.dumps(keys))
    assert main(["--model", str(model), "--check_dataset", "--check_records", "0"]) == 0
    out = capsys.readouterr().out
    assert "--- demo record 0" in out and "read all records" in out
    high = int(out.split("token ids ")[1].split("..")[1].split(";")[0])
    assert 300 < high < 600
    assert main(["--model", str(model), "--set", f"n_vocab={high}", "--check_dataset"]) == 1
    assert f"error: demo: token id {high} >= n_vocab {high}" in capsys.readouterr().out


def test_make_demo_samples_from_a_python_prompt_that_suits_the_corpus(demo_dir, monkeypatch):
    """The demo model learns Python source: its prompt is Python, which the demo tokenizer
    (trained on that source) packs into fewer tokens per character than GPT-Neo's English
    unicorn prompt."""
    from gpt_neo.inference.predict import DEFAULT_PROMPT

    predict = next(
        line for line in (REPO / "Makefile").read_text().splitlines() if " sample " in line
    )
    prompt_file = REPO / predict.split("--prompt ")[1].split()[0]
    prompt = prompt_file.read_text()
    compile(prompt + "    pass\n", str(prompt_file), "exec")  # Python, ready to be continued
    monkeypatch.chdir(demo_dir)
    encoder = load_dataset_config("demo").encoder()
    chars_per_token = {
        text: len(text) / len(encoder.encode(text)) for text in (prompt, DEFAULT_PROMPT)
    }
    assert chars_per_token[prompt] > chars_per_token[DEFAULT_PROMPT]


@pytest.mark.process
def test_the_moe_demo_config_trains_on_the_demo_corpus(demo_dir, monkeypatch, capsys):
    """configs/demo_moe.json as `make demo` runs demo.json, at a size a test affords."""
    monkeypatch.chdir(demo_dir)
    smaller = {
        "n_embd": 32,
        "n_head": 4,
        "n_ctx": 64,
        "n_vocab": 600,
        "local_attention_radius": 16,
        "train_batch_size": 8,
        "eval_batch_size": 8,
        "mesh_shape": "x:8",  # the test's 8 simulated devices: experts split over them
        "layout": "batch:x,experts:x",
        "train_steps": 4,
        "iterations": 2,
        "eval_steps": 1,
        "model_path": str(demo_dir / "moe_run"),
        "moe_params": {"moe_num_experts": 8, "moe_hidden_size": 32, "moe_group_size": 64},
    }
    flags = [f"{key}={json.dumps(value)}" for key, value in smaller.items()]
    assert main(["--model", str(REPO / "configs" / "demo_moe.json"), "--set", *flags]) == 0
    out = capsys.readouterr().out
    assert "step 4/4 | loss" in out and "MoE loss" in out and "eval at step 4" in out
    lines = (demo_dir / "moe_run" / "metrics.jsonl").read_text().splitlines()
    train = [record for record in map(json.loads, lines) if "loss" in record]
    assert {"moe/1/dropped", "moe/3/dropped"} <= train[-1].keys()
