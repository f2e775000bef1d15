"""docs/config.md is generated from the config schema and must be current."""

import dataclasses

from gpt_neo import config
from gpt_neo.cli import reference_pages as command
from gpt_neo.config import reference as config_reference


def test_docs_config_md_is_what_the_generator_writes_now():
    assert command.main(["--check"]) == 0, (
        "a generated page is out of date: run python -m gpt_neo.cli.reference_pages"
    )


def test_every_key_is_documented_with_its_docstring_type_and_default():
    docs = {doc.name: doc for doc in config_reference.key_docs()}
    assert list(docs) == [f.name for f in dataclasses.fields(config.Config)]
    assert all(doc.text for doc in docs.values()), [n for n, d in docs.items() if not d.text]
    assert docs["n_embd"].default == "required" and docs["lr"].default == "`0.0006`"
    assert docs["rotary_emb"].type == "true or false"
    assert "GPT-Neo switched it on with any value" in docs["rotary_emb"].text
    assert docs["model_path"].section == "Run" and docs["padding_id"].section == "Data"
    assert docs["precision"].type == "one of `float32`, `bfloat16`"  # a Literal's values


def test_a_stale_page_is_reported(tmp_path, capsys):
    assert command.main(["--docs", str(tmp_path)]) == 0
    assert command.main(["--check", "--docs", str(tmp_path)]) == 0
    page = tmp_path / "config.md"
    page.write_text(config_reference.render().replace("Transformer blocks.", "Blocks."))
    cli = tmp_path / "cli.md"
    cli.write_text(cli.read_text().replace("--steps_per_checkpoint", "--steps"))
    assert command.main(["--check", "--docs", str(tmp_path)]) == 1
    assert f"out of date: {page}, {cli}" in capsys.readouterr().out


def test_the_cli_page_shows_every_verb_and_main_py():
    page = command.render_cli()
    verbs = ["train", "summary", "check-data", "sample", "eval", "export", "launch", "init"]
    verbs += ["import hf", "import mesh-tf", "data tokenizer", "data tfrecords", "data demo"]
    for verb in verbs:
        assert f"## `gpt-neo {verb}`\n\n```text\nusage: gpt-neo {verb} " in page, verb
    assert "## `python main.py`" in page and "--steps_per_checkpoint N" in page
