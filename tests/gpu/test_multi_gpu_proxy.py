"""2 GPUs, NCCL: stage 1 of recipes/proxy_1b.yaml (TE, bf16, seq 4096, 32K tokens per step) at TP=2 (+SP) and at
EP=2 for 50 steps next to the 1-GPU run, through the CLI as users run it (``torchrun --nproc-per-node 2``).

One parent for all three: pretrain (1 GPU, PRETRAIN_ITERS steps) -> importance (1 GPU); each stage-1 run starts
from that importance checkpoint (student and teacher, by path) under its own run name. Read from each run's
metrics.jsonl and elastic_budgets.json:
- the per-budget KD curve: each budget's mean KD over steps 1-10 and 41-50 (the steps that drew it) within
  KD_RTOL[layout] of the 1-GPU run's (+ KD_ATOL_FRAC of the smallest budget's early KD, for the full budget whose
  KD starts at ~0: the student starts as the teacher). TP=2 draws the same budgets on the same micro-batches as
  1 GPU (bf16 and reduction order differ). Under EP=2 the two data-parallel ranks hold one micro-batch each and
  both draw micro-batch 0's budget (ElasticTask._draw keys draws by the local micro-batch, and an EP group must
  share its budget: an expert's masks act on every rank's tokens), so EP=2 makes half the 1-GPU run's budget
  draws per step: its windows compare curves, not steps, at a wider tolerance (CPU smoke run of the same
  commands on the tiny recipe: TP=2 matched 1 rank to 2e-6 relative, EP=2 did not follow step by step);
- the resolved budgets: TP=2 the same router argmax subnet per budget; EP=2 (another router trajectory, see
  above) each budget's active fraction within the recipe's dead zone (5%) of the 1-GPU run's;
- tokens/s per GPU (median of the log steps 20-50) and the scaling efficiency = 2-GPU / 1-GPU tokens/s per GPU
  (recorded; asserted only above SCALING_FLOOR, a sanity floor against a run that fell back to one device).
Run: ``bash tests/gpu/run_2gpu.sh proxy`` (tests/gpu/RESULTS.md).
"""

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cli_env

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (nvidia-h200-x2)")]

PROXY = os.path.join(ROOT, "recipes", "proxy_1b.yaml")
PRETRAIN_ITERS, STEPS = 20, 50  # pretrain: past the recipe's 10 warmup steps
LAYOUTS = {"gpu1": (1, []), "tp2": (2, ["parallelism.tp=2", "parallelism.sequence_parallel=true"]),
           "ep2": (2, ["parallelism.ep=2"])}
WINDOWS = {"early": range(1, 11), "late": range(41, 51)}
KD_RTOL, KD_ATOL_FRAC = {"tp2": 0.05, "ep2": 0.25}, 0.05
FRACTION_ATOL = 0.05  # recipes/proxy_1b.yaml elastic.dead_zone
SCALING_FLOOR = 0.3


