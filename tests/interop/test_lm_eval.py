"""The lm-eval adapter: a local YAML task over local data, the harness's numbers against ours."""

import json
import math

import lm_eval
import pytest

import gpt_neo
from gpt_neo.inference.tasks import Scorer, lambada
from tests.cli.test_modes import trained  # noqa: F401  (the trained-model fixture)
from tests.support.devices import cpu_flags

PASSAGES = [
    "the quick brown fox jumps over the lazy dog",
    "seven wizards quietly hex the fox",
    "the lazy dog jumps over seven wizards",
]

TASK = """
task: local_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text.rsplit(' ', 1)[0]}}}}"
doc_to_target: "{{{{' ' + text.rsplit(' ', 1)[1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def adapter(trained, monkeypatch):  # noqa: F811
    from gpt_neo.interop.lm_eval import GPTNeoJAX

    _, model, cfg, params, encoder = trained
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return GPTNeoJAX.create_from_arg_string(f"config={model},batch_size=4"), cfg, params, encoder


def local_task(folder):
    """A LAMBADA-style lm-eval task over a local jsonl: (tasks folder, data file)."""
    data = folder / "lambada.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    (folder / "tasks").mkdir()
    (folder / "tasks" / "local_lambada.yaml").write_text(TASK.format(data=data))
    return folder / "tasks", data


@pytest.mark.process
def test_harness_scores_a_local_task_like_our_lambada(adapter, tmp_path):
    from lm_eval.tasks import TaskManager

    lm, cfg, params, encoder = adapter
    tasks, data = local_task(tmp_path)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=["local_lambada"],
        bootstrap_iters=0,  # its stderr bootstrap forks a Pool: unsafe in a JAX process
        task_manager=TaskManager(include_path=str(tasks)),
    )["results"]["local_lambada"]
    ours = lambada(Scorer(cfg, params), encoder, data)
    assert results["acc,none"] == pytest.approx(ours["accuracy"])
    assert results["perplexity,none"] == pytest.approx(ours["perplexity"], rel=1e-5)


class Request:
    def __init__(self, *args):
        self.args = args


def test_rolling_and_generation_requests_equal_our_scorer_and_decoder(adapter):
    lm, cfg, params, encoder = adapter
    text = " ".join(PASSAGES * 3)  # several n_ctx windows
    [rolling] = lm.loglikelihood_rolling([Request(text)])
    assert rolling == pytest.approx(
        Scorer(cfg, params).loglikelihood_rolling(encoder.encode(text), 0)
    )
    assert math.isfinite(rolling) and rolling < 0
    [generated] = lm.generate_until([Request("the quick", {"until": ["\n"], "max_gen_toks": 6})])
    greedy = gpt_neo.generate(
        cfg, params, [encoder.encode("the quick")], max_new_tokens=6, temperature=0.0, eos_id=0
    )[0]
    expected = encoder.decode([t for t in greedy if t != 0]).split("\n")[0]
    assert generated == expected
    [(ll, greedy_match)] = lm.loglikelihood([Request("the quick ", "brown")])
    direct = Scorer(cfg, params).loglikelihood(
        [(encoder.encode("the quick"), encoder.encode(" brown"))]
    )
    assert (ll, greedy_match) == pytest.approx(direct[0])


@pytest.mark.process
def test_the_command_line_wrapper_runs_the_harness(trained, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys

    _, model, cfg, params, encoder = trained
    tasks, data = local_task(tmp_path)
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": cpu_flags(8),
    }
    command = [
        sys.executable,
        "-m",
        "gpt_neo.cli.lm_eval",
        "run",
        "--model",
        "gpt-neo-jax",
        "--model_args",
        f"config={model}",
        "--tasks",
        "local_lambada",
        "--include_path",
        str(tasks),
        "--output_path",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    [results_file] = list((tmp_path / "out").rglob("results_*.json"))
    results = json.loads(results_file.read_text())["results"]["local_lambada"]
    ours = lambada(Scorer(cfg, params), encoder, data)
    assert results["acc,none"] == pytest.approx(ours["accuracy"])
    assert results["perplexity,none"] == pytest.approx(ours["perplexity"], rel=1e-5)
