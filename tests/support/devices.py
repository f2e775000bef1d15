"""Which devices the suite runs on: 8 simulated CPU devices, or, with GPT_NEO_TEST_GPU=1
(bench/gpu_check.sh on a machine with a GPU), the GPU and only the tests marked `gpu`."""

import os

GPU = os.environ.get("GPT_NEO_TEST_GPU") == "1"
