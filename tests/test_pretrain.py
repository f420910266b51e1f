"""pretrain on CPU: loss falls; killed (SIGKILL) or preempted (SIGTERM) runs resume to the exact same curve."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, cli_env, run_cli

ITERS = 16
ARGS = [f"training.train_iters={ITERS}", "checkpointing.save_interval=4", "logging.log_interval=4",
        "training.seq_length=64", "checkpointing.keep_last=0"]


def losses(root):
    out = {}
    with open(os.path.join(root, "tiny", "pretrain", "logs", "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]  # a resumed run rewrites the steps after its checkpoint
    return out


def start(root):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "pretrain", "--recipe", TINY, f"run.root={root}", *ARGS],
                            cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(root, iteration, proc, timeout=300, stage="pretrain"):
    marker = os.path.join(root, "tiny", stage, "checkpoints", "latest_checkpointed_iteration.txt")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(marker) and int(open(marker).read()) >= iteration:
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint {iteration} after {timeout}s")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("straight"))
    proc = run_cli("pretrain", "--recipe", TINY, f"run.root={root}", *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc.stdout


def test_loss_falls_and_logs(straight):
    root, stdout = straight
    curve = losses(root)
    assert sorted(curve) == list(range(1, ITERS + 1))
    assert curve[ITERS] < curve[1] - 1.0, curve  # ln(512) = 6.24 at init; the synthetic chain is learnable
    line = next(l for l in stdout.splitlines() if l.startswith(f"[pretrain] step {ITERS}/{ITERS}"))
    for field in ("loss", "grad norm", "lr", "tok/s/gpu", "mem GiB", "eta"):
        assert field in line
    assert "| cpu fp32 local mamba-torch |" in stdout  # the header names the kernels the run uses
    stage = os.path.join(root, "tiny", "pretrain")
    assert json.load(open(os.path.join(stage, "final.json")))["iteration"] == ITERS
    assert os.listdir(os.path.join(stage, "tb")), "no TensorBoard events"
    assert os.path.isfile(os.path.join(stage, "config.yaml"))


def test_killed_run_resumes_to_the_same_curve(straight, tmp_path):
    root = str(tmp_path)
    proc = start(root)
    wait_for_checkpoint(root, 8, proc)
    proc.kill()
    proc.wait()
    rerun = run_cli("pretrain", "--recipe", TINY, f"run.root={root}", *ARGS)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stdout
    assert losses(root) == losses(straight[0])  # exactly, step by step


def test_sigterm_saves_exits_zero_and_resumes(straight, tmp_path):
    root = str(tmp_path)
    proc = start(root)
    wait_for_checkpoint(root, 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted: saved iter" in out
    saved = int(out.split("preempted: saved iter ")[1].split()[0])
    assert 4 <= saved < ITERS
    rerun = run_cli("pretrain", "--recipe", TINY, f"run.root={root}", *ARGS)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"(iteration {saved})" in rerun.stdout
    assert losses(root) == losses(straight[0])
