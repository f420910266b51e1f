"""GPU: a diverging bf16 run (LR 1e3) stops with the one-line NaN/Inf message (exit 3) instead of megatron's rerun
state machine's RuntimeError, and the last good checkpoint stays intact."""

import os
import re

import pytest
import torch

from conftest import TINY, run_cli

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_lr_1e3_stops_with_the_step_on_gpu(tmp_path, record):
    args = ["pretrain", "--recipe", TINY, f"run.root={tmp_path}", "training.lr=1e3", "training.min_lr=1.0",
            "training.lr_warmup_iters=0", "training.seq_length=256", "checkpointing.save_interval=1",
            "checkpointing.keep_last=0", "logging.log_interval=1"]
    proc = run_cli(*args, "training.train_iters=20")
    lines = proc.stderr.strip().splitlines()
    record("divergence bf16", {"returncode": proc.returncode, "last_line": lines[-1] if lines else ""})
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "cuda bf16" in proc.stdout
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    m = re.match(r"error: pretrain: non-finite .* at step (\d+) \(budget: full model\)", lines[0])
    assert m, lines[0]
    ckpts = os.path.join(tmp_path, "tiny", "pretrain", "checkpoints")
    last = int(open(os.path.join(ckpts, "latest_checkpointed_iteration.txt")).read())
    assert last == int(m.group(1)) - 1 and os.path.isdir(os.path.join(ckpts, f"iter_{last:07d}"))
    rerun = run_cli(*args, f"training.train_iters={last}")  # the kept checkpoint loads whole
    assert rerun.returncode == 0 and f"(iteration {last})" in rerun.stdout, rerun.stderr[-4000:]
