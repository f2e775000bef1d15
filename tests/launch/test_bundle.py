"""What the pod launcher ships: the checkout's tracked files (as they are in the working tree),
`--ship` paths, and the run's config, never what merely lies in the checkout."""

import io
import json
import subprocess
import tarfile

import pytest

from gpt_neo.config import from_dict
from gpt_neo.errors import ConfigError
from gpt_neo.launch import bundle
from tests.support.helpers import REPO, SMALL_RUN


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    """A git checkout with tracked, edited, untracked and ignored files."""
    root = tmp_path / "checkout"
    (root / "gpt_neo").mkdir(parents=True)
    (root / "main.py").write_text("print('main')\n")
    (root / "gpt_neo" / "model.py").write_text("committed\n")
    (root / ".gitignore").write_text("gpt_neo_notebook/\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    (root / "gpt_neo" / "model.py").write_text("edited, not committed\n")
    (root / "gpt_neo" / "new_module.py").write_text("not added yet\n")
    (root / "outputs").mkdir()
    (root / "outputs" / "big.bin").write_bytes(b"\0" * 1000)
    (root / "gpt_neo_notebook").mkdir()
    (root / "gpt_neo_notebook" / "ckpt").write_text("ignored\n")
    return root


def members(shipped: bundle.Bundle) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(shipped.data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def config():
    return from_dict({**SMALL_RUN, "model_path": "gs://bucket/run"})


@pytest.mark.process
def test_only_tracked_files_ship_and_the_untracked_are_named(checkout):
    shipped = bundle.build(config(), root=checkout)
    files = members(shipped)
    assert set(files) == {".gitignore", "main.py", "gpt_neo/model.py", "run/config.json"}
    assert files["gpt_neo/model.py"] == b"edited, not committed\n"  # the working tree's
    assert json.loads(files["run/config.json"])["model_path"] == "gs://bucket/run"
    assert shipped.untracked == ("gpt_neo/new_module.py", "outputs/big.bin")
    assert shipped.files == 4


@pytest.mark.process
def test_ship_adds_files_and_folders_of_the_checkout(checkout, monkeypatch):
    monkeypatch.chdir(checkout)
    shipped = bundle.build(config(), root=checkout, ship=["gpt_neo/new_module.py", "outputs"])
    assert {"gpt_neo/new_module.py", "outputs/big.bin"} <= set(members(shipped))
    assert shipped.untracked == ()
    with pytest.raises(ConfigError, match="--ship nowhere: no such file or folder"):
        bundle.build(config(), root=checkout, ship=["nowhere"])
    with pytest.raises(ConfigError, match="not inside the checkout"):
        bundle.build(config(), root=checkout, ship=[str(checkout.parent)])


@pytest.mark.process
def test_this_checkout_ignores_what_the_notebook_and_the_launcher_write():
    """The notebook's working folder (wherever it is run from) and the launcher's logs."""
    notebook = json.loads((REPO / "notebooks" / "gpt_neo_example.ipynb").read_text())
    work = next(
        line.split('"')[1]
        for cell in notebook["cells"]
        for line in cell["source"]
        if line.startswith("WORK = ")
    )
    for path in (f"{work}/run/x", f"notebooks/{work}/run/x", "tpu_logs/pod/attempt-1/w.log"):
        ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", path])
        assert ignored.returncode == 0, f"{path} is not ignored"
