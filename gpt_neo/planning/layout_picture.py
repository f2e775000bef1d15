"""`--summary --summary_image mesh.png|svg`: the device mesh as a grid, and a table of how each
parameter kind is split over it (which mesh axis each dimension is split over, the shape
each device holds): the text `--summary` prints, for people who would rather look.

matplotlib draws it (already a dependency, for loss_curve.png); SVG keeps its text as text.
"""

from __future__ import annotations

import io
import itertools
import math

from gpt_neo import storage
from gpt_neo.config import Config
from gpt_neo.errors import ConfigError
from gpt_neo.training.memory import param_rows

FORMATS = ("png", "svg")
MOST_CELLS = 64  # larger meshes are drawn as one labelled block


def draw(cfg: Config, sizes: dict[str, int], path: str) -> str:
    """Write the picture of `cfg`'s layout on a mesh of `sizes` to `path`; returns `path`."""
    kind = path.rsplit(".", 1)[-1].lower()
    if kind not in FORMATS:
        raise ConfigError(f"--summary_image {path}: give a .png or .svg file name")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = param_rows(cfg)
    with plt.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        fig, (grid, table) = plt.subplots(
            2, 1, figsize=(10, 3 + 0.3 * len(rows)), height_ratios=[2, 0.4 + 0.25 * len(rows)]
        )
        _grid(grid, sizes)
        _table(table, rows)
        fig.tight_layout()
        data = io.BytesIO()
        fig.savefig(data, format=kind, dpi=100)
        plt.close(fig)
    storage.write_bytes_atomic(path, data.getvalue())
    return path


def _grid(ax, sizes: dict[str, int]) -> None:
    names = list(sizes)
    rows = sizes[names[0]]
    cols = math.prod(sizes[n] for n in names[1:])
    shape = " x ".join(f"{n}:{s}" for n, s in sizes.items())
    ax.set_title(f"mesh {shape} ({math.prod(sizes.values())} devices)")
    ax.set_axis_off()
    if rows * cols > MOST_CELLS:
        ax.add_patch(_box(0, 0, 1, 1))
        ax.text(0.5, 0.5, f"{shape}\n(too many devices to draw one by one)", ha="center")
        return
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    for index, coords in enumerate(itertools.product(*(range(sizes[n]) for n in names))):
        row, col = coords[0], _flat(coords[1:], [sizes[n] for n in names[1:]])
        ax.add_patch(_box(col + 0.05, row + 0.05, 0.9, 0.9))
        label = ",".join(f"{n}={c}" for n, c in zip(names, coords, strict=True))
        ax.text(col + 0.5, row + 0.5, f"device {index}\n{label}", ha="center", va="center",
                fontsize=8)  # fmt: skip


def _flat(coords, sizes) -> int:
    index = 0
    for c, s in zip(coords, sizes, strict=True):
        index = index * s + c
    return index


def _box(x, y, w, h):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, facecolor="#dde8f5", edgecolor="#36c")


def _per_dim(row) -> list[str]:
    """The mesh axes of each dimension ("-": not split); PartitionSpecs drop trailing ones."""
    split = row.spec.split(",") if row.spec != "-" else []
    return split + ["-"] * (len(row.axes) - len(split))


def _table(ax, rows) -> None:
    ax.set_axis_off()
    cells = [
        [
            r.name,
            str(r.layers),
            " x ".join(map(str, r.shape)),
            ", ".join(f"{a or '-'}:{m}" for a, m in zip(r.axes, _per_dim(r), strict=True)),
            " x ".join(map(str, r.device_shape)),
        ]
        for r in rows
    ]
    header = ["parameter", "layers", "shape", "dimension: mesh axes", "per device"]
    table = ax.table(cellText=cells, colLabels=header, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.auto_set_column_width(list(range(len(header))))
