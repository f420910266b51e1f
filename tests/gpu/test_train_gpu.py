"""GPU: the tiny recipe trains in bf16 on CUDA through mamba-ssm's Triton path (pretrain CLI, as users run it)."""

import json
import os

import pytest
import torch

from conftest import TINY, run_cli

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_tiny_pretrain_bf16_on_gpu(tmp_path, record):
    iters = 200
    proc = run_cli("pretrain", "--recipe", TINY, f"run.root={tmp_path}", f"training.train_iters={iters}",
                   "training.seq_length=512", "training.micro_batch_size=8", "training.global_batch_size=16",
                   "logging.log_interval=50", "checkpointing.save_interval=100")
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stdout)
    assert "cuda bf16" in proc.stdout
    curve = {}
    with open(os.path.join(tmp_path, "tiny", "pretrain", "logs", "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            curve[rec["step"]] = rec
    first, last = curve[1]["loss"], curve[iters]["loss"]
    last_log = [l for l in proc.stdout.splitlines() if l.startswith(f"[pretrain] step {iters}/")][0]
    record("tiny pretrain bf16", {"loss_step1": first, f"loss_step{iters}": last, "last_log_line": last_log})
    assert last < first - 2.0
    assert " mamba-triton" in proc.stdout  # the run header: the stage ran mamba-ssm's Triton kernels
