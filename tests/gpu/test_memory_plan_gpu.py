"""The memory plan vs the measured peak on this GPU (docs/memory_plan.md): recipes/proxy_1b.yaml, one pretrain
step at seq 4096 and one stage-1 (elastic KD) step, micro-batch 1, bf16; within 10%. The full table (with and
without recompute, the longest sequence that fits): ``python bench/bench_memory_plan.py``."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench", "bench_memory_plan.py")
PROXY = os.path.join(REPO, "recipes", "proxy_1b.yaml")

pytestmark = pytest.mark.gpu


def run(case, root):
    proc = subprocess.run([sys.executable, BENCH, "--recipe", PROXY, "--root", root, "--case", case], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)


@pytest.mark.parametrize("stage", ["pretrain", "stage1"])
def test_plan_within_10_percent_of_measured_peak(stage, record):
    root = tempfile.mkdtemp(prefix="memory_plan_")
    if stage == "stage1":
        run("teacher", root)
    row = run(f"{stage}:4096:none", root)
    ratio = row["measured"] / row["plan"]
    record(f"{stage} seq 4096 measured/plan", {"measured_gib": row["measured"] / 2**30,
                                               "plan_gib": row["plan"] / 2**30, "ratio": ratio,
                                               "terms_gib": {n: b / 2**30 for n, b in row["terms"]}})
    assert 0.9 <= ratio <= 1.1, f"measured / plan = {ratio:.3f}"
