"""report.html: built from the files a run writes, parsed back with an HTML parser."""

import base64
import json
from pathlib import Path

from gpt_neo.training.report import write_report
from tests.support.helpers import parse_report


def test_the_report_holds_the_plot_every_evaluation_and_the_newest_samples(tmp_path):
    records = [
        {"step": 1, "loss": 5.5},
        {"step": 2, "loss": 5.25},
        {"step": 2, "eval_loss": 5.125, "eval_perplexity": 168.2},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
    (tmp_path / "loss_curve.png").write_bytes(png)
    lambada = {"accuracy": 0.25, "perplexity": 40.5, "examples": 8}
    (tmp_path / "eval_2.json").write_text(json.dumps({"step": 2, "lambada": lambada}))
    (tmp_path / "predictions_1.txt").write_text("old sample")
    (tmp_path / "predictions_2.txt").write_text("new <sample> & more")

    page = parse_report(Path(write_report(str(tmp_path))).read_text())
    assert page["rows"] == [
        ["2", "eval_path", "eval_loss", "5.1250"],
        ["2", "eval_path", "eval_perplexity", "168.2000"],
        ["2", "lambada", "accuracy", "0.2500"],
        ["2", "lambada", "perplexity", "40.5000"],
        ["2", "lambada", "examples", "8"],
    ]
    [image] = page["images"]
    assert base64.b64decode(image.removeprefix("data:image/png;base64,")) == png
    assert page["pre"] == ["new <sample> & more"]  # the newest, escaped and read back


def test_a_run_without_evaluations_or_samples_still_gets_a_page(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    page = parse_report(Path(write_report(str(tmp_path))).read_text())
    assert page == {"rows": [], "images": [], "pre": []}
    assert "last step 1: loss 2.0000" in (tmp_path / "report.html").read_text()


def test_a_packed_run_reports_its_padding_and_documents_per_row(tmp_path):
    records = [
        {"step": 1, "loss": 2.0, "padding": 0.02, "segments_per_row": 6.0},
        {"step": 2, "loss": 1.5, "padding": 0.04, "segments_per_row": 7.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = Path(write_report(str(tmp_path))).read_text()
    assert "<h2>Packing</h2>" in text
    assert "padding 3.00% of input tokens; 6.50 documents per row" in text  # the means


def test_the_report_is_written_through_the_storage_layer_where_gs_paths_go(tmp_path):
    """`ram://` stands in for `gs://`: both go through tf.io.gfile (gpt_neo.storage)."""
    from gpt_neo import storage

    root = "ram://report-test/run"
    storage.makedirs(root)
    storage.write_text_atomic(f"{root}/metrics.jsonl", json.dumps({"step": 3, "loss": 1.5}) + "\n")
    storage.write_text_atomic(f"{root}/predictions_3.txt", "a sample")
    page = parse_report(storage.read_text(write_report(root)))
    assert page["pre"] == ["a sample"]
    assert "last step 3: loss 1.5000" in storage.read_text(f"{root}/report.html")
