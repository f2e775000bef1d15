"""Fuzzing with hypothesis: whatever a user writes (a model config, a dataset config, command
line flags) or whatever happens to a file on disk (random byte damage to TFRecords and to a
tokenizer), the outcome is a result or one `UserError` (exit 2), never another exception.

`make test` runs about a thousand examples in all, the same ones every run (derandomized, so a
failure in CI reproduces); `python bench/fuzz.py` runs ten times as many, freshly drawn
(GPT_NEO_FUZZ_SCALE multiplies each test's count and turns derandomizing off)."""

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpt_neo
from gpt_neo import config as config_module
from gpt_neo.cli.main import main
from gpt_neo.data.dataset_config import KEYS as DATASET_KEYS
from gpt_neo.data.dataset_config import load_dataset_config
from gpt_neo.data.encoders import load_encoder
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.data.records import RecordReader, iter_records
from gpt_neo.errors import EXIT_USER_ERROR, UserError
from gpt_neo.training import memory as planner
from tests.support.helpers import GPT_NEO_CONFIGS, SMALL_RUN, train_tokenizer_file, write_dataset

SCALE = int(os.environ.get("GPT_NEO_FUZZ_SCALE", "0"))


def fuzz(examples: int):
    """hypothesis settings: `examples` (times GPT_NEO_FUZZ_SCALE in a bench run), no deadline
    (a loaded 2-core machine is slow, not wrong)."""
    return settings(
        max_examples=examples * max(SCALE, 1),
        deadline=None,
        derandomize=not SCALE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )


# JSON values of every type, odd ones first in hypothesis's shrinking order.
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# Values a user could plausibly mistype for the keys that take structured strings.
plausible = st.sampled_from(
    [
        "x:4,y:2",
        "x:8",
        "x:3",
        "x:0",
        "x:4,x:2",
        "a:b",
        "",
        "batch:x,heads:y",
        "batch:x,heads:z",
        "heads:x,embd:x",
        "batch:x,vocab:y,intermediate_expanded:y",
        "auto",
        [[["global", "local"], 1]],
        [[["global"], 3]],
        ["global", "sparse"],
        [["d", 1, "documents_random", 1.0]],
        [["d", -1, "unknown_mode", "heavy"]],
        0,
        -1,
        1,
        3,
        7,
        10**9,
        0.5,
        "gelu",
        "swish",
        "bfloat16",
        "adafactor",
    ]
)
model_keys = [*sorted(config_module.KNOWN_KEYS), "n_head_typo", "lr_decy", "mesh-shape"]


def base_configs() -> list[dict]:
    originals = sorted(GPT_NEO_CONFIGS.glob("*.json"))
    return [json.loads(p.read_text()) for p in originals] + [
        {**SMALL_RUN, "train_steps": 10, "datasets": [["d", 1, "documents_random", 1.0]]}
    ]


BASES = base_configs()


@st.composite
def mutated_configs(draw):
    """One of GPT-Neo's own configs (or our small run), with 1-4 keys set to anything or
    deleted."""
    raw = dict(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.sampled_from(model_keys))
        if draw(st.integers(0, 5)) == 0:
            raw.pop(key, None)
        else:
            raw[key] = draw(plausible | json_values)
    return raw


@fuzz(300)
@given(raw=mutated_configs())
def test_any_model_config_loads_or_is_one_config_error(raw):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.json"
        path.write_text(json.dumps(raw))  # NaN and Infinity written as Python's json does
        try:
            cfg = gpt_neo.load_config(str(path))
            planner.plan(cfg)  # what --summary derives from an accepted config
            planner.param_rows(cfg)
        except UserError:
            pass


@fuzz(120)
@given(data=st.text(max_size=200).map(str.encode) | st.binary(max_size=200))
def test_any_bytes_as_a_config_file_is_one_config_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.json"
        path.write_bytes(data)
        with pytest.raises(UserError):  # none of these is a whole model config
            gpt_neo.load_config(str(path))


# --------------------------------------------------------------------------------------------
# Dataset configs, and the pipeline that reads through them


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    write_dataset(folder, "d", [6, 6])
    return folder


@st.composite
def dataset_configs(draw, folder: Path):
    raw = {"n_vocab": 1_000_000, "path": str(folder / "d_*.tfrecords"), "mode": "documents"}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*sorted(DATASET_KEYS), "vocab", "tokenizer"]))
        choices = st.sampled_from(
            [str(folder / "d_*.tfrecords"), str(folder / "none_*"), "byte", "chunks", 258, 0]
        )
        raw[key] = draw(choices | json_values)
    return raw


@fuzz(150)
@given(data=st.data())
def test_any_dataset_config_reads_batches_or_is_one_user_error(records, data):
    raw = data.draw(dataset_configs(records))
    entry = data.draw(
        st.sampled_from([[1, "documents_random", 1.0], [2, "chunks", 1.0], [None, None, None]])
        | st.lists(json_leaves, max_size=3)
    )
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed_dataset.json"
        path.write_text(json.dumps(raw))
        try:
            load_dataset_config(str(path))
            cfg = config_module.from_dict(
                {
                    "n_embd": 8,
                    "n_head": 1,
                    "n_layer": 1,
                    "n_ctx": 16,
                    "n_vocab": 1_000_000,
                    "train_batch_size": 2,
                    "datasets": [[str(path), *entry]],
                }
            )
            pipeline = InputPipeline(cfg, process_index=0, process_count=1, out=None)
            batch = pipeline.next_batch().tokens
            assert batch.shape == (2, 17) and batch.dtype == np.int32
        except UserError:
            pass


