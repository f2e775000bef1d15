"""notebooks/gpt_neo_example.ipynb, executed cell by cell on a real kernel (nbclient), on one
CPU device as Colab's CPU runtime has: the whole journey, from text to a fine-tuned import."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.support.helpers import REPO

NOTEBOOK = REPO / "notebooks" / "gpt_neo_example.ipynb"


def test_the_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


@pytest.mark.process
@pytest.mark.slow
def test_every_cell_runs_on_a_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # the kernel inherits this: one device, as on Colab
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # a failing cell raises CellExecutionError with its traceback

    work = tmp_path / "gpt_neo_notebook"
    steps = sorted(int(p.name) for p in (work / "run/checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 60  # trained to 30, then resumed to 60
    evals = json.loads((work / "run/eval_60.json").read_text())
    assert 0.0 <= evals["lambada"]["accuracy"] <= 1.0
    assert "<table>" in (work / "run/report.html").read_text()
    [export_cell] = [c for c in nb.cells if "GPTNeoForCausalLM.from_pretrained" in c.source]
    printed = [o.get("text", "") for o in export_cell.outputs if o.get("name") == "stdout"]
    last_line = "".join(printed).splitlines()[-1]
    assert last_line.startswith("The quick brown fox")  # transformers generated from the export
    finetuned = sorted(p.name for p in (work / "finetune/checkpoints").iterdir())
    assert "10" in finetuned and Path(work / "hf_export/config.json").is_file()
