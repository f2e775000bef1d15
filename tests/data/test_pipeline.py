"""The input pipeline: sampling modes, mixture weights, shuffling, hosts, exact resume, errors."""

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest

from gpt_neo.data import records
from gpt_neo.data.dataset_config import load_dataset_config
from gpt_neo.data.diagnostics import check_datasets
from gpt_neo.data.pipeline import InputPipeline, default_sampling_mode, input_threads
from gpt_neo.data.records import CorruptRecordError
from gpt_neo.errors import ConfigError, DataError
from tests.support.helpers import input_config, write_dataset

EOS = 0
N_CTX = 16


model_config = input_config  # n_ctx is N_CTX


def pipeline(cfg, **kw):
    return InputPipeline(
        cfg,
        process_index=kw.pop("process_index", 0),
        process_count=kw.pop("process_count", 1),
        **kw,
    )


def batches(p, n):
    return [p.next_batch().tokens for _ in range(n)]


@pytest.fixture
def small_groups(monkeypatch):
    monkeypatch.setattr(records, "GROUP_FILES", 2)
    monkeypatch.setattr(records, "SHUFFLE_BUFFER", 7)


def test_documents_random_examples_are_windows_of_eos_joined_documents(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [20, 20])
    for batch in batches(pipeline(model_config([[path, 2, "documents_random", 1.0]])), 10):
        assert batch.shape == (4, N_CTX + 1) and batch.dtype == np.int32
        for row in batch:
            for a, b in itertools.pairwise(row):
                # inside a document tokens count up by one; documents end with EOS
                assert b == a + 1 or b == EOS or a == EOS


def test_documents_fixed_examples_start_at_a_document_start(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [20])
    rows = np.concatenate(batches(pipeline(model_config([[path, 2, "documents_fixed", 1.0]])), 5))
    assert np.all(rows[:, 0] % 1000 == 1)


def test_chunks_mode_yields_the_records_themselves(tmp_path):
    path, docs = write_dataset(tmp_path, "c", [10, 10], mode="chunks")
    rows = np.concatenate(batches(pipeline(model_config([[path, None, "chunks", None]])), 5))
    records = {tuple(t) for t in docs.values()}
    assert all(tuple(r) in records for r in rows)
    assert len({tuple(r) for r in rows}) == 20  # one epoch: every record exactly once


def test_bare_dataset_id_of_a_chunk_dataset_reads_chunks(tmp_path):
    path, docs = write_dataset(tmp_path, "c", [6], mode="chunks")
    rows = batches(pipeline(model_config([path])), 1)[0]
    assert {tuple(r) for r in rows} <= {tuple(t) for t in docs.values()}


