"""`model_path/report.html`: one page to look at a run: the loss curve, every evaluation (the
eval loss logged during training and each `--eval`'s tasks) and the newest samples.

Rebuilt from what the run already wrote (metrics.jsonl, loss_curve.png, eval_<step>.json,
predictions_<step>.txt) at the end of training and after each `--eval`, so it is never the
only copy of anything. Self-contained: the plot is inlined, the page needs no other file.
"""

from __future__ import annotations

import base64
import html
import json
import re

from gpt_neo import storage
from gpt_neo.storage import join

NAME = "report.html"


def write_report(model_path: str) -> str:
    """Write `model_path/report.html` from the run's files; returns its path."""
    path = join(model_path, NAME)
    storage.write_text_atomic(path, render(model_path))
    return path


def render(model_path: str) -> str:
    records = _metrics(model_path)
    train = [r for r in records if "loss" in r]
    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>gpt-neo run {html.escape(model_path)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:.2em .6em}"
        "pre{white-space:pre-wrap;background:#f4f4f4;padding:.6em}</style>",
        "</head><body>",
        f"<h1>{html.escape(model_path)}</h1>",
    ]
    if train:
        last = train[-1]
        parts.append(
            f"<p>{len(train)} logged steps; last step {last.get('step')}: loss "
            f"{last['loss']:.4f}</p>"
        )
        parts += _packing(train)
    parts += _plot(model_path) + _evaluations(model_path, records) + _samples(model_path)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _packing(train: list[dict]) -> list[str]:
    """Packed data: how full the windows were over the run."""
    packed = [r for r in train if "padding" in r]
    if not packed:
        return []
    padding = sum(r["padding"] for r in packed) / len(packed)
    segments = sum(r["segments_per_row"] for r in packed) / len(packed)
    return [
        "<h2>Packing</h2>",
        f"<p>padding {100 * padding:.2f}% of input tokens; {segments:.2f} documents per row "
        f"(mean of {len(packed)} logged intervals)</p>",
    ]


def _metrics(model_path: str) -> list[dict]:
    path = join(model_path, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def _by_step(model_path: str, pattern: str) -> list[tuple[int, str]]:
    """(step, file name) of the files named like `pattern` (one `(\\d+)`), newest last."""
    names = storage.listdir(model_path)
    return sorted((int(m.group(1)), n) for n in names if (m := re.match(pattern, n)))


def _plot(model_path: str) -> list[str]:
    path = join(model_path, "loss_curve.png")
    if not storage.exists(path):
        return []
    data = base64.b64encode(storage.read_bytes(path)).decode()
    return ["<h2>Loss</h2>", f'<img alt="loss curve" src="data:image/png;base64,{data}">']


def _evaluations(model_path: str, records: list[dict]) -> list[str]:
    rows = [
        (r["step"], "eval_path", name, value)
        for r in records
        if "eval_loss" in r
        for name, value in r.items()
        if name.startswith("eval_")
    ]
    for step, name in _by_step(model_path, r"eval_(\d+)\.json$"):
        results = json.loads(storage.read_text(join(model_path, name)))
        for task, metrics in results.items():
            if isinstance(metrics, dict):
                rows += [(step, task, metric, value) for metric, value in metrics.items()]
    if not rows:
        return []
    out = ["<h2>Evaluations</h2>", "<table>", "<tr><th>step</th><th>task</th>"]
    out[-1] += "<th>metric</th><th>value</th></tr>"
    for step, task, metric, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        cells = (str(step), task, metric, shown)
        out.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return [*out, "</table>"]


def _samples(model_path: str) -> list[str]:
    found = _by_step(model_path, r"predictions_(\d+)\.txt$")
    if not found:
        return []
    step, name = found[-1]
    text = storage.read_text(join(model_path, name))
    return [f"<h2>Samples at step {step}</h2>", f"<pre>{html.escape(text)}</pre>"]
