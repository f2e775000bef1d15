#!/usr/bin/env bash
# The GPU checks, as one command for a lent GPU machine (15 minutes of device time in all; this
# takes about 8): the tests marked `gpu`, then bench/gpu_mfu.py (tokens/s and MFU at the 125M
# and 1.3B shapes against Hugging Face's PyTorch step on the same GPU). That machine has jax
# (CUDA), optax, orbax, torch, transformers and pytest but no TensorFlow and no network:
# nothing on this path imports TensorFlow, and gpt_neo is used from this checkout, not
# installed. Logs go to $OUT (the device tool's folder that comes back) or /tmp/gpu_check.
#
#   bash bench/gpu_check.sh            (CONTRIBUTING.md: how to run it and what to report)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
LOGS="${OUT:-/tmp/gpu_check}"
mkdir -p "$LOGS"
PY="${PYTHON:-python3}"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$LOGS/gpu.txt"

echo "== tests marked gpu"
GPT_NEO_TEST_GPU=1 timeout 240 "$PY" -m pytest -p no:cacheprovider -q -rs tests/models/test_gpu.py \
    2>&1 | tee "$LOGS/gpu_tests.log" || status=1

echo "== MFU: ours against Hugging Face's PyTorch step"
timeout 330 "$PY" bench/gpu_mfu.py 2>&1 | tee "$LOGS/gpu_mfu.log" || status=1
exit $status
