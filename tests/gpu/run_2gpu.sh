#!/usr/bin/env bash
# The 2-GPU tests (issue 18) in one call on the nvidia-h200-x2 machine, from the repo root after
# `bash .whl/gpu-install.sh` (TE in /tmp/site-te, mamba-ssm etc. in /tmp/site), tests/gpu/RESULTS.md:
#   bash tests/gpu/run_2gpu.sh [exact|proxy|all]      (default all; each part under its own LIMIT seconds)
# exact: tests/gpu/test_multi_gpu.py (masked == sliced at TP/EP=2, CP=2 == CP=1, TP=2 checkpoint -> TP=1 / EP=2);
# proxy: tests/gpu/test_multi_gpu_proxy.py (proxy_1b stage 1, 50 steps, 1 GPU vs TP=2 vs EP=2).
# Each test starts its own ranks (torchrun --standalone --nproc-per-node 2, NCCL). NVLink multicast variables stay
# as the machine presets them (never unset here). Figures: $OUT/multi_gpu_{exact,proxy}.jsonl, logs beside them.
set -uo pipefail
part=${1:-all}
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NVTE_FRAMEWORK=pytorch NVIDIA_TF32_OVERRIDE=0  # fp32 exactness tests: no TF32 (conftest)
export PYTHONPATH=/tmp/site-te:/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/device.txt"
env | grep -i "NCCL_NVLS\|MULTICAST" | tee "$out/multicast_env.txt"  # recorded, left as preset
limit=${LIMIT:-560}
# proxy runs (~50 GB of checkpoints) stay on the device's /tmp, not in $OUT; a second `proxy` call on the same warm
# machine continues from the finished stages if the first was cut by the time limit
export MULTI_GPU_PROXY_ROOT=${MULTI_GPU_PROXY_ROOT:-/tmp/proxy_2gpu}
status=0
run_part() {  # name, test file
    GPU_RESULTS=$out/multi_gpu_$1.jsonl timeout "$limit" python3 -m pytest -q -m gpu -s -p no:cacheprovider -rs "$2" \
        > "$out/multi_gpu_$1.log" 2>&1
    local rc=$?
    echo "$1 exit $rc"
    grep -h "gpu-result\|passed\|failed\|skipped\|SKIPPED\|Error" "$out/multi_gpu_$1.log" | cut -c1-500 | tail -30
    [ $rc = 0 ] || status=$rc
}
case $part in
    exact) run_part exact tests/gpu/test_multi_gpu.py ;;
    proxy) run_part proxy tests/gpu/test_multi_gpu_proxy.py ;;
    all) run_part exact tests/gpu/test_multi_gpu.py; run_part proxy tests/gpu/test_multi_gpu_proxy.py ;;
    *) echo "usage: $0 [exact|proxy|all]" >&2; exit 2 ;;
esac
exit $status
