"""Data that goes bad while a run is under way: a TFRecord file damaged or gone mid-run, a
dataset glob that matches nothing at restore, a tokenizer replaced by another size. Each is a
clear error or (with skipping on) a counted, reported skip; the data order after a resume is
either the uninterrupted run's or a warning says it is not."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt_neo.data import pipeline as data_pipeline
from gpt_neo.data import records
from gpt_neo.data.encoders import load_encoder
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.data.records import CorruptRecordError
from gpt_neo.errors import EXIT_USER_ERROR, DataError
from tests.support.helpers import (
    SMALL_RUN,
    input_config,
    restore_params,
    start_main,
    train_tokenizer_file,
    write_config,
    write_dataset,
    write_text_dataset,
)


@pytest.fixture
def small_groups(monkeypatch):
    monkeypatch.setattr(records, "GROUP_FILES", 2)
    monkeypatch.setattr(records, "SHUFFLE_BUFFER", 7)


def reader(folder, **kw):
    files = records.list_files(str(folder / "c_*.tfrecords"), what="c")
    return records.RecordReader(files, seed=3, name="c", shuffle_files=False, **kw)


def read(reader, n):
    return [
        (Path(path).name, index) for _, path, index, _ in (reader.next_record() for _ in range(n))
    ]


def damage(path: Path, record: int, records: int) -> None:
    """Flip a byte inside `record`'s payload (files of equal-size records)."""
    data = bytearray(path.read_bytes())
    data[record * (len(data) // records) + 20] ^= 0xFF
    path.write_bytes(bytes(data))


def saved(reader) -> dict:
    return json.loads(json.dumps(reader.state()))  # through JSON, as checkpoints keep it


def test_a_resumed_reader_cuts_a_damaged_file_where_the_interrupted_one_did(
    tmp_path, small_groups, capsys
):
    write_dataset(tmp_path, "c", [6, 6], mode="chunks")
    damaged = tmp_path / "c_0_6.tfrecords"
    intact = damaged.read_bytes()
    damage(damaged, record=2, records=6)
    uninterrupted = read(reader(tmp_path, skip_corrupt=True), 20)  # 8 good records an epoch

    first = reader(tmp_path, skip_corrupt=True)
    head = read(first, 5)
    position = saved(first)
    assert position["damaged"] == {str(damaged): 2}
    damaged.write_bytes(intact)  # repaired before the restart: the run keeps its cut
    resumed = reader(tmp_path, skip_corrupt=True)
    resumed.restore(position)
    assert head + read(resumed, 15) == uninterrupted
    err = capsys.readouterr().err
    assert f"warning: dataset 'c': {damaged} is corrupt or truncated at record 2" in err
    assert "--skip_corrupt_records" in err and "cannot all be replayed" not in err


def test_damage_found_after_the_checkpoint_gives_the_uninterrupted_order(
    tmp_path, small_groups, capsys
):
    write_dataset(tmp_path, "c", [5, 5, 5, 5, 5, 5], mode="chunks")  # groups of 2 files
    first = reader(tmp_path, skip_corrupt=True)
    head = read(first, 3)
    position = saved(first)
    damaged = tmp_path / "c_4_5.tfrecords"  # group 2: not read before the checkpoint
    damage(damaged, record=1, records=5)
    uninterrupted = read(reader(tmp_path, skip_corrupt=True), 30)
    resumed = reader(tmp_path, skip_corrupt=True)
    resumed.restore(position)
    assert head + read(resumed, 27) == uninterrupted
    assert resumed.stats.skipped_files == [f"{damaged} (from record 1)"]
    assert "cannot all be replayed" not in capsys.readouterr().err


def test_damage_to_records_the_interrupted_run_read_is_an_error_or_a_loud_change_of_order(
    tmp_path, small_groups, capsys
):
    write_dataset(tmp_path, "c", [6, 6], mode="chunks")
    first = reader(tmp_path)
    read(first, 5)
    position = saved(first)
    damaged = tmp_path / "c_0_6.tfrecords"
    damage(damaged, record=0, records=6)  # the interrupted run trained on record 0

    strict = reader(tmp_path)
    strict.restore(position)
    with pytest.raises(
        CorruptRecordError, match=r"c_0_6\.tfrecords is corrupt .* at record 0"
    ) as err:
        read(strict, 1)
    assert "rerun with --skip_corrupt_records" in str(err.value)

    skipping = reader(tmp_path, skip_corrupt=True)
    skipping.restore(position)
    read(skipping, 3)
    err = capsys.readouterr().err
    assert f"the run this one resumes read {damaged} intact" in err
    assert "the data order from here differs from an uninterrupted run's" in err


def test_a_file_that_disappears_mid_run_is_named_never_skipped(tmp_path, small_groups):
    write_dataset(tmp_path, "c", [5, 5, 5, 5], mode="chunks")
    for skip in (False, True):
        shutil.rmtree(tmp_path / "moved", ignore_errors=True)
        reading = reader(tmp_path, skip_corrupt=skip)
        read(reading, 2)  # group 0: c_0, c_1
        gone = tmp_path / "c_3_5.tfrecords"
        (tmp_path / "moved").mkdir()
        shutil.move(gone, tmp_path / "moved" / gone.name)
        with pytest.raises(DataError, match=r"cannot read .*c_3_5\.tfrecords .*was there when"):
            read(reading, 20)
        shutil.move(tmp_path / "moved" / gone.name, gone)


def test_the_position_of_every_host_gathers_with_its_damaged_files(tmp_path, monkeypatch):
    """`global_state` on several processes: every host's streams, merged (the JSON allgather)."""
    hosts = [
        {"streams": {"0": [{"group": 1, "offset": 2, "files": "abc1234", "damaged": {"f": 3}}]}},
        {"streams": {"1": [{"group": 0, "offset": 7, "files": "def5678", "damaged": {}}]}},
    ]
    monkeypatch.setattr(
        data_pipeline, "_allgather_json", lambda value: [h["streams"] for h in hosts]
    )
    path, _ = write_dataset(tmp_path, "d", [4, 4])
    inputs = InputPipeline(input_config([path]), process_index=0, process_count=2, out=None)
    merged = inputs.global_state({"batch": 5, "streams": hosts[0]["streams"]})
    assert merged["batch"] == 5
    assert merged["streams"] == {**hosts[0]["streams"], **hosts[1]["streams"]}


# --------------------------------------------------------------------------------------------
# Through main.py, as a user meets them


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text"), docs=48, files_per=8)


def run(tmp_path, dataset_config, name, *flags, steps=6):
    keys = {
        **SMALL_RUN,
        "train_steps": steps,
        "lr_decay_end": 6,  # the schedule of a 6-step run, also in a run stopped at step 3
        "datasets": [[dataset_config, 1, "documents_random", 1.0]],
        "model_path": str(tmp_path / name),
    }
    model = write_config(tmp_path / f"{name}.json", keys)
    process = start_main("--model", model, "--steps_per_checkpoint", "3", *flags)
    out, _ = process.communicate(timeout=300)
    return process.returncode, out


def one_error_line(out: str) -> str:
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
    return errors[0]


def copy_dataset(dataset: str, folder: Path) -> str:
    """A private copy of the module's dataset (its config points into the copy)."""
    source = Path(dataset).parent
    shutil.copytree(source / "tfrecords", folder / "tfrecords")
    config = json.loads(Path(dataset).read_text())
    for key in ("path", "eval_path"):
        config[key] = config[key].replace(str(source), str(folder))
    path = folder / "text.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.process
def test_a_damaged_record_is_skipped_reported_and_a_resume_is_bit_identical(tmp_path, dataset):
    data = copy_dataset(dataset, tmp_path)
    files = sorted((tmp_path / "tfrecords").glob("train_*.tfrecords"))
    assert len(files) == 6
    blob = bytearray(files[0].read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    files[0].write_bytes(bytes(blob))

    code, out = run(tmp_path, data, "whole", "--skip_corrupt_records")
    assert code == 0, out[-3000:]
    assert f"warning: dataset 'text': {files[0]} is corrupt or truncated at record" in out
    assert "1 damaged file(s) were cut short" in out
    code, out = run(tmp_path, data, "resumed", "--skip_corrupt_records", steps=3)
    assert code == 0, out[-3000:]
    code, out = run(tmp_path, data, "resumed", "--skip_corrupt_records")
    assert code == 0, out[-3000:]
    whole = jax.tree.leaves(restore_params(tmp_path / "whole/checkpoints/6/state"))
    resumed = jax.tree.leaves(restore_params(tmp_path / "resumed/checkpoints/6/state"))
    for a, b in zip(whole, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.process
def test_a_glob_that_matches_nothing_at_restore_and_a_replaced_tokenizer_are_one_line_each(
    tmp_path, dataset
):
    data = copy_dataset(dataset, tmp_path)
    config = json.loads(Path(data).read_text())
    tokenizer = Path(train_tokenizer_file(tmp_path, vocab_size=300))
    config["tokenizer_path"] = str(tokenizer)
    Path(data).write_text(json.dumps(config))
    code, out = run(tmp_path, data, "run", steps=3)
    assert code == 0, out[-3000:]

    shutil.move(tmp_path / "tfrecords", tmp_path / "elsewhere")
    code, out = run(tmp_path, data, "run")
    assert code == EXIT_USER_ERROR
    assert "train_*.tfrecords' matches no files" in one_error_line(out)
    shutil.move(tmp_path / "elsewhere", tmp_path / "tfrecords")

    (tmp_path / "other").mkdir()
    smaller = Path(train_tokenizer_file(tmp_path / "other", vocab_size=270))
    assert load_encoder(smaller).vocab_size < load_encoder(tokenizer).vocab_size
    shutil.copy(smaller, tokenizer)
    code, out = run(tmp_path, data, "run")
    assert code == EXIT_USER_ERROR
    line = one_error_line(out)
    assert f"tokenizer {tokenizer} now has" in line and "put back the tokenizer" in line
    steps = [p.name for p in (tmp_path / "run/checkpoints").iterdir() if p.name.isdigit()]
    assert steps == ["3"]  # nothing trained with the other tokenizer


def test_the_run_tokenizer_is_checked_against_the_one_the_run_started_with(tmp_path, capsys):
    from gpt_neo.config import from_dict
    from gpt_neo.data.dataset_config import check_run_tokenizer

    first = Path(train_tokenizer_file(tmp_path, vocab_size=300))
    dataset = tmp_path / "d.json"
    dataset.write_text(json.dumps({"n_vocab": 300, "path": "x", "tokenizer_path": str(first)}))
    cfg = from_dict({**SMALL_RUN, "datasets": [[str(dataset)]]})

    started = check_run_tokenizer(cfg, None, needed=False)
    assert started["vocab_size"] == load_encoder(first).vocab_size
    assert check_run_tokenizer(cfg, started, needed=True) == started
    assert capsys.readouterr().err == ""

    same_size = {**started, "digest": "0" * 16}  # what another vocabulary of this size records
    assert check_run_tokenizer(cfg, same_size, needed=False) == started
    assert "same size as the one this run started with but other tokens" in capsys.readouterr().err

    other_size = {**started, "vocab_size": started["vocab_size"] + 7}
    with pytest.raises(DataError, match=r"now has \d+ ids, but this run was started with one of"):
        check_run_tokenizer(cfg, other_size, needed=False)

    first.unlink()  # gone: training needs no tokenizer, sampling does
    assert check_run_tokenizer(cfg, started, needed=False) == started
    assert "the run's tokenizer cannot be loaded now" in capsys.readouterr().err
    with pytest.raises(DataError, match="tokenizer file not found"):
        check_run_tokenizer(cfg, started, needed=True)
