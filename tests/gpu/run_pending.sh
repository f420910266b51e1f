#!/usr/bin/env bash
# The pending H200 runs of tests/gpu/RESULTS.md ("Pending"), one phase per device call (each under 10 minutes),
# from the repo root on the device machine: `bash tests/gpu/run_pending.sh N`. The machine is given back 30 s
# after a call, so the next phase should follow at once; installs are skipped on a warm machine, and Triton keeps
# its autotuning on disk (TRITON_CACHE_AUTOTUNING) so later processes skip the 40-100 s per shape.
# Logs and JSON go to $OUT (at most 8 files come back per call).
set -uo pipefail
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
[ -d /tmp/site-te ] || bash .whl/gpu-install.sh > "$out/install.log" 2>&1
export TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1 NVTE_FRAMEWORK=pytorch
export PYTHONPATH=/tmp/site-te:/tmp/site:$PWD
quiet() { grep -v -i "warn\|Evict LRU"; }
case "${1:-}" in
  0)  # the TE tests and the local-path stage test, after the masks' saving change (8.5 min)
    LIMIT=540 TE_TESTS=tests/gpu/test_te_path.py LOCAL_TESTS=tests/gpu/test_elastic_stage_gpu.py bash tests/gpu/run_te.sh ;;
  1)  # issue 15: TE bf16 steps at micro-batch 4 and 8 (host-bound or not), then the profiling pass (5-6 min)
    timeout 560 python3 bench/bench_throughput.py --recipe recipes/proxy_1b.yaml --combos te:bf16 \
      --micro-batch-sizes 4,8 --memory-seq 0 --profile 20 --json "$out/throughput.json" 2>&1 \
      | tee "$out/throughput.log" | quiet | grep -v "^ *$" | tail -60 ;;
  2)  # issue 14: the memory plan vs the measured peak (two steps per case), pretrain then stage 1
    timeout 280 python3 bench/bench_memory_plan.py --stages pretrain --out "$out/memory_plan_pretrain.json" 2>&1 \
      | tee "$out/memory_plan_pretrain.log" | quiet | tail -8
    timeout 290 python3 bench/bench_memory_plan.py --stages stage1 --out "$out/memory_plan_stage1.json" 2>&1 \
      | tee "$out/memory_plan_stage1.log" | quiet | tail -10 ;;
  3)  # issue 12: an FP8 run's checkpoint resumes and loads into bf16 (once per machine), then FP8 vs bf16, pretrain
      # and stage 1, 100 steps, + each stage-1 student scored per budget; finished stages are skipped: repeat this
      # phase on the warm machine until the tables print (3 calls)
    if [ ! -f /tmp/fp8-checkpoint-test.done ]; then
      GPU_RESULTS=$out/gpu.jsonl timeout 300 python3 -m pytest -q -m gpu -s -p no:cacheprovider \
        tests/gpu/test_fp8_checkpoint.py 2>&1 | tee "$out/tests.log" | quiet | tail -15
      touch /tmp/fp8-checkpoint-test.done
    fi
    timeout $(( 560 - SECONDS )) python3 bench/bench_fp8.py --root /tmp/fp8 --steps 100 training.global_batch_size=4 2>&1 \
      | tee "$out/fp8.log" | quiet | tail -30 ;;
  4)  # issue 15: the fused Mamba path and TE's fused grouped expert MLP, each against its unfused path, then
      # both timed side by side with the recipe (TE bf16, seq 4096) (7 min est.)
    GPU_RESULTS=$out/gpu.jsonl timeout 200 python3 -m pytest -q -m gpu -s -p no:cacheprovider \
      tests/gpu/test_mamba_mem_eff.py tests/gpu/test_fused_grouped_mlp.py 2>&1 | tee "$out/tests.log" | quiet | tail -20
    timeout 340 python3 bench/bench_throughput.py --recipe recipes/proxy_1b.yaml --combos te:bf16 --memory-seq 0 \
      --variant fused-mlp:model.moe_fused_grouped_mlp=true --variant mem-eff:model.mamba_mem_eff_path=true \
      --json "$out/throughput_variants.json" 2>&1 | tee "$out/throughput_variants.log" | quiet | grep -v "^ *$" | tail -14 ;;
  5)  # issues 16, 13: quantisation kernels, the QAD step's cost, NaN/Inf on CUDA
    GPU_RESULTS=$out/gpu.jsonl timeout 200 python3 -m pytest -q -m gpu -s -p no:cacheprovider \
      tests/gpu/test_quant_kernels.py tests/gpu/test_divergence_gpu.py 2>&1 | tee "$out/tests.log" | quiet | tail -20
    timeout 100 python3 bench/bench_fake_quant.py 2>&1 | tee "$out/fake_quant.log" | quiet | tail -12
    timeout 240 python3 bench/bench_elastic_step.py --recipe recipes/proxy_1b.yaml --dtype bf16 --qad 2>&1 \
      | tee "$out/qad_step.log" | quiet | tail -12 ;;
  6)  # the local-path GPU tests whose kernel check now reads the stage's header (it failed when run alone)
    GPU_RESULTS=$out/gpu.jsonl timeout 560 python3 -m pytest -q -m gpu -s -p no:cacheprovider \
      tests/gpu/test_elastic_stage_gpu.py 2>&1 | tee "$out/tests.log" | quiet | tail -20 ;;
  7)  # issue 17: the views test's corrected bound; the engine choice (megatron-core static inference vs
      # transformers, batch 1 and 8, each proxy budget)
    GPU_RESULTS=$out/gpu.jsonl timeout 560 python3 -m pytest -q -m gpu -s -p no:cacheprovider \
      "tests/gpu/test_budget_inference_gpu.py::test_views_on_gpu_equal_sliced_and_add_no_memory" \
      "tests/gpu/test_budget_inference_gpu.py::test_proxy_megatron_engine_vs_transformers" \
      2>&1 | tee "$out/tests.log" | quiet | tail -30 ;;
  *) echo "usage: bash tests/gpu/run_pending.sh 0|1|2|3|4|5|6|7" >&2; exit 2 ;;
esac
