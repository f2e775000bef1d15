"""The documentation: the pages' shell blocks run word for word, the site builds with --strict
(and a broken link fails it), and the public addresses agree everywhere."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.devices import FAST_COMPILE
from tests.support.helpers import REPO

DOCS = REPO / "docs"
SKIP_MARK = "<!-- docs test: not run"
# A tiny model and a few steps, for every model command of the pages (GPT_NEO_SET is a
# documented feature: own-data.md, "How this page is tested")
TINY = "train_steps=4 iterations=2 eval_steps=1 n_layer=2 n_ctx=128 train_batch_size=4"


def shell_blocks(page: Path) -> list[str]:
    """The page's ```sh blocks, in order, except those after a "docs test: not run" mark."""
    blocks = []
    for match in re.finditer(
        r"(?P<before>[^\n]*)\n```sh\n(?P<body>.*?)\n```", page.read_text(), re.S
    ):
        if not match["before"].startswith(SKIP_MARK):
            blocks.append(match["body"])
    return blocks


def test_the_tested_pages_have_shell_blocks_and_the_mark_skips_one():
    quickstart, own_data = shell_blocks(DOCS / "quickstart.md"), shell_blocks(DOCS / "own-data.md")
    assert quickstart[0].startswith("gpt-neo data demo") and len(quickstart) == 2
    assert own_data[0].startswith("python - <<'EOF'") and len(own_data) == 5
    assert "make demo" not in "".join(quickstart)  # the clone block is marked, so skipped


def run_page(page: str, folder: Path, overrides: str = TINY) -> str:
    """Run the page's shell blocks in order in `folder`, as a user would; the transcript."""
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # `gpt-neo` and `python`: this venv
        "XLA_FLAGS": FAST_COMPILE,  # a page's own XLA_FLAGS replace it
        "GPT_NEO_SET": overrides,
    }
    env.pop("JAX_PLATFORMS", None)  # as a user has it: the command keeps libtpu quiet itself
    transcript = []
    for block in shell_blocks(DOCS / page):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        transcript.append(f"$ {block}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, "\n".join(transcript)[-6000:]
    output = "\n".join(transcript)
    assert "libtpu" not in output and "TPU_WORKER_HOSTNAMES" not in output  # no probing noise
    return output


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("page", ["quickstart.md", "own-data.md"])
def test_every_shell_block_of_the_page_runs_verbatim(page, tmp_path):
    run_page(page, tmp_path)
    run = tmp_path / "runs" / ("demo" if page == "quickstart.md" else "mytext")
    assert (run / "checkpoints" / "4").is_dir() and (run / "predictions_4.txt").is_file()
    if page == "own-data.md":
        assert list((tmp_path / "datasets/mytext/tfrecords/eval").glob("mytext_*.tfrecords"))
        assert (run / "eval_4.json").is_file()
        assert (tmp_path / "mytext-hf" / "tokenizer.json").is_file()


@pytest.mark.process
@pytest.mark.slow
def test_the_fine_tuning_recipe_runs_verbatim(tmp_path):
    # a tiny GPT-Neo folder with a tokenizer stands in for the downloaded one
    from tests.support.helpers import random_hf_model, train_tokenizer_file

    folder = tmp_path / "gpt-neo-125M"
    random_hf_model(
        folder,
        vocab_size=320,
        max_position_embeddings=64,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=8,
    )
    texts = [f"Q: {a} plus {b}?\nA: {a + b}" for a in range(30) for b in range(0, 30, 7)]
    train_tokenizer_file(folder, texts, vocab_size=300).rename(folder / "tokenizer.json")
    output = run_page("fine-tuning.md", tmp_path, "train_steps=4 iterations=2 eval_steps=1")
    assert "packed" in output and "docs/row" in output  # the progress line's packing figures
    run = tmp_path / "runs" / "qa"
    assert (run / "checkpoints" / "4").is_dir() and (run / "predictions_4.txt").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("padding" in r and "segments_per_row" in r for r in records)


@pytest.mark.process
@pytest.mark.slow
def test_the_continued_pretraining_recipe_runs_verbatim(tmp_path):
    """Import a Qwen3 folder, train it with FSDP on 8 devices, export, load the export in
    transformers: its greedy continuation is the one `gpt-neo sample` prints."""
    output = run_page("continued-pretraining.md", tmp_path, "train_steps=4 iterations=2")
    assert "on 8 cpu device(s)" in output and "packed" in output
    (printed,) = re.findall(r"^Qwen3ForCausalLM (.*)$", output, re.M)
    hf_text = ast.literal_eval(printed)  # the page prints repr(text)
    assert len(hf_text) > 8 and f"Once upon a time{hf_text}" in output
    config = json.loads((tmp_path / "qwen3-cpt-hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["num_key_value_heads"] == 2


def build_site(docs: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    tmp_path.mkdir()
    config = tmp_path / "mkdocs.yml"
    text = (REPO / "mkdocs.yml").read_text().replace("docs_dir: docs", f"docs_dir: {docs}")
    config.write_text(text.replace("site_dir: site", f"site_dir: {tmp_path / 'site'}"))
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.process
@pytest.mark.slow
def test_the_site_builds_strictly_and_a_broken_link_fails_it(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    built = build_site(docs, tmp_path / "good")
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "good" / "site" / "own-data" / "index.html").is_file()

    page = docs / "quickstart.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    broken = build_site(docs, tmp_path / "bad")
    assert broken.returncode != 0
    assert "no-such-page.md" in broken.stderr


def test_every_page_is_in_the_nav_and_no_user_text_names_internal_paths():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []
    user_text = [REPO / "README.md", REPO / "CONTRIBUTING.md", *DOCS.glob("*.md")]
    for path in user_text:
        text = path.read_text()
        assert "../shared" not in text, path
        assert not re.search(r"\b[Ii]ssue \d+", text), path


def test_the_public_addresses_are_pyprojects_everywhere():
    urls = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]
    repository, documentation = urls["Repository"], urls["Documentation"]
    mkdocs = (REPO / "mkdocs.yml").read_text()
    assert f"repo_url: {repository}\n" in mkdocs and f"site_url: {documentation}\n" in mkdocs
    readme = (REPO / "README.md").read_text()
    slug = repository.removeprefix("https://github.com/")
    assert f"{repository}/actions/workflows/ci.yml" in readme and f"({documentation})" in readme
    assert f"colab.research.google.com/github/{slug}/blob/main/notebooks/" in readme
    notebook = (REPO / "notebooks" / "gpt_neo_example.ipynb").read_text()
    assert "EleutherAI/gpt-neo" not in notebook  # the archived Mesh-TensorFlow repository
