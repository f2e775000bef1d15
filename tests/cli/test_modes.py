"""main.py --predict / --eval / --export and `python -m gpt_neo.cli.hf import`, end to end on a
trained checkpoint, each checked against a second code path (full forwards, transformers)."""

import io
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

import gpt_neo
from gpt_neo.cli.hf import main as hf_main
from gpt_neo.config import load_config
from gpt_neo.data.encoders import load_encoder, train_byte_level_bpe
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.inference.predict import DEFAULT_PROMPT
from gpt_neo.training.step import loss_fn
from main import main
from tests.support.helpers import SMALL_RUN, WORDS, restore_params, write_text_dataset

STEPS = 6


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained STEPS steps on a dataset whose tokenizer is a small trained BPE."""
    folder = tmp_path_factory.mktemp("modes")
    dataset = json.loads(Path(write_text_dataset(folder / "text")).read_text())
    tokenizer = train_byte_level_bpe([" ".join(WORDS)] * 50, vocab_size=300)
    tokenizer.save(str(folder / "tokenizer.json"))
    dataset |= {"tokenizer_path": str(folder / "tokenizer.json"), "eos_id": 0, "n_vocab": 300}
    (folder / "bpe.json").write_text(json.dumps(dataset))
    config = {
        **SMALL_RUN,
        "train_steps": STEPS,
        "eval_steps": 2,
        "predict_steps": 1,
        "predict_batch_size": 2,
        "predict_max_steps": 4,
        "datasets": [[str(folder / "bpe.json"), 1, "documents_random", 1.0]],
        "model_path": str(folder / "run"),
    }
    (folder / "model.json").write_text(json.dumps(config))
    model = str(folder / "model.json")
    assert main(["--model", model, "--steps_per_checkpoint", str(STEPS)]) == 0
    cfg = load_config(model)
    # predict_steps > 0: samples of the default prompt after each checkpoint
    during_training = (folder / "run" / f"predictions_{STEPS}.txt").read_text()
    assert during_training.count("SAMPLE") == 2 and DEFAULT_PROMPT[-40:] in during_training
    params = restore_params(f"{cfg.model_path}/checkpoints/{STEPS}/state")
    return folder, model, cfg, params, load_encoder(folder / "tokenizer.json")


def greedy_by_full_forwards(cfg, params, ids, n):
    ids = list(ids)
    for _ in range(n):
        logits = np.asarray(gpt_neo.apply(cfg, params, np.array([ids], np.int32)))[0, -1]
        ids.append(int(logits.argmax()))
    return ids


def test_predict_writes_greedy_continuations_of_the_prompt(trained, tmp_path, capsys):
    folder, model, cfg, params, encoder = trained
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown")
    args = ["--model", model, "--predict", "--prompt", str(prompt), "--temperature", "0"]
    assert main([*args, "--max_new_tokens", "6"]) == 0
    ids = encoder.encode("the quick brown")
    expected = "the quick brown" + encoder.decode(
        greedy_by_full_forwards(cfg, params, ids, 6)[len(ids) :]
    )
    written = (folder / "run" / f"predictions_{STEPS}.txt").read_text()
    assert written.count("SAMPLE") == cfg.predict_batch_size
    assert expected in written and expected in capsys.readouterr().out


def test_interactive_streams_each_line(trained, monkeypatch, capsys):
    _folder, model, cfg, params, encoder = trained
    monkeypatch.setattr("sys.stdin", io.StringIO("the lazy\n\nseven wizards\n"))
    args = ["--model", model, "--predict", "--interactive", "--temperature", "0"]
    assert main([*args, "--max_new_tokens", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    for line, text in zip(out, ["the lazy", "seven wizards"], strict=True):
        ids = encoder.encode(text)
        assert line == encoder.decode(greedy_by_full_forwards(cfg, params, ids, 4)[len(ids) :])


def test_predict_refuses_an_empty_prompt_and_a_missing_or_foreign_checkpoint(
    trained, tmp_path, capsys
):
    _folder, model, *_ = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["--model", model, "--predict", "--prompt", str(empty)]) == 2
    elsewhere = ["--set", f"model_path={tmp_path / 'nothing'}"]
    assert main(["--model", model, "--predict", *elsewhere]) == 2
    assert main(["--model", model, "--predict", "--set", "n_embd=64"]) == 2
    err = capsys.readouterr().err
    assert "is empty" in err and "no checkpoint in" in err and "written for another model" in err


def direct_loglikelihood(cfg, params, context, continuation):
    ids = (context + continuation)[-(cfg.n_ctx + 1) :]
    logits = np.asarray(gpt_neo.apply(cfg, params, np.array([ids[:-1]], np.int32)))[0]
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    rows = range(len(ids) - 1 - len(continuation), len(ids) - 1)
    ll = sum(logp[r, ids[r + 1]] for r in rows)
    return ll, all(logits[r].argmax() == ids[r + 1] for r in rows)


def test_eval_reports_validation_lambada_and_wikitext(trained, tmp_path, capsys):
    folder, model, cfg, params, encoder = trained
    passages = ["the quick brown fox jumps over the lazy dog", "seven wizards quietly hex the fox"]
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    wiki_text = " ".join(WORDS * 4)  # longer than n_ctx tokens: several rolling windows
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(wiki_text)
    args = [
        "--model",
        model,
        "--eval",
        "--lambada_path",
        str(lambada),
        "--wikitext_path",
        str(wiki),
    ]
    assert main(args) == 0
    assert "lambada" in capsys.readouterr().out
    results = json.loads((folder / "run" / f"eval_{STEPS}.json").read_text())
    scores = [
        direct_loglikelihood(cfg, params, encoder.encode(c), encoder.encode(" " + w))
        for c, _, w in (p.rpartition(" ") for p in passages)
    ]
    assert results["lambada"]["accuracy"] == np.mean([g for _, g in scores])
    assert results["lambada"]["perplexity"] == pytest.approx(
        math.exp(-np.mean([s for s, _ in scores])), rel=1e-4
    )
    # rolling windows, built independently: each predicts up to n_ctx fresh tokens, conditioned
    # on as many earlier tokens as fit; the first on eos
    stream = [0, *encoder.encode(wiki_text)]
    total, predicted = 0.0, 1
    while predicted < len(stream):
        fresh = stream[predicted : predicted + cfg.n_ctx]
        context = stream[max(0, predicted + len(fresh) - cfg.n_ctx - 1) : predicted]
        total += direct_loglikelihood(cfg, params, context, fresh)[0]
        predicted += len(fresh)
    assert results["wikitext"]["word_perplexity"] == pytest.approx(
        math.exp(-total / len(wiki_text.split())), rel=1e-4
    )
    assert results["validation"]["perplexity"] == pytest.approx(
        math.exp(results["validation"]["loss"])
    )


def test_lambada_can_score_the_last_token_only(trained, tmp_path):
    folder, model, cfg, params, encoder = trained
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text(json.dumps({"text": "the quick brown fox jumps over"}) + "\n")
    assert (
        main(
            [
                "--model",
                model,
                "--eval",
                "--lambada_path",
                str(lambada),
                "--lambada_last_token",
                "--set",
                "eval_steps=0",
            ]
        )
        == 0
    )
    results = json.loads((folder / "run" / f"eval_{STEPS}.json").read_text())
    ids = encoder.encode("the quick brown fox jumps over")
    ll, _ = direct_loglikelihood(cfg, params, ids[:-1], ids[-1:])
    assert results["lambada"]["perplexity"] == pytest.approx(math.exp(-ll), rel=1e-4)
    assert results["lambada"]["scored"] == "last token"


@pytest.mark.process
def test_export_loads_in_transformers_then_import_continues_training(trained, tmp_path, capsys):
    import torch
    from transformers import AutoTokenizer, GPTNeoForCausalLM

    _folder, model, cfg, params, encoder = trained
    out = tmp_path / "hf"
    assert main(["--model", model, "--export", str(out)]) == 0
    hf = GPTNeoForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.n_vocab, (2, cfg.n_ctx))
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(hf_logits - np.asarray(gpt_neo.apply(cfg, params, tokens))).max() < 1e-4
    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = encoder.encode("the quick brown fox")
    assert hf_tokenizer("the quick brown fox")["input_ids"] == prompt
    with torch.no_grad():
        hf_greedy = hf.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=8,
            min_new_tokens=8,
            eos_token_id=None,
            pad_token_id=0,
        )
    ours = gpt_neo.generate(cfg, params, [prompt], max_new_tokens=8, temperature=0.0, eos_id=None)
    assert hf_greedy[0, len(prompt) :].tolist() == ours[0]
    assert hf_tokenizer.decode(ours[0]) == encoder.decode(ours[0])
    assert main(["--model", model, "--export", str(out)]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err

    # without run keys, the folder's tokenizer is kept: sampling works at once
    kept = tmp_path / "kept"
    assert hf_main(["import", str(out), "--model_path", str(kept)]) == 0
    assert load_encoder(kept / "tokenizer").encode("the quick brown fox") == prompt
    (tmp_path / "prompt.txt").write_text("the quick brown fox")
    greedy = [
        "--temperature",
        "0",
        "--max_new_tokens",
        "8",
        "--prompt",
        str(tmp_path / "prompt.txt"),
    ]
    assert main(["--model", str(kept / "config.json"), "--predict", *greedy]) == 0
    assert "the quick brown fox" in (kept / "predictions_0.txt").read_text()

    run = tmp_path / "imported"
    more = ["--set", "train_steps=1", "iterations=1"]
    assert hf_main(["import", str(out), "--model_path", str(run), "--model", model, *more]) == 0
    assert hf_main(["import", str(out), "--model_path", str(run), "--model", model]) == 2
    assert main(["--model", str(run / "config.json"), "--steps_per_checkpoint", "1"]) == 0
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    imported_cfg = load_config(str(run / "config.json"))
    batch = InputPipeline(imported_cfg).next_batch().tokens
    expected = float(
        jax.jit(lambda p, t: loss_fn(imported_cfg, p, t, None)[1]["loss"])(params, batch)
    )
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5)
