"""A diverging run (LR 1e3) on CPU stops with one line naming the step and the budget (exit 3), not megatron's
"Torch not compiled with CUDA enabled"; its last good checkpoint is intact (the same command resumes from it).
metrics.jsonl never repeats a step after a resume."""

import json
import math
import os
import re

from conftest import TINY, run_cli
from pipeline.training.metrics import MetricsWriter

ARGS = ["training.lr=1e3", "training.min_lr=1.0", "training.lr_warmup_iters=0", "training.train_iters=6",
        "training.seq_length=64", "checkpointing.save_interval=1", "checkpointing.keep_last=0",
        "logging.log_interval=1", "logging.tensorboard=false"]


def steps(root, name="tiny"):
    with open(os.path.join(root, name, "pretrain", "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_lr_1e3_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    root = str(tmp_path)
    proc = run_cli("pretrain", "--recipe", TINY, f"run.root={root}", *ARGS)
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "CUDA" not in proc.stderr, proc.stderr[-3000:]
    m = re.match(r"error: pretrain: non-finite (.*) at step (\d+) \(budget: full model\)", lines[0])
    assert m and ("loss = nan" in m.group(1) or "loss = inf" in m.group(1)), lines[0]
    bad = int(m.group(2))
    assert bad >= 2  # step 1 starts from the initial weights

    ckpts = os.path.join(root, "tiny", "pretrain", "checkpoints")
    assert open(os.path.join(ckpts, "latest_checkpointed_iteration.txt")).read().strip() == str(bad - 1)
    assert sorted(os.listdir(ckpts)) == [f"iter_{i:07d}" for i in range(1, bad)] + ["latest_checkpointed_iteration.txt"]
    logged = steps(root)
    assert [r["step"] for r in logged] == list(range(1, bad)) and all(math.isfinite(r["loss"]) for r in logged)

    # the kept checkpoint is whole: the same command resumes from it (model, optimizer, RNG) and finishes
    done = run_cli("pretrain", "--recipe", TINY, f"run.root={root}", *ARGS, f"training.train_iters={bad - 1}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {os.path.join(ckpts, f'iter_{bad - 1:07d}')} (iteration {bad - 1})" in done.stdout
    assert json.load(open(os.path.join(root, "tiny", "pretrain", "final.json")))["iteration"] == bad - 1
    assert [r["step"] for r in steps(root)] == list(range(1, bad))

    # resuming under another LR: megatron keys the optimizer state by it -> one line naming the way out
    rerun = run_cli("pretrain", "--recipe", TINY, f"run.root={root}", *ARGS, "training.lr=1e-3", "training.min_lr=1e-4")
    assert rerun.returncode == 2 and len(rerun.stderr.strip().splitlines()) == 1, rerun.stderr[-3000:]
    assert "training.init_from=" in rerun.stderr and "Traceback" not in rerun.stderr


def test_metrics_after_a_resume_continue_from_the_checkpoint(tmp_path):
    """A run killed after step 7 with its last checkpoint at 4: the resumed writer keeps steps 1..4 only."""
    w = MetricsWriter(str(tmp_path), tensorboard=False)
    for step in range(1, 8):
        w.write(step, {"loss": float(step)})
    w.jsonl.write('{"step": 8, "lo')  # torn by the kill
    w.close()
    w = MetricsWriter(str(tmp_path), tensorboard=False, resume_step=4)
    for step in range(5, 9):
        w.write(step, {"loss": 10.0 + step})
    w.close()
    with open(tmp_path / "logs" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [1.0, 2.0, 3.0, 4.0, 15.0, 16.0, 17.0, 18.0]


def test_the_message_names_the_budgets_at_fault():
    """Elastic stages log per-budget values as "<what>/<budget>": the line names the budgets whose values are
    non-finite, else the budgets the step trained; a single process needs no collective."""
    import pytest
    import torch

    from pipeline.errors import NonFiniteError
    from pipeline.training.finite import check_finite

    cpu = torch.device("cpu")
    check_finite({"loss": 1.0, "kd/full": 0.5}, 2.0, 7, "stage1", cpu)  # finite: nothing happens
    with pytest.raises(NonFiniteError, match=r"stage1: non-finite loss = nan, kd/small = nan at step 7 "
                                             r"\(budget: small\)") as e:
        check_finite({"loss": math.nan, "kd/full": 0.5, "kd/small": math.nan, "size/small": 0.4}, 3.0, 7, "stage1", cpu)
    assert e.value.exit_code == 3
    with pytest.raises(NonFiniteError, match=r"non-finite grad norm = inf at step 9 \(budget: full, medium\)"):
        check_finite({"loss": 2.0, "kd/full": 1.0, "kd/medium": 1.0}, math.inf, 9, "stage2", cpu)
