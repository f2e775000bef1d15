"""The train step on packed rows: its loss is the mean cross-entropy of each document's own
next-token predictions, computed here from each document run alone; padding and document
counts are reported."""

import jax
import numpy as np
import pytest

import gpt_neo
from gpt_neo.data.batch import Batch
from gpt_neo.training.trainer import Trainer
from tests.support.helpers import tiny_config

N_CTX = 32


def packed_rows(rows, seed=0):
    """Rows of n_ctx + 1 tokens: documents of random lengths back to back, then padding."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((rows, N_CTX + 1), np.int32)
    segments = np.zeros((rows, N_CTX + 1), np.int32)
    documents = []
    for r in range(rows):
        start, segment = 0, 0
        while start < N_CTX - 2:
            size = int(rng.integers(2, 14))
            size = min(size, N_CTX + 1 - start)
            segment += 1
            tokens[r, start : start + size] = rng.integers(1, 128, size)
            segments[r, start : start + size] = segment
            documents.append(tokens[r, start : start + size].copy())
            start += size
    return Batch(tokens, segments), documents


def mean_cross_entropy_alone(cfg, params, documents):
    """Each document alone through `gpt_neo.apply`: the mean over all next-token targets."""
    total, count = 0.0, 0
    for doc in documents:
        if doc.size < 2:
            continue
        logits = np.asarray(gpt_neo.apply(cfg, params, doc[None]), np.float64)[0, :-1]
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        total += float((log_z - logits[np.arange(doc.size - 1), doc[1:]]).sum())
        count += doc.size - 1
    return total / count


@pytest.mark.slow
def test_a_packed_step_trains_on_each_document_as_if_alone():
    # two data-parallel replicas, two microbatches each: the rows and their segments travel
    cfg = tiny_config(
        n_ctx=N_CTX,
        train_batch_size=4,
        mesh_shape="x:2,y:4",
        layout="batch:x,heads:y",
        tokens_per_mb_per_replica=N_CTX,
        train_steps=1,
    )
    trainer = Trainer(cfg, gpt_neo.make_mesh(cfg))
    assert trainer.n_micro == 2
    state = trainer.init_state(0)
    params = jax.device_get(state["params"])  # the step donates the state
    batch, documents = packed_rows(4)
    with jax.set_mesh(trainer.mesh):
        _, metrics = trainer.step(state, trainer.place(batch))
    single = tiny_config(n_ctx=N_CTX)
    expected = mean_cross_entropy_alone(single, params, documents)
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-5)
    inputs = batch.segments[:, :-1]
    np.testing.assert_allclose(float(metrics["padding"]), (inputs == 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(
        float(metrics["segments_per_row"]), inputs.max(axis=1).mean(), rtol=1e-6
    )
