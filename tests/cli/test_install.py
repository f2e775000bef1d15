"""`pip install .` (not editable) in a fresh venv outside the checkout: the wheel's commands
and its bundled configs work from any directory. The venv borrows this environment's installed
dependencies through a .pth line (pip would otherwise download gigabytes), but not its
editable gpt_neo: the code that runs is the wheel's."""

import os
import subprocess
import sys
import sysconfig

import pytest

from tests.support.helpers import REPO, SAMPLE_TEXTS

COMMANDS = ("gpt-neo",)


def run(*command, cwd, env=None):
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, the wheel) after building the wheel and installing it."""
    root = tmp_path_factory.mktemp("install")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
        "-w", root / "wheel", REPO, cwd=root)  # fmt: skip
    [wheel] = (root / "wheel").glob("gpt_neo-*.whl")
    venv = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    (site / "site-packages" / "borrowed_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--quiet",
        "--no-deps", "--no-index", wheel, cwd=root)  # fmt: skip
    return venv / "bin", wheel


@pytest.mark.process
def test_the_wheel_is_what_runs_and_carries_the_commands_and_configs(installed, tmp_path):
    bin_dir, wheel = installed
    where = run(bin_dir / "python", "-c", "import gpt_neo; print(gpt_neo.__file__)", cwd=tmp_path)
    assert str(bin_dir.parent) in where and str(REPO) not in where
    assert all((bin_dir / command).is_file() for command in COMMANDS)
    assert wheel.stat().st_size < 2_000_000  # code and configs, no data


@pytest.mark.process
def test_gpt_neo_finds_the_bundled_configs_from_any_directory(installed, tmp_path):
    bin_dir, _ = installed
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    version = run(bin_dir / "gpt-neo", "--version", cwd=tmp_path, env=env)
    assert version.startswith("gpt-neo 0.") and "not installed" not in version
    summary = run(bin_dir / "gpt-neo", "summary", "--model", "gpt_neo_125M", cwd=tmp_path, env=env)
    assert "parameters: 125," in summary and "n_ctx 2048, n_vocab 50257" in summary


@pytest.mark.process
def test_the_data_commands_make_a_tokenizer_and_tfrecords_from_any_directory(installed, tmp_path):
    bin_dir, _ = installed
    texts = tmp_path / "texts"
    texts.mkdir()
    for k, text in enumerate(SAMPLE_TEXTS * 3):
        (texts / f"{k}.txt").write_text(text)
    run(bin_dir / "gpt-neo", "data", "tokenizer", "--input_dir", texts, "--output_dir",
        tmp_path / "tok", "--vocab_size", "300", cwd=tmp_path)  # fmt: skip
    [tokenizer] = (tmp_path / "tok").glob("*.json")
    run(bin_dir / "gpt-neo", "data", "tfrecords", "--input_dir", texts, "--output_dir",
        tmp_path / "records", "--encoder_path", tokenizer, "--name", "sample", "--quiet",
        cwd=tmp_path)  # fmt: skip
    assert list((tmp_path / "records").glob("sample_*.tfrecords"))
