"""The `packed` sampling mode: whole documents side by side with their segment ids, every
document exactly once per epoch, fine-tuning loss masks carried, and a position that resumes
exactly (mid-window, mid-document, on another host count)."""

import collections

import numpy as np
import pytest

from gpt_neo.data import packing
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.errors import ConfigError
from tests.support.helpers import input_config, write_dataset

N_CTX = 16
# documents of 6, 10, 24 and 41 tokens with their eos: the last two must be cut
LENGTHS = (5, 9, 23, 40)


def pipeline(cfg, **kw):
    return InputPipeline(
        cfg,
        process_index=kw.pop("process_index", 0),
        process_count=kw.pop("process_count", 1),
        **kw,
    )


@pytest.fixture
def short_lookahead(monkeypatch):
    """Fewer pending documents than the dataset holds, so that epochs do not overlap."""
    monkeypatch.setattr(packing, "LOOKAHEAD", 4)


def pieces(batch):
    """Each segment of each row: (tokens, loss mask or None)."""
    out = []
    for r, row in enumerate(batch.tokens):
        for s in range(1, int(batch.segments[r].max()) + 1):
            where = batch.segments[r] == s
            mask = None if batch.loss_mask is None else batch.loss_mask[r][where]
            out.append((row[where], mask))
    return out


def test_windows_are_segments_then_padding(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [12], lengths=LENGTHS)
    p = pipeline(input_config([[path, 1, "packed", 1.0]]))
    for _ in range(6):
        batch = p.next_batch()
        assert batch.tokens.shape == batch.segments.shape == (4, N_CTX + 1)
        assert batch.loss_mask is None
        for row in batch.segments:
            real = row[row > 0]
            # ids 1, 2, ... in row order, contiguous, padding (0) only at the end
            assert list(real) == sorted(real) and set(real) == set(range(1, real.max() + 1))
            assert np.all(row[real.size :] == 0)


def test_every_document_is_packed_exactly_once_per_epoch(tmp_path, short_lookahead):
    path, docs = write_dataset(tmp_path, "d", [7, 6], lengths=LENGTHS)
    p = pipeline(input_config([[path, 1, "packed", 1.0]]))
    packed = collections.defaultdict(list)  # doc id -> its tokens, in the order packed
    for _ in range(40):
        for tokens, _ in pieces(p.next_batch()):
            doc_id = int(tokens[0]) // 1000
            if doc_id == 0:  # the last piece of a cut document, its eos alone: whose eos is due
                (doc_id,) = [d for d in docs if len(packed[d]) % len(docs[d]) == len(docs[d]) - 1]
            packed[doc_id].extend(tokens.tolist())
    copies = {}
    for doc_id, tokens in docs.items():
        got = packed[doc_id]
        whole, rest = divmod(len(got), len(tokens))
        # whole copies in order, then the start of the next one: nothing lost, nothing twice
        assert got == tokens * whole + tokens[:rest], doc_id
        copies[doc_id] = whole
    assert min(copies.values()) >= 2  # 40 batches span several epochs
    assert max(copies.values()) - min(copies.values()) <= 1  # epoch by epoch


def test_short_documents_leave_little_padding(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [200], lengths=(1, 2, 3, 4))
    p = pipeline(input_config([[path, 1, "packed", 1.0]]))
    segments = np.concatenate([p.next_batch().segments for _ in range(10)])
    assert (segments == 0).mean() < 0.05
    assert (segments.max(axis=1) >= 3).all()  # several documents share each window


def positions_and_batches(cfg, n):
    p = pipeline(cfg)
    out = []
    for _ in range(n):
        out.append((p.state(), p.next_batch()))
    return out


