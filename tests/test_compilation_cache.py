"""JAX's persistent compilation cache: a restarted run loads its compiled train step from
`model_path/compilation_cache` (or `--compilation_cache DIR`) instead of compiling it."""

import re
import time

import pytest

from gpt_neo import compilation_cache
from tests.support.helpers import SMALL_RUN, start_main, write_config, write_text_dataset

REPORT = re.compile(r"compilation cache (\S+): (\d+) hit\(s\), (\d+) miss\(es\), ([\d.]+)s")


@pytest.fixture(autouse=True)
def _default_cache_place(monkeypatch):
    """The suite shares one cache among the processes it starts; these tests check where a
    run's own goes."""
    monkeypatch.delenv(compilation_cache.ENV, raising=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text"), docs=20, eval_docs=2)


def train(model, *flags):
    """(output, seconds from start to the first logged step)."""
    start = time.monotonic()
    process = start_main("--model", model, "--steps_per_checkpoint", "2", *flags)
    first_step = None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if first_step is None and line.startswith("step "):
            first_step = time.monotonic() - start
    assert process.wait(timeout=300) == 0, "".join(lines)[-3000:]
    return "".join(lines), first_step


@pytest.mark.process
def test_a_restarted_run_loads_its_train_step_from_the_cache(tmp_path, dataset):
    keys = {
        **SMALL_RUN,
        "train_steps": 2,
        "lr_decay_end": 8,
        "datasets": [[dataset, 1, "documents_random", 1.0]],
        "model_path": str(tmp_path / "run"),
    }
    model = write_config(tmp_path / "model.json", keys)
    first, cold = train(model)
    directory, hits, _, _ = REPORT.search(first).groups()
    assert directory == str(tmp_path / "run" / "compilation_cache") and int(hits) == 0
    assert any((tmp_path / "run" / "compilation_cache").iterdir())

    # the same run, resumed further: the same programs, now from the cache
    second, warm = train(model, "--set", "train_steps=4")
    assert "training from step 2 to 4" in second
    _, hits, _, saved = REPORT.search(second).groups()
    assert int(hits) >= 1 and float(saved) > 0
    print(f"first step after {cold:.1f}s cold, {warm:.1f}s from the cache ({saved}s saved)")


@pytest.mark.process
def test_the_cache_can_live_elsewhere_or_be_off(tmp_path, dataset):
    keys = {
        **SMALL_RUN,
        "train_steps": 1,
        "datasets": [[dataset, 1, "documents_random", 1.0]],
        "model_path": str(tmp_path / "run"),
    }
    model = write_config(tmp_path / "model.json", keys)
    out, _ = train(model, "--compilation_cache", str(tmp_path / "cache"))
    assert REPORT.search(out).group(1) == str(tmp_path / "cache")
    assert any((tmp_path / "cache").iterdir())
    out, _ = train(model, "--new", "--yes", "--compilation_cache", "off")
    assert "compilation cache" not in out
    assert not (tmp_path / "run" / "compilation_cache").exists()


def test_the_environment_names_one_cache_for_every_run_and_the_flag_wins(monkeypatch, tmp_path):
    import jax

    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # keep the suite's own cache
    monkeypatch.setenv(compilation_cache.ENV, str(tmp_path / "shared"))
    assert compilation_cache.enable("runs/a", None) == str(tmp_path / "shared")
    assert compilation_cache.enable("runs/a", str(tmp_path / "mine")) == str(tmp_path / "mine")
    assert compilation_cache.enable("runs/a", "off") is None
    monkeypatch.delenv(compilation_cache.ENV)
    assert compilation_cache.enable("runs/a", None) == "runs/a/compilation_cache"
