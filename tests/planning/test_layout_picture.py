"""--summary --summary_image: the mesh and each parameter's split, rendered and read back."""

import xml.etree.ElementTree as ET

import matplotlib.image
import numpy as np

from gpt_neo.planning.layout_picture import draw
from gpt_neo.training.memory import param_rows
from main import main
from tests.support.helpers import tiny_config, write_config

LAYOUT = dict(mesh_shape="x:4,y:2", layout="batch:x,heads:y,intermediate_expanded:y,vocab:y")


def svg_texts(path) -> list[str]:
    texts = ET.parse(path).getroot().iter("{http://www.w3.org/2000/svg}text")
    return ["".join(t.itertext()) for t in texts]


def test_the_svg_names_every_device_and_every_parameters_split(tmp_path):
    cfg = tiny_config(**LAYOUT)
    path = draw(cfg, {"x": 4, "y": 2}, str(tmp_path / "mesh.svg"))
    texts = svg_texts(path)
    joined = "\n".join(texts)
    for device in range(8):
        assert f"device {device}" in joined
    assert "x=3,y=1" in joined and "mesh x:4 x y:2 (8 devices)" in texts
    rows = param_rows(cfg)
    for row in rows:
        assert row.name in texts
        assert " x ".join(map(str, row.device_shape)) in texts
    wte = next(r for r in rows if r.name == "wte")
    assert "vocab:y, embd:-" in texts and wte.device_shape[0] * 2 == wte.shape[0]


def test_the_png_renders_and_the_command_line_writes_it(tmp_path):
    model = write_config(
        tmp_path / "m.json",
        {
            "n_embd": 64,
            "n_head": 8,
            "n_layer": 2,
            "n_ctx": 32,
            "n_vocab": 128,
            "mesh_shape": "x:8,y:2",
            "layout": "batch:x,heads:y",
        },
    )  # fmt: skip  (no train_batch_size: a model-only config; 16 devices: no forward pass)
    png = tmp_path / "mesh.png"
    assert main(["--model", model, "--summary", "--summary_image", str(png)]) == 0
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10  # not blank
    assert main(["--model", model, "--summary", "--summary_image", str(tmp_path / "m.gif")]) == 2


def test_the_picture_is_written_through_the_storage_layer_where_gs_paths_go():
    """`ram://` stands in for `gs://`: both go through tf.io.gfile (gpt_neo.storage)."""
    from gpt_neo import storage

    path = draw(tiny_config(**LAYOUT), {"x": 4, "y": 2}, "ram://picture-test/mesh.png")
    assert storage.read_bytes(path)[:8] == b"\x89PNG\r\n\x1a\n"
