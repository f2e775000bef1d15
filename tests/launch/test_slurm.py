"""scripts/slurm/train.sbatch driven with SLURM's environment set by hand: a stand-in `srun`
starts one task per "node" as SLURM would (SLURM_PROCID, SLURM_LOCALID), and the tasks must
join into one JAX run through SLURM's variables alone."""

import os
import socket
import subprocess
import sys

import pytest

from tests.support.devices import cpu_flags
from tests.support.helpers import REPO, SMALL_RUN, write_config, write_text_dataset

SCRIPT = REPO / "scripts" / "slurm" / "train.sbatch"
FAKE_SRUN = """#!/bin/bash
# srun, as far as train.sbatch uses it: SLURM_NTASKS copies of the command, one per node
[ "$1" = "--kill-on-bad-exit=1" ] && shift
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i "$@" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p"; code=$?; [ "$code" -gt "$status" ] && status=$code; done
exit "$status"
"""


def slurm_env(tmp_path, tasks: int, python: str) -> dict:
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NODELIST": "127.0.0.1",
        "SLURM_STEP_NUM_NODES": str(tasks),
        "SLURM_SUBMIT_DIR": str(REPO),
        "JAX_COORDINATOR_PORT": str(port),
        "XLA_FLAGS": cpu_flags(4),
        "JAX_PLATFORMS": "cpu",
        "GPT_NEO_PYTHON": python,
        "GPT_NEO_HEARTBEAT_TIMEOUT": "900",  # two processes on a loaded 2-core machine
    }


@pytest.mark.process
def test_two_nodes_form_one_run_from_slurm_variables(tmp_path):
    dataset = write_text_dataset(tmp_path / "text", docs=20, eval_docs=2, files_per=5)
    model = write_config(
        tmp_path / "model.json",
        {
            **SMALL_RUN,
            "train_steps": 4,
            "datasets": [[dataset, 1, "documents_random", 1.0]],
            "model_path": str(tmp_path / "run"),
        },
    )
    done = subprocess.run(
        ["bash", str(SCRIPT), model, "--steps_per_checkpoint", "2"],
        env=slurm_env(tmp_path, 2, sys.executable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # 2 processes x 4 devices became one 8-device mesh (x:4,y:2 needs all 8)
    assert "training from step 0 to 4 on 8 cpu device(s)" in done.stdout
    assert (tmp_path / "run" / "checkpoints" / "4").is_dir()
    assert not (tmp_path / "scontrol.log").exists()


@pytest.mark.process
def test_a_preempted_job_is_requeued(tmp_path):
    stand_in = tmp_path / "python"
    stand_in.write_text("#!/bin/bash\necho saved a checkpoint; exit 75\n")
    stand_in.chmod(0o755)
    done = subprocess.run(
        ["bash", str(SCRIPT), "configs/demo.json"],
        env=slurm_env(tmp_path, 2, str(stand_in)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 75, done.stdout + done.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
