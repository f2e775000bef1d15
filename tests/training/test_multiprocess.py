"""Two processes x 4 CPU devices (localhost coordinator) train like one process x 8 devices,
and a checkpoint written by the pair restores in the pair."""

import json
import socket

import jax
import numpy as np
import pytest

from tests.support.helpers import (
    SMALL_RUN,
    restore_params,
    start_main,
    write_config,
    write_text_dataset,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("text"), docs=40, eval_docs=4, files_per=10)


def config(tmp_path, dataset, name, steps):
    keys = {
        **SMALL_RUN,
        "train_steps": steps,
        "lr_decay_end": 8,
        "input_streams": 2,
        "datasets": [[dataset, 1, "documents_random", 1.0]],
        "model_path": str(tmp_path / name),
    }
    return write_config(tmp_path / f"{name}.json", keys)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model, processes: int, devices_each: int, *extra: str):
    args = ["--model", model, "--steps_per_checkpoint", "4", *extra]
    if processes > 1:
        args += [
            "--coordinator_address",
            f"127.0.0.1:{free_port()}",
            "--num_processes",
            str(processes),
        ]
    ranks = [["--process_id", str(i)] for i in range(processes)] if processes > 1 else [[]]
    launched = [start_main(*args, *rank, devices=devices_each) for rank in ranks]
    outputs = [p.communicate(timeout=300)[0] for p in launched]
    for p, out in zip(launched, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


@pytest.mark.process
def test_two_processes_train_like_one_and_resume(tmp_path, dataset):
    run(config(tmp_path, dataset, "one", 8), processes=1, devices_each=8)
    pair = config(tmp_path, dataset, "pair", 4)
    run(pair, processes=2, devices_each=4)
    run(pair, 2, 4, "--set", "train_steps=8")
    assert (tmp_path / "pair" / "checkpoints" / "4").is_dir()
    np.testing.assert_allclose(losses(tmp_path / "pair"), losses(tmp_path / "one"), rtol=1e-5)
    one = restore_params(tmp_path / "one/checkpoints/8/state")
    pair_params = restore_params(tmp_path / "pair/checkpoints/8/state")
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(pair_params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
