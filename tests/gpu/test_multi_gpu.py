"""2 GPUs, NCCL, one process per GPU, Transformer Engine backend: the model-parallel exactness checks of the CPU
gloo suite, run through the same workers (tests/elastic_worker.py, cp_worker.py, reshard_worker.py) on GPUs.

- masked == sliced at TP=2 with sequence parallelism, TP=2 with expert TP=2 (the grouped-expert mask shard rule)
  and EP=2, every axis alone and combined, plus the router's gradient through a hard choice (fp32, TF32 off);
- context parallel CP=2 with TE attention + Mamba + MoE: one pretrain step and one elastic step equal CP=1
  (bf16: TE's CP attention needs its flash / fused kernels, which have no fp32);
- a checkpoint saved at TP=2 loads at TP=1 and at EP=2 (weights, fp32), and a training run saved at TP=2
  resumes at EP=2 with its optimizer state (CLI, bf16, loss curve vs the resume at TP=2); at TP=1 megatron's
  optimizer state does not load (xfail, strict: it flags when that starts to work).
Run: ``bash tests/gpu/run_2gpu.sh`` on the 2-GPU machine (tests/gpu/RESULTS.md).
"""

import os
import shutil
import sys

import pytest
import torch

from conftest import ROOT, TINY
from dist_helpers import run_ranks
from elastic_worker import SUBNETS

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nvidia-h200-x2)")]

TE = ["model.backend=te"]
# fp32 with TF32 off (conftest): the masked TE model at TP/EP=2 vs the sliced TE model at TP=1 run the same
# arithmetic on other shapes / shards; tests/gpu/test_te_path.py measured 2e-6 on one GPU. A wrong shard or mask
# moves the logits by > 1e-2 (subnet_effect below).
TOL = 1e-4
ROUTER_TOL = 1e-3  # relative, the router gradient summed over ranks (CPU gloo: <= 1e-4 asserted, fp32)
LAYOUTS = ["tp2", "tp2etp2", "ep2"]


@pytest.fixture(scope="module", autouse=True)
def _needs_te():  # module scope: before the module-scoped runs below
    pytest.importorskip("transformer_engine", reason="the TE path needs transformer_engine (PYTHONPATH=/tmp/site-te)")


# ---- 1. masked == sliced at TP=2 (+SP), TP=2 x expert TP=2, EP=2


@pytest.fixture(scope="module")
def masked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("masked_2gpu")
    return run_ranks("elastic_worker:masked_vs_sliced", 2, tmp,
                     {"root": str(tmp / "runs"), "layouts": LAYOUTS, "extra": TE}, timeout=500)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_equals_sliced_on_two_gpus(masked, layout, record):
    for rank, r in enumerate(masked):
        record(f"TE {layout} rank {rank}: max |masked - sliced| per subnet",
               {"diffs": r[layout], "logit_scale": r["logit_scale"], "router_grad_rel": r["router_grad_diff"][layout]})
    assert masked[0]["subnet_effect"] > 1e-2  # every subnet moves the logits: the comparison is informative
    assert masked[0]["router_grad_norm"] > 1e-4
    for r in masked:  # TP: both ranks gather the full vocabulary; EP: both ranks run the same tokens
        assert set(r[layout]) == {"parent"} | set(SUBNETS)
        bad = {name: d for name, d in r[layout].items() if not d <= TOL}
        assert not bad, f"{layout}: masked != sliced for {bad}"
        assert r["router_grad_diff"][layout] <= ROUTER_TOL, r["router_grad_diff"]


# ---- 2. CP=2 (TE attention + Mamba + MoE) equals CP=1

