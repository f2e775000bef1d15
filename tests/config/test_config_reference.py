"""docs/config.md is generated from the config schema and must be current."""

import dataclasses

from gpt_neo import config
from gpt_neo.cli import config_reference as command
from gpt_neo.config import reference as config_reference


def test_docs_config_md_is_what_the_generator_writes_now():
    assert command.main(["--check"]) == 0, (
        "docs/config.md is out of date: run python -m gpt_neo.cli.config_reference"
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


def test_a_stale_page_is_reported(tmp_path):
    page = tmp_path / "config.md"
    page.write_text(config_reference.render().replace("Transformer blocks.", "Blocks."))
    assert command.main(["--check", "--output", str(page)]) == 1
    assert command.main(["--output", str(page)]) == 0
    assert command.main(["--check", "--output", str(page)]) == 0
