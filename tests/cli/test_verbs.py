"""`gpt-neo VERB`: each verb parses to the flags main.py's mode reads, main.py's modes exclude
each other, `--help` imports no JAX, `init` writes a config that loads, and the old spellings
still parse."""

import json
import subprocess
import sys

import pytest

from gpt_neo.cli import main as main_py
from gpt_neo.cli import verbs
from gpt_neo.config import load_config
from gpt_neo.errors import ConfigError
from tests.support.helpers import REPO, SAMPLE_TEXTS

VERB_OF_MODE = {
    "--check_dataset": "check-data",
    "--summary": "summary",
    "--predict": "sample",
    "--eval": "eval",
}


def parse_verb(*argv):
    return verbs.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("flag, verb", list(VERB_OF_MODE.items()))
def test_a_verb_parses_like_main_py_with_its_mode_flag(flag, verb):
    old = main_py.parse_args(["--model", "demo", flag, "--set", "lr=0.1"])
    new = parse_verb(verb, "--model", "demo", "--set", "lr=0.1")
    assert main_py.mode_of(old) == verb
    shared = set(vars(new)) - {"verb", "handler"}
    assert shared and {k: getattr(old, k) for k in shared} == {k: vars(new)[k] for k in shared}


def test_export_and_train_and_launch_parse_to_the_same_names_as_main_py():
    old = main_py.parse_args(["--model", "demo", "--export", "out", "--force"])
    new = parse_verb("export", "--model", "demo", "--output_dir", "out", "--force")
    assert (new.export, new.force) == (old.export, old.force) == ("out", True)
    assert main_py.mode_of(old) == "export"
    train = parse_verb("train", "--model", "demo", "--steps_per_checkpoint", "7", "--new")
    assert (train.steps_per_checkpoint, train.new, train.tpu) == (7, True, None)
    launch = parse_verb("launch", "--model", "demo", "--tpu", "pod", "--zone", "z", "--spot")
    assert (launch.tpu, launch.zone, launch.spot, launch.heartbeat_timeout) == (
        "pod",
        "z",
        True,
        1800,
    )


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--summary", "--predict"], "--summary and --predict"),
        (["--check_dataset", "--eval"], "--check_dataset and --eval"),
        (["--eval", "--export", "out"], "--eval and --export"),
        (["--summary", "--interactive"], "--summary and --interactive"),
    ],
)
def test_two_main_py_modes_exit_2_naming_both(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        main_py.parse_args(["--model", "demo", *flags])
    assert exit_.value.code == 2
    assert f"{named} are different modes" in capsys.readouterr().err


def test_predict_with_interactive_is_one_mode():
    args = main_py.parse_args(["--model", "demo", "--predict", "--interactive"])
    assert main_py.mode_of(args) == "sample" and args.interactive


def test_the_old_spellings_are_aliases():
    assert parse_verb("import", "mesh-tf", "ck", "--model", "c.json", "--model_path", "o",
                      "--override", "a=1").overrides == ["a=1"]  # fmt: skip
    assert parse_verb("data", "tokenizer", "--base_dir", "t", "--vocab_size", "9").input_dir == "t"
    tfrecords = parse_verb("data", "tfrecords", "--input_dir", "t", "--encoder_path", "byte",
                           "--wikitext-detokenize")  # fmt: skip
    assert tfrecords.wikitext_detokenize and not tfrecords.ftfy


def test_version_names_the_package_and_python(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_verb("--version")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("gpt-neo ") and f"Python {sys.version.split()[0]}" in out


@pytest.mark.process
def test_help_of_every_verb_imports_neither_jax_nor_tensorflow():
    script = """
import sys
from gpt_neo.cli import verbs, reference_pages
parser = verbs.build_parser()
names = [name for name, _ in reference_pages._commands(parser, "gpt-neo")]
for name in names:
    try:
        parser.parse_args([*name.split()[1:], "--help"])
    except SystemExit:
        pass
print(len(names), sorted(m for m in ("jax", "tensorflow", "transformers") if m in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "15 []"


def test_init_writes_a_config_for_the_dataset_that_loads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "text"
    text.mkdir()
    for k, sample in enumerate(SAMPLE_TEXTS * 20):
        (text / f"{k}.txt").write_text(sample)
    argv = ["init", "--dataset", "mine", "--like", "demo", "--data", str(text)]
    assert verbs.main([*argv, "--vocab_size", "300", "--set", "train_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "$ gpt-neo data tokenizer --input_dir" in out and "$ gpt-neo data tfrecords" in out
    written = json.loads((tmp_path / "configs/mine.json").read_text())
    dataset = json.loads((tmp_path / "configs/dataset_configs/mine.json").read_text())
    from gpt_neo.data.encoders import load_encoder

    assert (
        written["n_vocab"]
        == dataset["n_vocab"]
        == load_encoder(dataset["tokenizer_path"]).vocab_size
    )
    assert written["datasets"] == [["mine", None, None, None]]
    assert (written["model_path"], written["train_steps"]) == ("runs/mine", 7)
    demo = json.loads((REPO / "configs/demo.json").read_text())
    assert {k: v for k, v in written.items() if k not in ("n_vocab", "datasets", "model_path", "train_steps")} == {
        k: v for k, v in demo.items() if k not in ("n_vocab", "datasets", "model_path", "train_steps")
    }  # fmt: skip
    assert load_config("configs/mine.json").datasets[0].dataset_id == "mine"
    assert verbs.main(argv) == 2  # exists: --force overwrites
    assert "--force overwrites it" in capsys.readouterr().err


def test_init_names_the_presets_for_an_unknown_one(tmp_path, monkeypatch):
    from gpt_neo.cli import init_config

    monkeypatch.chdir(tmp_path)
    args = parse_verb("init", "--dataset", "x", "--like", "gpt_neo_9B")
    with pytest.raises(ConfigError, match=r"--like gpt_neo_9B: no such preset .* gpt_neo_125M"):
        init_config.run(args)
