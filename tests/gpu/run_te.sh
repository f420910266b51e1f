#!/usr/bin/env bash
# The GPU tests of both backends in one call (tests/gpu/RESULTS.md), run from the repo root on the device machine
# after `bash .whl/gpu-install.sh`: megatron's local path (no TE importable) in the background, the Transformer
# Engine path in the foreground. Figures go to $OUT/{local,te}.jsonl, logs to $OUT/{local,te}.log.
set -uo pipefail
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NVTE_FRAMEWORK=pytorch NVIDIA_TF32_OVERRIDE=0  # fp32 exactness tests: no TF32 (conftest)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
limit=${LIMIT:-540}
PYTHONPATH=/tmp/site:$PWD GPU_RESULTS=$out/local.jsonl timeout "$limit" python3 -m pytest -q -m gpu -s \
  -p no:cacheprovider ${LOCAL_TESTS:-tests/test_elastic_gpu.py tests/gpu/test_elastic_stage_gpu.py} > "$out/local.log" 2>&1 &
local_pid=$!
PYTHONPATH=/tmp/site-te:/tmp/site:$PWD GPU_RESULTS=$out/te.jsonl timeout "$limit" python3 -m pytest -q -m gpu -s \
  -p no:cacheprovider ${TE_TESTS:-tests/gpu/test_te_path.py} > "$out/te.log" 2>&1
echo "te exit $?"
wait $local_pid
echo "local exit $?"
grep -h "gpu-result\|passed\|failed\|Error" "$out/te.log" "$out/local.log" | cut -c1-400 | tail -40