def cli(nproc: int, *args, timeout: int = 540):
    launch = [sys.executable, "-m", "pipeline"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pipeline"]
    proc = subprocess.run(launch + list(args), cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args[:1]} on {nproc}: " + proc.stderr[-4000:]
    return proc


def stage1_runs(root: str, recipe: str, layouts=LAYOUTS, extra=(), steps: int = STEPS,
                pretrain_iters: int = PRETRAIN_ITERS):
    """pretrain -> importance on one rank, then stage 1 at each layout from the importance checkpoint; returns
    {layout: stage-1 directory}. Recipe-agnostic (tiny on CPU gloo runs the same commands). A stage that finished
    in ``root`` before (its final.json / importance.json) is not run again: a run cut by the device's time limit
    continues where it stopped when called again with the same root."""
    name = os.path.splitext(os.path.basename(recipe))[0]
    common = ["--recipe", recipe, f"run.root={root}", "logging.tensorboard=false", *extra]
    done = lambda run, stage, marker="final.json": os.path.isfile(os.path.join(root, run, stage, marker))  # noqa
    if not done(name, "pretrain"):
        cli(1, "pretrain", *common, f"run.name={name}", f"training.train_iters={pretrain_iters}")
    if not done(name, "importance", "importance.json"):
        cli(1, "importance", *common, f"run.name={name}")
    parent = os.path.join(root, name, "importance", "checkpoints")
    out = {}
    for layout, (nproc, overrides) in layouts.items():
        if done(f"{name}_{layout}", "stage1"):
            out[layout] = os.path.join(root, f"{name}_{layout}", "stage1")
            continue
        cli(nproc, "stage1", *common, f"run.name={name}_{layout}", f"stage1.teacher={parent}",
            f"stage1.training.init_from={parent}", f"stage1.training.train_iters={steps}", "logging.log_interval=10",
            *overrides)
        out[layout] = os.path.join(root, f"{name}_{layout}", "stage1")
    return out


def figures(stage_dir: str) -> dict:
    """Per-budget KD window means, resolved subnets, tokens/s per GPU of one stage-1 run."""
    from pipeline.training.metrics import read_metrics

    recs = read_metrics(stage_dir)
    with open(os.path.join(stage_dir, "elastic_budgets.json")) as f:
        resolved = json.load(f)["budgets"]
    names = [row["name"] for row in resolved]
    kd = {}
    for n in names:
        kd[n] = {}
        for w, steps in WINDOWS.items():
            vals = [recs[s][f"kd/{n}"] for s in steps if s in recs and f"kd/{n}" in recs[s]]
            kd[n][w] = statistics.fmean(vals) if vals else None
    speed = [recs[s]["tokens_per_s_per_gpu"] for s in sorted(recs) if s >= 20 and "tokens_per_s_per_gpu" in recs[s]]
    return {"kd": kd, "subnets": {row["name"]: row["subnet"] for row in resolved},
            "active_fraction": {row["name"]: row["active_fraction"] for row in resolved},
            "tokens_per_s_per_gpu": statistics.median(speed) if speed else None, "last_step": max(recs)}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    pytest.importorskip("transformer_engine", reason="the proxy runs on TE (PYTHONPATH=/tmp/site-te)")
    # run_2gpu.sh keeps the runs in /tmp/proxy_2gpu on the device (a second call continues a cut one)
    root = os.environ.get("MULTI_GPU_PROXY_ROOT") or str(tmp_path_factory.mktemp("proxy_2gpu"))
    return {layout: figures(d) for layout, d in stage1_runs(root, PROXY, extra=["model.backend=te"]).items()}


@pytest.mark.parametrize("layout", ["tp2", "ep2"])
def test_proxy_stage1_on_two_gpus_follows_one_gpu(proxy, layout, record):
    one, two = proxy["gpu1"], proxy[layout]
    efficiency = two["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
    record(f"proxy_1b stage1 {STEPS} steps: 1 GPU vs {layout}", {
        "kd_1gpu": one["kd"], f"kd_{layout}": two["kd"], "active_fraction_1gpu": one["active_fraction"],
        f"active_fraction_{layout}": two["active_fraction"], "tok_s_gpu_1gpu": one["tokens_per_s_per_gpu"],
        f"tok_s_gpu_{layout}": two["tokens_per_s_per_gpu"], "scaling_efficiency": efficiency,
        "same_subnets": one["subnets"] == two["subnets"]})
    assert one["last_step"] == two["last_step"] == STEPS
    rtol, small = KD_RTOL[layout], one["kd"][min(one["kd"], key=lambda n: one["active_fraction"][n])]
    atol = KD_ATOL_FRAC * small["early"]
    assert small["early"] - small["late"] > rtol * small["early"], \
        "the smallest budget's KD did not fall: the curve comparison is not informative"
    for name, windows in one["kd"].items():
        for w, want in windows.items():
            got = two["kd"][name][w]
            assert want is not None and got is not None, f"{name} not drawn in the {w} window"
            assert abs(got - want) <= rtol * abs(want) + atol, f"{layout} {name} {w}: KD {got:.4f} vs {want:.4f}"
    if layout == "tp2":
        assert two["subnets"] == one["subnets"], "the resolved budgets differ"
    for name, want in one["active_fraction"].items():
        assert abs(two["active_fraction"][name] - want) <= FRACTION_ATOL, f"{name}: resolved budgets differ"
    assert efficiency >= SCALING_FLOOR, f"{layout}: scaling efficiency {efficiency:.2f}"
