#!/usr/bin/env bash
# Runs the GPU tests on the device machine (see tests/gpu/RESULTS.md). Usage from the repo root there:
#   bash .whl/gpu-install.sh && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH && bash tests/gpu/run.sh
set -uo pipefail
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export GPU_RESULTS=$out/gpu_results.jsonl PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -m pytest -q -m gpu -s -p no:cacheprovider tests/gpu "$@" 2>&1 | tee "$out/pytest.log"
