#!/usr/bin/env bash
# The GPU check: correctness and speed of Tiny-K on this CUDA machine, in under 8 minutes,
# ending with one table (see code/gpu_check.py). Run from anywhere: bash code/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export TRANSFORMERS_VERBOSITY=error
# first the driver, the CUDA build and the compute capability; it stops if this torch cannot use the GPUs
python code/cuda_env.py
timeout 900 python code/gpu_check.py "$@"
