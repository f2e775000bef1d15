"""The device feed: batches prefetched to the devices are the pipeline's batches, in order, and
each carries the position a checkpoint must record (not the prefetcher's)."""

import threading

import jax
import numpy as np
import pytest

import gpt_neo
from gpt_neo.data.feed import DeviceFeed
from gpt_neo.data.pipeline import InputPipeline
from gpt_neo.errors import DataError
from gpt_neo.training.trainer import Trainer
from tests.support.helpers import input_config, write_dataset


def config(path, **keys):
    datasets = [[path, 2, "documents_random", 1.0]]
    return input_config(datasets, train_batch_size=8, mesh_shape="x:8", **keys)


def pipeline(cfg):
    return InputPipeline(cfg, process_index=0, process_count=1, out=None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("feed"), "d", [9, 7, 11])[0]


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_prefetched_batches_and_positions_equal_the_pipelines_own(dataset, depth):
    cfg = config(dataset)
    trainer = Trainer(cfg, gpt_neo.make_mesh(cfg))
    direct = pipeline(cfg)
    expected = [(direct.next_batch(), direct.state()) for _ in range(12)]
    fed = pipeline(cfg)
    with DeviceFeed(fed.next_batch, fed.state, trainer.place, depth) as feed:
        for want_batch, want_position in expected:
            batch, position = feed.next()
            assert batch.tokens.sharding == trainer.batch_sharding  # already on the devices
            np.testing.assert_array_equal(np.asarray(batch.tokens), want_batch.tokens)
            assert position == want_position
        while feed._ready.qsize() < depth:  # the feed runs ahead of the consumer...
            threading.Event().wait(0.01)
        # ...so the pipeline is past the last batch consumed, which is what `position` records
        assert fed.state()["batch"] >= expected[-1][1]["batch"] + depth


def test_resuming_from_a_fed_position_gives_the_uninterrupted_batches(dataset):
    cfg = config(dataset)
    uninterrupted = pipeline(cfg)
    reference = [uninterrupted.next_batch() for _ in range(10)]
    fed = pipeline(cfg)
    with DeviceFeed(fed.next_batch, fed.state, lambda batch: batch, depth=3) as feed:
        for _ in range(4):
            _, position = feed.next()
    resumed = pipeline(cfg)
    resumed.restore(position)
    for want in reference[4:]:
        np.testing.assert_array_equal(resumed.next_batch().tokens, want.tokens)


def test_a_pipeline_error_is_raised_where_its_batch_was_due():
    produced = iter([np.zeros(2), np.ones(2)])

    def produce():
        try:
            return next(produced)
        except StopIteration:
            raise DataError("file x is corrupt at record 7") from None

    feed = DeviceFeed(produce, dict, np.asarray, depth=4)
    assert feed.next()[0].tolist() == [0, 0] and feed.next()[0].tolist() == [1, 1]
    with pytest.raises(DataError, match="corrupt at record 7"):
        feed.next()
    assert not feed._thread.is_alive()


def test_closing_a_feed_with_a_full_queue_stops_its_thread():
    feed = DeviceFeed(lambda: np.zeros(1), dict, np.asarray, depth=2)
    while feed._ready.qsize() < 2:  # the producer now blocks on the full queue
        threading.Event().wait(0.01)
    feed.close()
    assert not feed._thread.is_alive()


def test_waiting_for_the_input_is_measured():
    def slow():
        threading.Event().wait(0.05)
        return np.zeros(1)

    with DeviceFeed(slow, dict, np.asarray, depth=1) as feed:
        for _ in range(3):
            feed.next()
        assert 0.08 < feed.take_waited() < 1.0
        assert feed.take_waited() == 0.0
    assert jax.device_count() == 8