def test_example_level_shuffle_is_a_permutation_within_each_epoch(tmp_path, small_groups):
    path, docs = write_dataset(tmp_path, "c", [5, 5, 5, 5, 5], mode="chunks")
    rows = np.concatenate(batches(pipeline(model_config([[path, None, "chunks", None]])), 25))
    first_epoch, second_epoch = rows[:25], rows[25:50]
    order = [int(r[0]) // 1000 for r in first_epoch]
    assert sorted(order) == sorted(docs)  # every record once
    assert order != sorted(order)  # not file order
    assert [int(r[0]) // 1000 for r in second_epoch] != order  # reshuffled next epoch


def test_files_are_read_in_natural_order_without_shuffle_input_filenames(tmp_path, small_groups):
    # twelve files d_0 .. d_11 of three records; natural order puts d_2 before d_10
    path, _ = write_dataset(tmp_path, "d", [3] * 12, mode="chunks")

    def file_groups(shuffle_input_filenames):
        cfg = model_config(
            [[path, None, "chunks", None]], shuffle_input_filenames=shuffle_input_filenames
        )
        rows = np.concatenate(batches(pipeline(cfg), 9))  # one epoch, 36 records
        files = [(int(r[0]) // 1000 - 1) // 3 for r in rows]
        return [sorted(set(files[k : k + 6])) for k in range(0, 36, 6)]  # two files per group

    assert file_groups(False) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    shuffled = file_groups(True)
    assert sorted(f for group in shuffled for f in group) == list(range(12))
    assert shuffled != file_groups(False)


def test_input_fn_decides_how_a_dataset_without_a_recorded_mode_is_read(tmp_path):
    # GPT-Neo's dataset configs do not say how their records were made
    path, _ = write_dataset(tmp_path, "d", [20], mode="documents")
    raw = json.loads(Path(path).read_text())
    del raw["mode"]
    Path(path).write_text(json.dumps(raw))
    # sequential_input (the default) reads records of n_ctx + 1 tokens: documents are not
    with pytest.raises(DataError, match="sampling mode 'chunks' needs at least n_ctx \\+ 1"):
        batches(pipeline(model_config([path])), 1)
    # generic_text samples windows of joined documents
    rows = batches(pipeline(model_config([path], input_fn="generic_text")), 2)
    for row in np.concatenate(rows):
        assert all(b == a + 1 or EOS in (a, b) for a, b in itertools.pairwise(row))
    assert default_sampling_mode(model_config([path]), load_dataset_config(path)) == "chunks"


def test_mixture_weights_are_respected(tmp_path):
    a, _ = write_dataset(tmp_path / "a", "a", [50], first_id=1)
    b, _ = write_dataset(tmp_path / "b", "b", [50], first_id=60)
    cfg = model_config(
        [[a, 1, "documents_fixed", 3.0], [b, 1, "documents_fixed", 1.0]], train_batch_size=20
    )
    rows = np.concatenate(batches(pipeline(cfg), 50))
    from_a = np.mean(rows[:, 0] // 1000 < 60)
    assert abs(from_a - 0.75) < 0.04  # 1000 draws: 4 sigma is 0.055, 3 sigma 0.041


def test_same_seed_same_batches_other_seed_other_batches(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [20, 20, 20])
    entry = [[path, 2, "documents_random", 1.0]]
    one, two = (batches(pipeline(model_config(entry, seed=5)), 6) for _ in range(2))
    other = batches(pipeline(model_config(entry, seed=6)), 6)
    assert all(np.array_equal(x, y) for x, y in zip(one, two, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(one, other, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [1, 7, 30])
def test_restoring_the_state_continues_exactly_like_an_uninterrupted_run(
    tmp_path, small_groups, stop_after
):
    a, _ = write_dataset(tmp_path / "a", "a", [4, 3, 5, 2, 4], first_id=1)
    b, _ = write_dataset(tmp_path / "b", "b", [6, 6], first_id=60, mode="chunks")
    cfg = model_config([[a, 3, "documents_random", 2.0], [b, None, "chunks", 1.0]])
    uninterrupted = batches(pipeline(cfg), stop_after + 10)
    first = pipeline(cfg)
    batches(first, stop_after)
    state = json.loads(json.dumps(first.state()))  # it survives a JSON round trip
    assert len(json.dumps(state)) < 300  # small: positions, not buffers
    resumed = pipeline(cfg)
    resumed.restore(state)
    for expected, got in zip(uninterrupted[stop_after:], batches(resumed, 10), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_hosts_read_disjoint_files(tmp_path):
    path, _ = write_dataset(tmp_path, "c", [4, 4, 4, 4], mode="chunks")
    cfg = model_config([[path, None, "chunks", None]], train_batch_size=4)
    seen = []
    for host in range(2):
        p = pipeline(cfg, process_index=host, process_count=2)
        assert p.batch_size == 2
        seen.append({int(r[0]) // 1000 for b in batches(p, 4) for r in b})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 16


def test_eval_pipeline_reads_eval_path_from_the_start_in_a_fixed_order(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [10], eval_docs=12)
    cfg = model_config([[path, 1, "documents_fixed", 1.0]], eval_batch_size=2)
    one, two = (batches(pipeline(cfg, eval=True), 3) for _ in range(2))
    assert all(np.array_equal(x, y) for x, y in zip(one, two, strict=True))
    assert one[0].shape == (2, N_CTX + 1)
    assert [int(r[0]) for b in one for r in b] == [(900 + k) * 1000 + 1 for k in range(6)]


# ---- bad input ---------------------------------------------------------------------------


def test_empty_glob_names_the_pattern(tmp_path):
    config = tmp_path / "none.json"
    config.write_text(json.dumps({"n_vocab": 10, "path": str(tmp_path / "nothing_*.tfrecords")}))
    with pytest.raises(DataError, match=r"pattern '.*nothing_\*\.tfrecords' matches no files"):
        pipeline(model_config([str(config)]))


def truncate(path, keep_bytes):
    path.write_bytes(path.read_bytes()[:keep_bytes])


def test_truncated_file_names_file_and_record_or_is_skipped_and_counted(tmp_path):
    path, _ = write_dataset(tmp_path, "c", [6, 6], mode="chunks")
    damaged = tmp_path / "c_1_6.tfrecords"
    truncate(damaged, 4 * (damaged.stat().st_size // 6) + 10)  # records 0..3 intact
    cfg = model_config([[path, None, "chunks", None]])
    with pytest.raises(
        CorruptRecordError, match=r"c_1_6\.tfrecords is corrupt or truncated at record 4"
    ):
        batches(pipeline(cfg), 3)
    skipping = pipeline(cfg, skip_corrupt=True)
    rows = np.concatenate(batches(skipping, 5))  # 10 good records, then the next epoch
    assert len({tuple(r) for r in rows[:10]}) == 10
    assert skipping.sources[0].reader.stats.skipped_files == [f"{damaged} (from record 4)"]


def test_damaged_record_mid_file_names_file_and_record_or_is_skipped(tmp_path):
    path, _ = write_dataset(tmp_path, "c", [6, 6], mode="chunks")
    damaged = tmp_path / "c_0_6.tfrecords"
    data = bytearray(damaged.read_bytes())
    data[2 * (len(data) // 6) + 20] ^= 0xFF  # inside record 2's payload: its checksum fails
    damaged.write_bytes(bytes(data))
    cfg = model_config([[path, None, "chunks", None]])
    with pytest.raises(
        CorruptRecordError, match=r"c_0_6\.tfrecords is corrupt or truncated at record 2"
    ):
        batches(pipeline(cfg), 3)
    skipping = pipeline(cfg, skip_corrupt=True)
    rows = np.concatenate(batches(skipping, 2))
    assert len({tuple(r) for r in rows}) == 8  # 2 good records of the damaged file + 6
    assert skipping.sources[0].reader.stats.skipped_files == [f"{damaged} (from record 2)"]


def test_token_ids_outside_n_vocab_name_the_file_and_record(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [5], n_vocab=50)
    with pytest.raises(
        DataError,
        match=r"d_0_5\.tfrecords record \d+ holds token id \d+, outside the model's n_vocab 2000",
    ):
        batches(pipeline(model_config([[path, 1, "documents_fixed", 1.0]], n_vocab=2000)), 1)


def test_chunk_records_of_the_wrong_length_are_explained(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [5])
    with pytest.raises(DataError, match=r"needs at least n_ctx \+ 1 = 17.*--chunk_size 16"):
        batches(pipeline(model_config([[path, None, "chunks", None]])), 1)


def test_dataset_vocab_larger_than_the_models_is_refused(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [5], n_vocab=2_000_000)
    with pytest.raises(ConfigError, match="has n_vocab 2000000 but the model's n_vocab is 1000000"):
        pipeline(model_config([path]))


def test_restoring_over_changed_files_is_refused(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [5, 5])
    cfg = model_config([[path, 1, "documents_fixed", 1.0]])
    state = pipeline(cfg).state()
    write_dataset(tmp_path, "d", [5, 5, 5])
    with pytest.raises(DataError, match="files changed since the checkpoint"):
        pipeline(cfg).restore(state)


def test_check_dataset_reports_id_range_and_fails_on_ids_beyond_n_vocab(tmp_path):
    path, docs = write_dataset(tmp_path, "d", [5], lengths=(3,))
    lines = []
    assert check_datasets(model_config([path]), out=lines.append)
    summary = next(line for line in lines if "token ids" in line)
    assert (
        f"token ids 0..{max(max(d) for d in docs.values())}" in summary
        and "read all records" in summary
    )
    tokens = np.concatenate([np.asarray(d) for d in docs.values()])
    p = np.unique(tokens, return_counts=True)[1] / tokens.size
    assert f"unigram entropy {-(p * np.log(p)).sum():.3f} nats/token" in "\n".join(lines)
    lines.clear()
    assert not check_datasets(model_config([path], n_vocab=4000), out=lines.append)
    assert any("error:" in line and ">= n_vocab 4000" in line for line in lines)


def test_fixed_input_streams_give_the_same_global_batch_on_any_host_count(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [6, 6, 6, 6])
    cfg = model_config([[path, 2, "documents_random", 1.0]], input_streams=2)
    single = batches(pipeline(cfg), 4)
    hosts = [pipeline(cfg, process_index=h, process_count=2) for h in range(2)]
    for expected in single:
        np.testing.assert_array_equal(
            np.concatenate([h.next_batch().tokens for h in hosts]), expected
        )
    # a position saved on one host count restores on the other
    merged = {
        **hosts[0].state(),
        "streams": {**hosts[0].state()["streams"], **hosts[1].state()["streams"]},
    }
    one = pipeline(cfg)
    one.restore(merged)
    np.testing.assert_array_equal(
        one.next_batch().tokens, np.concatenate([h.next_batch().tokens for h in hosts])
    )


# --- GPT-Neo's longer records ----------------------------------------------------------------


def long_records(tmp_path, files=(6, 6)):
    """Chunk records made for n_ctx 2 * N_CTX: 2 * N_CTX + 1 tokens each."""
    return write_dataset(tmp_path, "long", list(files), mode="chunks", n_ctx=2 * N_CTX)


def test_records_longer_than_n_ctx_plus_one_train_on_their_first_tokens(tmp_path):
    path, docs = long_records(tmp_path)
    said = []
    cfg = model_config([[path, None, "chunks", None]])
    rows = np.concatenate(batches(pipeline(cfg, out=said.append), 3))
    firsts = {tuple(t[: N_CTX + 1]) for t in docs.values()}
    assert rows.shape == (12, N_CTX + 1) and all(tuple(r) in firsts for r in rows)
    assert len({tuple(r) for r in rows}) == 12  # whole records, each once, cut to n_ctx + 1
    assert len(said) == 1  # said once, not once per record
    assert "longer than n_ctx + 1 = 17 tokens" in said[0] and "has 33" in said[0]
    assert "first 17 tokens of each, as GPT-Neo did" in said[0]


def test_resuming_over_longer_records_continues_exactly(tmp_path):
    path, _ = long_records(tmp_path, files=(5, 7, 3))
    cfg = model_config([[path, None, "chunks", None]])
    uninterrupted = batches(pipeline(cfg, out=None), 9)
    first = pipeline(cfg, out=None)
    batches(first, 4)
    resumed = pipeline(cfg, out=None)
    resumed.restore(first.state())
    np.testing.assert_array_equal(np.stack(batches(resumed, 5)), np.stack(uninterrupted[4:]))


def test_check_dataset_says_what_training_takes_from_each_record(tmp_path):
    path, _ = long_records(tmp_path)
    lines = []
    assert check_datasets(model_config([[path, None, "chunks", None]]), out=lines.append)
    assert any(
        "training uses the first n_ctx + 1 = 17 tokens of each record (records hold 33..33)" in line
        for line in lines
    )
    lines.clear()
    short = model_config([[path, None, "chunks", None]], n_ctx=40)
    assert not check_datasets(short, out=lines.append)
    assert any(
        line.startswith("error: long: records shorter than n_ctx + 1 = 41 tokens") for line in lines
    )
    lines.clear()
    exact = model_config([[path, None, "chunks", None]], n_ctx=32)
    assert check_datasets(exact, out=lines.append)
    assert any("training uses each record whole (33 tokens)" in line for line in lines)


def test_tf_data_threads_are_bounded_and_not_autotuned(tmp_path, monkeypatch):
    path, _ = write_dataset(tmp_path, "d", [4])
    stream = records.record_stream(records.list_files(str(tmp_path / "d_*"), what="d"), [-1], 3)
    assert stream.options().threading.private_threadpool_size == 3
    assert stream.options().autotune.enabled is False
    assert input_threads(model_config([path])) == 1  # the model runs on this CPU
    assert input_threads(model_config([path], input_threads=4)) == 4
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    monkeypatch.setattr("jax.default_backend", lambda: "tpu")
    assert input_threads(model_config([path])) == 24  # a TPU host's cores are free


def chunk_reader(folder, **kw):
    files = records.list_files(str(folder / "c_*.tfrecords"), what="c")
    return records.RecordReader(files, seed=3, name="c", **kw)


def test_next_group_is_opened_ahead_and_reads_the_same_records(tmp_path, small_groups, monkeypatch):
    write_dataset(tmp_path, "c", [5, 5, 5, 5, 5, 5], mode="chunks")  # 3 groups of 10 records
    reads = 75  # two and a half epochs

    def read_all(reader):
        return [(path, index) for _, path, index, _ in (reader.next_record() for _ in range(reads))]

    opened_at, record_stream = [], records.record_stream  # (group drawn, records left to draw)

    def counted(*args):
        opened_at.append((reader.group, len(getattr(reader, "_buffer", []))))
        return record_stream(*args)

    monkeypatch.setattr(records, "record_stream", counted)
    reader = chunk_reader(tmp_path)
    ahead = read_all(reader)
    assert len(opened_at) == 8  # each group's stream built once: groups 0-7
    assert all(left > 0 for _, left in opened_at[1:])  # while the group before still had records
    assert [group for group, _ in opened_at[1:]] == list(range(7))

    monkeypatch.setattr(records.RecordReader, "_open_upcoming", lambda self: None)
    reader = chunk_reader(tmp_path)
    assert read_all(reader) == ahead  # the second path: each group opened at its boundary
    assert all(left == 0 for _, left in opened_at[8:])


def test_damage_at_the_start_of_the_next_group_is_reported_when_that_group_is_read(
    tmp_path, small_groups
):
    write_dataset(tmp_path, "c", [5, 5, 5, 5], mode="chunks")
    damaged = tmp_path / "c_2_5.tfrecords"  # the first file of group 1 (files in name order)
    data = bytearray(damaged.read_bytes())
    data[20] ^= 0xFF  # inside record 0's payload
    damaged.write_bytes(bytes(data))
    reader, read = chunk_reader(tmp_path, shuffle_files=False), []
    with pytest.raises(CorruptRecordError, match=r"c_2_5\.tfrecords is corrupt .* at record 0"):
        while True:
            read.append(reader.next_record()[1])
    assert len(read) == 10 and {Path(p).name for p in read} == {
        "c_0_5.tfrecords",
        "c_1_5.tfrecords",
    }
    skipping = chunk_reader(tmp_path, shuffle_files=False, skip_corrupt=True)
    names = [Path(skipping.next_record()[1]).name for _ in range(15)]
    assert names[10:] == ["c_3_5.tfrecords"] * 5
    assert skipping.stats.skipped_files == [f"{damaged} (from record 0)"]


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("eos_id", "0", "must be a token id"),
        ("eos_id", 50, "must be below n_vocab 50"),
        ("padding_id", -1, "must be a token id"),
        ("n_vocab", True, "must be a positive integer"),
        ("tokenizer_is_pretrained", "yes", "must be true or false"),
        ("path", "", "must name the TFRecord files"),
        ("eval_path", 3, "must be a string"),
        ("mode", "lines", "must be 'documents', 'chunks' or 'sft'"),
    ],
)
def test_a_dataset_config_value_of_the_wrong_kind_is_named(tmp_path, key, value, problem):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"n_vocab": 50, "path": "d_*.tfrecords", key: value}))
    with pytest.raises(ConfigError, match=rf"bad\.json: '{key}' = .* {problem}"):
        load_dataset_config(str(config))


def test_a_required_dataset_config_key_set_to_null_is_named(tmp_path):
    """Found by the fuzzer: `"n_vocab": null` passed the check and crashed the constructor."""
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"n_vocab": None, "path": "d_*.tfrecords"}))
    with pytest.raises(ConfigError, match=r"bad\.json: 'n_vocab' is null; it is required"):
        load_dataset_config(str(config))


def test_a_dataset_config_of_a_tokenizer_alone_loads_but_does_not_train(tmp_path):
    """`gpt-neo import hf` writes one: a tokenizer for sampling, no records."""
    config = tmp_path / "tok.json"
    config.write_text(json.dumps({"n_vocab": 50, "tokenizer_path": "byte", "path": None}))
    assert load_dataset_config(str(config)).path == ""
    cfg = input_config([[str(config), None, None, None]], n_vocab=50)
    with pytest.raises(DataError, match="'tok' has no path: it names only a tokenizer"):
        InputPipeline(cfg).next_batch()
