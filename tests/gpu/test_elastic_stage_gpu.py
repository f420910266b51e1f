"""GPU: the elastic stage 1 trains in bf16 on CUDA through mamba-ssm's Triton path (CLI, as users run it):
pretrain -> importance -> stage1 -> evaluate; the router reaches every budget, trained budgets beat the
untrained slices. The elastic-vs-plain-KD step time is bench/bench_elastic_step.py (tests/gpu/RESULTS.md)."""

import json
import os

import pytest
import torch

from conftest import TINY, run_cli

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_tiny_stage1_bf16_on_gpu(tmp_path, record):
    common = [f"run.root={tmp_path}", "training.seq_length=512", "importance.data=synthetic"]
    for stage, extra in (("pretrain", ["training.train_iters=100", "logging.log_interval=50"]),
                         ("importance", []),
                         ("stage1", ["logging.log_interval=20"]),
                         ("evaluate", ["--trained", "stage1"])):
        proc = run_cli(stage, "--recipe", TINY, *common, *extra)
        assert proc.returncode == 0, f"{stage}: " + proc.stderr[-4000:]
        print(proc.stdout)
        if stage == "stage1":
            assert "cuda bf16" in proc.stdout
            assert " mamba-triton" in proc.stdout  # the run header: mamba-ssm's Triton kernels, not the torch scan
            last_log = [line for line in proc.stdout.splitlines() if line.startswith("[stage1] step 60/")][0]
    with open(os.path.join(tmp_path, "tiny", "stage1", "elastic_budgets.json")) as f:
        resolved = json.load(f)["budgets"]
    with open(os.path.join(tmp_path, "tiny", "evaluate", "stage1.json")) as f:
        result = json.load(f)
    record("tiny stage1 bf16", {"last_log_line": last_log, "parent": result["parent"],
                                "budgets": [{k: r[k] for k in ("name", "fraction", "trained", "untrained")}
                                            for r in result["budgets"]],
                                "active_fraction": {r["name"]: r["active_fraction"] for r in resolved}})
    for row in resolved:
        assert abs(row["active_fraction"] / row["fraction"] - 1) <= 0.05, row
    for row in result["budgets"]:
        if row["fraction"] < 1:
            assert row["trained"] < row["untrained"], row