# --------------------------------------------------------------------------------------------
# Command line flags


FLAGS = {
    "--check_records": st.integers(-5, 20).map(str) | st.text(max_size=4),
    "--steps_per_checkpoint": st.integers(-2, 5).map(str) | st.text(max_size=4),
    "--set": st.sampled_from(["n_layer=0", "lr=-1", "bogus=1", "n_ctx", "=", "mesh_shape=x:3"]),
    "--max_new_tokens": st.integers(-3, 3).map(str) | st.text(max_size=3),
    "--temperature": st.floats(-2, 2).map(str) | st.text(max_size=3),
    "--top_k": st.integers(-2, 3).map(str),
    "--top_p": st.floats(-1, 2).map(str),
    "--prompt": st.sampled_from(["/nonexistent/prompt.txt", ""]),
    "--eval_tasks": st.sampled_from(["lambada", "nonsense", "wikitext"]),
    "--lambada_path": st.sampled_from(["/nonexistent.jsonl", ""]),
    "--export": st.sampled_from(["/nonexistent/dir/out", ""]),
    "--seed": st.integers(-1, 3).map(str) | st.text(max_size=3),
    "--bogus_flag": st.text(max_size=3),
}
# --summary and --topology compile (seconds to minutes each): tests/planning/test_summary.py has them
MODES = [["--check_dataset"], ["--predict"], ["--eval"], ["--export", "/nonexistent/export"]]


@pytest.fixture(scope="module")
def cli_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    dataset, _ = write_dataset(folder, "d", [4], n_vocab=320)
    keys = {
        **SMALL_RUN,
        "mesh_shape": "x:8",
        "layout": "batch:x",
        "train_steps": 1,
        "datasets": [[dataset, 1, "documents_random", 1.0]],
        "model_path": str(folder / "never_trained"),
    }
    path = folder / "model.json"
    path.write_text(json.dumps(keys))
    return str(path)


@fuzz(60)
@given(data=st.data())
def test_any_command_line_ends_in_a_result_or_exit_2(cli_config, data):
    """Modes that need a checkpoint meet a model_path without one; the rest are cheap. Every
    flag draws a value (often a wrong one). argparse's own refusals exit 2 too."""
    argv = ["--model", cli_config, *data.draw(st.sampled_from(MODES))]
    for flag in data.draw(st.lists(st.sampled_from(sorted(FLAGS)), max_size=3, unique=True)):
        argv += [flag, data.draw(FLAGS[flag])]
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse
            code = stop.code
    assert code in (0, 1, EXIT_USER_ERROR), (argv, code, quiet.getvalue()[-2000:])
    if code == EXIT_USER_ERROR:
        assert "Traceback" not in quiet.getvalue()


# --------------------------------------------------------------------------------------------
# Random byte damage to files on disk


@pytest.fixture(scope="module")
def intact_records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("intact")
    _, docs = write_dataset(folder, "c", [8], mode="chunks")
    path = folder / "c_0_8.tfrecords"
    return path.read_bytes(), {tuple(t) for t in docs.values()}


damages = st.lists(
    st.tuples(
        st.sampled_from(["flip", "truncate", "insert"]), st.floats(0, 1), st.integers(1, 255)
    ),
    min_size=1,
    max_size=3,
)


def damaged(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, where, value in edits:
        at = min(int(where * len(out)), max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[at] ^= value
        elif kind == "truncate":
            del out[at:]
        else:
            out[at:at] = bytes([value])
    return bytes(out)


@contextlib.contextmanager
def damaged_file(data: bytes, edits, name: str):
    """`data` with `edits` applied, as a file `name` in a fresh folder."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(damaged(data, edits))
        yield path


@fuzz(150)
@given(edits=damages)
def test_a_damaged_tfrecord_reads_whole_or_is_named(intact_records, edits):
    data, _ = intact_records
    with damaged_file(data, edits, "c_0_8.tfrecords") as path:
        try:
            read = list(iter_records([str(path)]))
            assert len(read) == 8  # only damage that changed nothing reads whole
        except UserError as err:
            assert "c_0_8.tfrecords" in str(err)


@pytest.mark.slow
@fuzz(25)  # each example builds tf.data pipelines: about 2 s
@given(edits=damages)
def test_skipping_damage_never_passes_damaged_bytes_on_as_tokens(intact_records, edits):
    data, originals = intact_records
    with damaged_file(data, edits, "c_0_8.tfrecords") as path:
        skipping = RecordReader([str(path)], seed=0, name="c", skip_corrupt=True)
        got = []
        with contextlib.suppress(UserError):  # nothing readable at all: an error, named
            got = [tuple(skipping.next_record()[0]) for _ in range(4)]
        assert set(got) <= originals


@pytest.fixture(scope="module")
def tokenizer_bytes(tmp_path_factory):
    return Path(train_tokenizer_file(tmp_path_factory.mktemp("tok"), vocab_size=300)).read_bytes()


@fuzz(150)
@given(edits=damages)
def test_a_damaged_tokenizer_file_loads_or_is_one_data_error(tokenizer_bytes, edits):
    with damaged_file(tokenizer_bytes, edits, "tokenizer.json") as path:
        try:
            encoder = load_encoder(path)
            encoder.decode(encoder.encode("a damaged tokenizer that still loads must work"))
        except UserError as err:
            assert str(path) in str(err)