def assert_same_batch(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_resume_from_any_position_gives_the_uninterrupted_batches(tmp_path, short_lookahead):
    # (a short look-ahead: a restore re-reads the pending documents, not epochs of them)
    path, _ = write_dataset(tmp_path, "d", [9, 8], lengths=LENGTHS)
    cfg = input_config([[path, 1, "packed", 1.0]])
    run = positions_and_batches(cfg, 12)
    mid_document = 0
    for k in range(1, 12, 2):  # each resume builds a pipeline: about a second
        position = run[k][0]
        pending = position["streams"]["0"][0]["packed"]["pending"]
        mid_document += any(used > 0 for _, used in pending)
        resumed = pipeline(cfg)
        resumed.restore(position)
        for _, want in run[k:]:
            assert_same_batch(resumed.next_batch(), want)
    assert mid_document  # some positions fell inside a cut document


@pytest.mark.slow
def test_a_packed_position_restores_on_another_host_count(tmp_path):
    path, _ = write_dataset(tmp_path, "d", [6, 6, 6, 6], lengths=LENGTHS)
    cfg = input_config([[path, 1, "packed", 1.0]], input_streams=2)
    one = pipeline(cfg)
    for _ in range(3):
        one.next_batch()
    hosts = [pipeline(cfg, process_index=h, process_count=2) for h in range(2)]
    for host in hosts:
        host.restore(one.state())  # 1 process -> 2 processes
    for _ in range(4):
        expected = one.next_batch()
        got = [h.next_batch() for h in hosts]
        for field in ("tokens", "segments"):
            joined = np.concatenate([getattr(g, field) for g in got])
            np.testing.assert_array_equal(joined, getattr(expected, field))


def test_a_mixture_of_packed_and_joined_documents_stacks(tmp_path):
    packed, _ = write_dataset(tmp_path / "a", "a", [10], lengths=LENGTHS)
    joined, _ = write_dataset(tmp_path / "b", "b", [10], first_id=500, lengths=LENGTHS)
    cfg = input_config([[packed, 1, "packed", 1.0], [joined, 1, "documents_fixed", 1.0]])
    batch = pipeline(cfg).next_batch()
    from_joined = batch.tokens[:, 0] // 1000 >= 500
    assert from_joined.any() and (~from_joined).any()
    assert np.all(batch.segments[from_joined] == 1)  # GPT-Neo's join: one stream, one segment


def write_sft_records(folder, examples):
    """Fine-tuning records as `gpt-neo data tfrecords --sft` writes them: text and loss_mask."""
    from gpt_neo.storage import tf

    t = tf()
    folder.mkdir(parents=True, exist_ok=True)
    with t.io.TFRecordWriter(str(folder / f"s_0_{len(examples)}.tfrecords")) as writer:
        for tokens, mask in examples:
            feature = {
                "text": t.train.Feature(int64_list=t.train.Int64List(value=tokens)),
                "loss_mask": t.train.Feature(int64_list=t.train.Int64List(value=mask)),
            }
            writer.write(
                t.train.Example(features=t.train.Features(feature=feature)).SerializeToString()
            )
    config = folder / "s.json"
    config.write_text(
        f'{{"n_vocab": 1000, "path": "{folder}/s_*.tfrecords", "eos_id": 0, "mode": "sft"}}'
    )
    return str(config)


def test_fine_tuning_records_are_packed_with_their_loss_masks(tmp_path):
    # prompt tokens 1xx (mask 0), completion tokens 2xx and the eos (mask 1)
    examples = []
    for k in range(12):
        prompt = [100 + k] * (1 + k % 3)
        completion = [200 + k] * (2 + k % 4) + [0]
        examples.append((prompt + completion, [0] * len(prompt) + [1] * len(completion)))
    config = write_sft_records(tmp_path, examples)
    batch = pipeline(input_config([config])).next_batch()  # mode sft: packed by default
    assert batch.loss_mask is not None and batch.segments is not None
    for tokens, mask in pieces(batch):
        expected = [int(t >= 200 or t == 0) for t in tokens]
        np.testing.assert_array_equal(mask, expected)
    assert np.all(batch.loss_mask[batch.segments == 0] == 0)  # padding never counts


def test_check_dataset_says_what_packing_these_records_gives(tmp_path):
    from gpt_neo.data.diagnostics import check_datasets

    # 24 documents of 4 tokens with their eos: 4 per window of 17, one token of padding each
    path, _ = write_dataset(tmp_path, "d", [24], lengths=(3,))
    lines = []
    assert check_datasets(input_config([[path, 1, "packed", 1.0]]), out=lines.append)
    assert any(
        "sampling mode packed: windows of n_ctx + 1 = 17 tokens hold 4.0 documents on "
        "average, 5.9% padding" in line
        for line in lines
    ), lines


def test_packing_needs_an_eos_id_and_documents(tmp_path):
    _path, _ = write_dataset(tmp_path, "d", [4])
    config = tmp_path / "no_eos.json"
    config.write_text(f'{{"n_vocab": 1000000, "path": "{tmp_path}/d_*.tfrecords"}}')
    with pytest.raises(ConfigError, match="no_eos': sampling mode 'packed' needs 'eos_id'"):
        pipeline(input_config([[str(config), 1, "packed", 1.0]]))
    chunks, _ = write_dataset(tmp_path / "c", "c", [4], mode="chunks")
    with pytest.raises(ConfigError, match=r"fixed-length chunks .* cannot be packed"):
        pipeline(input_config([[chunks, 1, "packed", 1.0]]))