CP_EXTRA = TE + ["model.pattern=M*ME", "model.num_layers=4"]
CP_LOSS_RTOL = 1e-2  # bf16 forward: the logged loss is a mean over 128 tokens of fp32 CE on bf16 logits
CP_GRAD_RTOL = 3e-2  # bf16: ||g_cp2 - g_cp1|| / ||g_cp1|| over all parameters (fp32 on CPU: 2e-5 per tensor)


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp_2gpu")
    root = str(tmp / "runs")
    ranks = run_ranks("cp_worker:cp2", 2, tmp, {"root": root, "extra": CP_EXTRA, "pp2": False}, timeout=500)
    (ref,) = run_ranks("cp_worker:cp1", 1, tmp, {"root": root, "extra": CP_EXTRA}, timeout=500)
    return ref, ranks


def _grad_gap(got, want):
    assert set(got) == set(want)
    names = sorted(want)
    diff = torch.cat([(got[n] - want[n]).flatten() for n in names]).norm()
    total = float(diff / torch.cat([want[n].flatten() for n in names]).norm())
    per = {n: float((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)) for n in names}
    return total, max(per.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("step", ["pretrain", "elastic"])
def test_cp2_with_te_attention_equals_cp1(cp_runs, step, record):
    ref, ranks = cp_runs
    assert ref["cp_size"] == 1 and all(r["cp_size"] == 2 for r in ranks)
    want = ref[step]
    zero = [n for n, g in want["grads"].items() if not g.abs().max() > 0]
    assert not zero, f"reference has parameters without gradient: {zero[:5]}"
    assert any("self_attention" in n for n in want["grads"]), "no attention layer in the CP check"
    for rank, r in enumerate(ranks):
        total, (worst_name, worst) = _grad_gap(r[step]["grads"], want["grads"])
        keys = [k for k in want["values"] if k in ("loss", "grad_norm") or k.startswith("kd/")]
        record(f"CP=2 vs CP=1 {step} rank {rank}", {
            "values_cp1": {k: want["values"][k] for k in keys}, "values_cp2": {k: r[step]["values"][k] for k in keys},
            "grad_rel_l2": total, "worst_tensor": worst_name, "worst_tensor_rel_l2": worst})
        for k in keys:
            assert r[step]["values"][k] == pytest.approx(want["values"][k], rel=CP_LOSS_RTOL), k
        assert total <= CP_GRAD_RTOL, f"{step}: gradients differ by {total:.1e} (relative L2)"


# ---- 4. a checkpoint saved at TP=2 loads at TP=1 and at EP=2 (weights), and a run resumes there (optimizer)

RESHARD_RTOL = 1e-4  # fp32, TF32 off: kernel arithmetic on other shards only (CPU gloo: 6e-7)


@pytest.fixture(scope="module")
def reshard(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard_2gpu")
    root = str(tmp / "ckpts")
    saved = run_ranks("reshard_worker:save_layouts", 2, tmp, {"root": root, "names": ["tp2"], "extra": TE})
    at_ep2 = run_ranks("reshard_worker:load_at", 2, tmp, {"root": root, "layout": "ep2", "names": ["tp2"],
                                                          "extra": TE})
    (at_tp1,) = run_ranks("reshard_worker:load_single", 1, tmp, {"root": root, "names": ["tp2"], "extra": TE})
    return saved, {"tp1": [at_tp1], "ep2": at_ep2}


def _rel(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("target", ["tp1", "ep2"])
def test_tp2_checkpoint_loads_at(reshard, target, record):
    saved, loaded = reshard
    want = saved[0]["tp2"]
    assert _rel(saved[1]["tp2"], want) == 0.0  # both TP ranks gathered the same logits
    for rank, got in enumerate(loaded[target]):
        rel, before = _rel(got["tp2"]["after"], want), _rel(got["tp2"]["before"], want)
        record(f"TP=2 checkpoint -> {target} rank {rank}", {"rel_logit_diff": rel, "before_load": before})
        assert before > 0.1, "the model matched before loading: the check is void"
        assert rel <= RESHARD_RTOL, f"TP=2 -> {target}: logits differ by {rel:.2e}"


RESUME_RTOL = 2e-2  # bf16 training, per step: resumed at another layout vs resumed at TP=2 (other kernels / shards)
TP2 = ["parallelism.tp=2", "parallelism.sequence_parallel=true"]


def _torchrun_cli(nproc, *args, timeout=400):
    import subprocess

    from conftest import cli_env

    cmd = [sys.executable, "-m", "pipeline", *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pipeline",
         *args]
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def _losses(stage_dir):
    from pipeline.training.metrics import read_metrics

    return {s: rec["loss"] for s, rec in read_metrics(stage_dir).items()}


RESUME_COMMON = ["--recipe", TINY, *TE, "training.seq_length=512", "training.lr_warmup_iters=0",
                 "training.lr_decay_style=constant", "logging.log_interval=5", "checkpointing.save_interval=10",
                 "logging.tensorboard=false"]
RESUME_AT = {"tp2": (2, TP2), "tp1": (1, []), "ep2": (2, ["parallelism.ep=2"])}


@pytest.fixture(scope="module")
def first_10_steps_at_tp2(tmp_path_factory):
    """10 steps at TP=2 (+SP), saved with the optimizer (constant LR: the schedule does not depend on
    train_iters); each test resumes a copy of this run directory to step 20 at another layout."""
    tmp = tmp_path_factory.mktemp("resume_2gpu")
    proc = _torchrun_cli(2, "pretrain", *RESUME_COMMON, f"run.root={tmp}/first", "training.train_iters=10", *TP2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def _resume(tmp, target):
    nproc, layout = RESUME_AT[target]
    root = os.path.join(tmp, target)
    if not os.path.isdir(root):
        shutil.copytree(os.path.join(tmp, "first"), root)
        proc = _torchrun_cli(nproc, "pretrain", *RESUME_COMMON, f"run.root={root}", "training.train_iters=20",
                             *layout)
        assert proc.returncode == 0, f"resume at {target}: " + proc.stderr[-4000:]
        assert "(iteration 10)" in proc.stdout + proc.stderr, "not resumed"
    return _losses(os.path.join(root, "tiny", "pretrain"))


def test_training_saved_at_tp2_resumes_at_ep2_with_its_optimizer(first_10_steps_at_tp2, record):
    """Steps 11-20 resumed at EP=2 follow the resume at TP=2 (CPU gloo smoke run, local backend: identical)."""
    want, got = _resume(first_10_steps_at_tp2, "tp2"), _resume(first_10_steps_at_tp2, "ep2")
    assert want[1] - want[11] > 20 * RESUME_RTOL * want[11], "the loss did not move: resuming is not checked"
    gaps = {s: abs(got[s] - want[s]) / want[s] for s in range(11, 21)}
    record("TP=2 run resumed at TP=2 / EP=2", {"tp2": {s: want[s] for s in (1, 10, 11, 15, 20)},
                                                "ep2": {s: got[s] for s in (11, 15, 20)},
                                                "worst_rel_gap": max(gaps.values())})
    assert max(gaps.values()) <= RESUME_RTOL, gaps


@pytest.mark.xfail(strict=True, reason="megatron builds a ChainedOptimizer (dense + expert groups) at TP=2 and one "
                   "optimizer at TP=1: the optimizer state does not load across (CPU gloo: 'Different dict keys "
                   "encountered in apply_factory_merges'); the weights do (test_tp2_checkpoint_loads_at[tp1])")
def test_training_saved_at_tp2_resumes_at_tp1_with_its_optimizer(first_10_steps_at_tp2, record):
    want, got = _resume(first_10_steps_at_tp2, "tp2"), _resume(first_10_steps_at_tp2, "tp1")
    gaps = {s: abs(got[s] - want[s]) / want[s] for s in range(11, 21)}
    record("TP=2 run resumed at TP=1", {"tp1": {s: got[s] for s in (11, 15, 20)}, "worst_rel_gap": max(gaps.values())})
    assert max(gaps.values()) <= RESUME_RTOL, gaps
