"""A whole run on `gs://`, against a local GCS emulator (tests/support/gcs_emulator.py): TFRecords made
by data/create_tfrecords.py in a bucket, training that reads them, checkpoints in the bucket
that survive kill -9, and every file the run writes (metrics, plot, TensorBoard, the sacred
record, predictions, eval results, an export) landing in the bucket, not in a local folder
named `gs:`."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.support.devices import cpu_flags
from tests.support.gcs_emulator import gcs  # noqa: F401 (the session's emulator)
from tests.support.helpers import PANGRAM, REPO, SMALL_RUN, restore_params, write_config

BUCKET = "gs://test-bucket"
STEPS, EVERY = 12, 4


def run_main(gcs_env: dict, cwd, *args, devices: int = 8) -> subprocess.Popen:
    env = {
        **gcs_env,
        "XLA_FLAGS": cpu_flags(devices),
        "JAX_PLATFORMS": "cpu",
    }
    return subprocess.Popen(
        [sys.executable, str(REPO / "main.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(process, timeout=300) -> str:
    out, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def story(gcs, tmp_path_factory):  # noqa: F811
    """TFRecords written to the bucket; a reference run with a local model_path; the same run
    with model_path in the bucket, killed with -9 while writing its second checkpoint and
    restarted."""
    tmp = tmp_path_factory.mktemp("gcs-run")
    env = gcs.subprocess_env()
    raw = tmp / "raw"
    raw.mkdir()
    words = PANGRAM.split()
    for k in range(30):
        (raw / f"{k:03d}.txt").write_text(" ".join(words[(k + i) % len(words)] for i in range(40)))
    made = subprocess.run(
        [
            sys.executable,
            str(REPO / "data" / "create_tfrecords.py"),
            "--input_dir",
            str(raw),
            "--name",
            "train",
            "--output_dir",
            f"{BUCKET}/data",
            "--encoder_path",
            "byte",
            "--separator",
            "256",
            "--files_per",
            "10",
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    dataset = tmp / "text.json"
    dataset.write_text(
        json.dumps(
            {
                "n_vocab": 258,
                "path": f"{BUCKET}/data/train_*.tfrecords",
                "eval_path": f"{BUCKET}/data/train_*.tfrecords",
                "tokenizer_path": "byte",
                "eos_id": 256,
                "padding_id": 257,
                "mode": "documents",
            }
        )
    )
    keys = {
        **SMALL_RUN,
        "train_steps": STEPS,
        "eval_steps": 2,
        "keep_checkpoints": 3,
        "predict_max_steps": 8,
        "datasets": [[str(dataset), 1, "documents_random", 1.0]],
    }
    local = write_config(tmp / "local.json", {**keys, "model_path": str(tmp / "local-run")})
    remote = write_config(tmp / "remote.json", {**keys, "model_path": f"{BUCKET}/run"})
    every = ["--steps_per_checkpoint", str(EVERY)]
    finished(run_main(env, tmp, "--model", local, *every))

    # kill -9 as soon as the second checkpoint's first object appears in the bucket
    killed = run_main(env, tmp, "--model", remote, *every)
    deadline = time.monotonic() + 300
    while not any(
        f"/checkpoints/{2 * EVERY}" in n for n in gcs.list_objects(f"{BUCKET}/run/checkpoints/")
    ):
        assert killed.poll() is None, killed.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no second checkpoint"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    resumed = finished(run_main(env, tmp, "--model", remote, *every))
    return {"tmp": tmp, "env": env, "local": local, "remote": remote, "resumed": resumed}


def test_a_whole_run_on_gs(gcs, story, tmp_path):  # noqa: F811
    """One test for the story's checks: they share its runs (a minute of training), which
    pytest-xdist would otherwise make on each of its workers."""
    tfrecords_written_to_gs_are_read_by_training(gcs, story)
    checkpoints_on_gs_survive_kill_9_and_resume_bit_exactly(story)
    the_run_record_lands_in_the_bucket(gcs, story)
    predict_eval_and_export_write_to_the_bucket(gcs, story, tmp_path)


def tfrecords_written_to_gs_are_read_by_training(gcs, story):  # noqa: F811
    files = [n for n in gcs.list_objects(f"{BUCKET}/data/") if n.endswith(".tfrecords")]
    assert len(files) == 3  # 30 documents, 10 per file
    assert "training from step" in story["resumed"]


def checkpoints_on_gs_survive_kill_9_and_resume_bit_exactly(story):
    out = story["resumed"]
    resumed_from = int(out.split("training from step ")[1].split()[0])
    assert EVERY <= resumed_from <= 2 * EVERY  # not from scratch, not from a half-written one
    local = restore_params(story["tmp"] / "local-run" / "checkpoints" / str(STEPS) / "state")
    import orbax.checkpoint as ocp  # noqa: F401 (restore_params reads gs:// through it)

    remote = restore_params(f"{BUCKET}/run/checkpoints/{STEPS}/state")
    for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(remote), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def the_run_record_lands_in_the_bucket(gcs, story):  # noqa: F811
    names = gcs.list_objects(f"{BUCKET}/run/")
    assert not (story["tmp"] / "gs:").exists()  # nothing written by a bare open()
    lines = gcs.read_object(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"loss"' in line]
    assert steps[-1] == STEPS and len(steps) >= STEPS
    assert gcs.read_object(f"{BUCKET}/run/loss_curve.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # sacred: the killed run's record and the resumed run's, numbered on from the bucket's
    run_1 = json.loads(gcs.read_object(f"{BUCKET}/run/sacred/1/run.json"))
    run_2 = json.loads(gcs.read_object(f"{BUCKET}/run/sacred/2/run.json"))
    assert run_1["status"] == "RUNNING" and run_2["status"] == "COMPLETED"
    config = json.loads(gcs.read_object(f"{BUCKET}/run/sacred/2/config.json"))
    assert config["model_path"] == f"{BUCKET}/run"
    # TensorBoard: the train loss of the last step, read back from the event files
    events = [n for n in names if "/tensorboard/" in n and "tfevents" in n]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = {}
    for name in events:
        accumulator = EventAccumulator(name, size_guidance={"tensors": 0})
        accumulator.Reload()
        if "loss" in accumulator.Tags()["tensors"]:
            logged |= {e.step: e for e in accumulator.Tensors("loss")}
    assert STEPS in logged


def predict_eval_and_export_write_to_the_bucket(gcs, story, tmp_path):  # noqa: F811
    env, tmp = story["env"], story["tmp"]
    prompt = f"{BUCKET}/prompts/fox.txt"
    lambada = f"{BUCKET}/eval/lambada.jsonl"
    from gpt_neo import storage

    with gcs.applied():
        storage.write_text_atomic(prompt, "the quick brown")
        storage.write_text_atomic(lambada, json.dumps({"text": PANGRAM}) + "\n")
    finished(run_main(env, tmp, "--model", story["remote"], "--predict", "--prompt", prompt))
    text = gcs.read_object(f"{BUCKET}/run/predictions_{STEPS}.txt").decode()
    assert text.count("the quick brown") >= 1
    finished(run_main(env, tmp, "--model", story["remote"], "--eval", "--lambada_path", lambada))
    results = json.loads(gcs.read_object(f"{BUCKET}/run/eval_{STEPS}.json"))
    assert results["step"] == STEPS and set(results) >= {"validation", "lambada"}

    # an export to the bucket equals, byte for byte, the same export to a local folder
    finished(run_main(env, tmp, "--model", story["remote"], "--export", f"{BUCKET}/export"))
    finished(run_main(env, tmp, "--model", story["remote"], "--export", str(tmp_path / "hf")))
    for name in ("config.json", "model.safetensors"):
        assert gcs.read_object(f"{BUCKET}/export/{name}") == (tmp_path / "hf" / name).read_bytes()
    assert not os.path.exists(tmp / "gs:")
