"""The elastic stages end to end on CPU: pretrain -> importance -> stage1 -> stage2 -> evaluate, as users run them.

The router reaches every budget (the resolved subnets' active parameters within the dead zone), trained
budgets beat the same subnets of the untrained parent, logs carry each budget, a killed stage 1 resumes to the
same curve, and TP=2 / PP=2 runs (gloo) follow the single-rank run step by step.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, TINY, cli_env, run_cli
from test_pretrain import wait_for_checkpoint

PARENT = ["training.train_iters=12", "training.seq_length=64", "importance.data=synthetic", "importance.samples=16",
          "importance.seq_length=64"]
SHORT = ["stage1.training.train_iters=4", "stage1.training.lr_warmup_iters=1", "stage1.training.seq_length=64",
         "checkpointing.save_interval=2",
         "checkpointing.keep_last=0", "logging.log_interval=1"]


def metrics(root, stage):
    out = {}
    with open(os.path.join(root, "tiny", stage, "logs", "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec
    return out


def budgets(root, stage):
    with open(os.path.join(root, "tiny", stage, "elastic_budgets.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A pretrained, scored and permuted parent (pretrain + importance), copied by the tests that train."""
    root = str(tmp_path_factory.mktemp("parent"))
    for stage in ("pretrain", "importance"):
        run_cli(stage, "--recipe", TINY, f"run.root={root}", *PARENT, check=True)
    return root


def fresh_root(parent_root, tmp_path):
    root = str(tmp_path / "run")
    for stage in ("pretrain", "importance"):
        shutil.copytree(os.path.join(parent_root, "tiny", stage), os.path.join(root, "tiny", stage))
    return root


@pytest.fixture(scope="module")
def elastic(parent, tmp_path_factory):
    """stage1 and stage2 as the tiny recipe has them, then evaluate."""
    root = fresh_root(parent, tmp_path_factory.mktemp("elastic"))
    out = {}
    for stage in ("stage1", "stage2", "evaluate"):  # stage 1 also validates every budget every 30 steps
        proc = run_cli(stage, "--recipe", TINY, f"run.root={root}", *PARENT, "stage1.training.eval_interval=30",
                       check=True)
        out[stage] = proc.stdout
    return root, out


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_router_reaches_every_budget(elastic, stage):
    root, _ = elastic
    data = budgets(root, stage)
    for row in data["budgets"]:
        assert abs(row["active_fraction"] / row["fraction"] - 1) <= 0.05, row
    full = next(r for r in data["budgets"] if r["fraction"] == 1.0)
    assert full["active_params"] == data["full_active_params"] and full["subnet"]["skip_layers"] == []
    sizes = {r["name"]: r["active_params"] for r in data["budgets"]}
    assert sizes["full"] > sizes["medium"] > sizes["small"]


def test_logs_name_each_budget(elastic):
    root, out = elastic
    last = next(line for line in out["stage1"].splitlines() if line.startswith("[stage1] step 60/60"))
    for field in ("kd", "size", "tau", "tok/s/gpu", "grad norm"):
        assert field in last
    keys = set().union(*(rec.keys() for rec in metrics(root, "stage1").values()))
    for name in ("full", "medium", "small"):
        assert {f"kd/{name}", f"budget_loss/{name}", f"size/{name}", f"choice/{name}/hidden"} <= keys
        assert f"[stage1] budget {name}: active" in out["stage1"]
    # training.eval_interval: every budget's validation loss at steps 30 and 60, in the log and metrics.jsonl
    recs = metrics(root, "stage1")
    for step in (30, 60):
        for name in ("full", "medium", "small"):
            assert 0 < recs[step][f"val_loss/{name}"] < 20
        assert recs[step]["val_loss/full"] < recs[step]["val_loss/small"]
    assert not any(k.startswith("val_loss/") for k in recs[29])
    assert "[stage1] validation | val_loss/full" in out["stage1"]
    # stage 2 samples full : medium : small = 0.5 : 0.3 : 0.2 (80 draws: loose bounds, exact draws tested
    # in test_elastic_router)
    counts = {n: sum(f"kd/{n}" in rec for rec in metrics(root, "stage2").values()) for n in ("full", "small")}
    assert counts["full"] > counts["small"]


def test_trained_budgets_beat_untrained_slices(elastic):
    root, out = elastic
    with open(os.path.join(root, "tiny", "evaluate", "stage2.json")) as f:
        result = json.load(f)
    rows = {r["name"]: r for r in result["budgets"]}
    assert rows["full"]["untrained"] == pytest.approx(result["parent"], abs=1e-6)  # the full subnet is the parent
    for name in ("medium", "small"):
        assert rows[name]["trained"] < rows[name]["untrained"] - 0.1, rows[name]
    assert "validation LM loss" in out["evaluate"] and "untrained" in out["evaluate"]


def test_killed_stage1_resumes_to_the_same_curve(parent, tmp_path):
    straight = fresh_root(parent, tmp_path / "a")
    run_cli("stage1", "--recipe", TINY, f"run.root={straight}", *PARENT, *SHORT, check=True)
    root = fresh_root(parent, tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "stage1", "--recipe", TINY, f"run.root={root}",
                             *PARENT, *SHORT], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(root, 2, proc, stage="stage1")
    proc.kill()
    proc.wait()
    rerun = run_cli("stage1", "--recipe", TINY, f"run.root={root}", *PARENT, *SHORT, check=True)
    assert "resumed from" in rerun.stdout
    a, b = metrics(straight, "stage1"), metrics(root, "stage1")
    drop = ("tokens_per_s_per_gpu", "tflops_per_gpu", "mem_gib", "mfu")  # timings
    assert {s: {k: v for k, v in r.items() if k not in drop} for s, r in a.items()} == \
        {s: {k: v for k, v in r.items() if k not in drop} for s, r in b.items()}
    assert budgets(straight, "stage1")["budgets"] == budgets(root, "stage1")["budgets"]


@pytest.mark.parametrize("layout", [["parallelism.tp=2"], ["parallelism.pp=2"]], ids=["tp2", "pp2"])
def test_parallel_stage1_follows_the_single_rank_run(parent, tmp_path, layout):
    """Same budgets, noise and init on every layout: the losses per step (and so the router's updates,
    summed over TP / PP ranks) agree with one rank."""
    args = [*PARENT, *SHORT, "stage1.training.train_iters=3"]
    one = fresh_root(parent, tmp_path / "one")
    run_cli("stage1", "--recipe", TINY, f"run.root={one}", *args, check=True)
    two = fresh_root(parent, tmp_path / "two")
    env = {k: v for k, v in cli_env().items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "pipeline", "stage1", "--recipe", TINY, f"run.root={two}", *args, *layout],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = metrics(one, "stage1"), metrics(two, "stage1")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key, value in a[step].items():
            if key.startswith(("loss", "grad_norm", "kd/", "budget_loss/", "size/", "choice/")):
                assert b[step][key] == pytest.approx(value, rel=2e-4, abs=1e-6), (step, key)


def bf16_first_step(root):
    """(max |change| of any non-router parameter in the first bf16 step, the step's learning rate)."""
    from pipeline.config.load import load_recipe
    from pipeline.elastic.task import ElasticTask
    from megatron.core.utils import unwrap_model
    from pipeline.training.loop import Trainer

    r = load_recipe(TINY, [f"run.root={root}", *PARENT, "stage1.training.precision=bf16",
                           "stage1.training.lr_warmup_iters=0"])
    trainer = Trainer(r, "stage1", ElasticTask(r, "stage1"))
    trainer.setup()
    model = unwrap_model(trainer.model[0])
    before = {k: v.detach().float().clone() for k, v in model.named_parameters() if "elastic_router" not in k}
    trainer.step()
    return max(float((v.detach().float() - before[k]).abs().max()) for k, v in model.named_parameters()
               if k in before), r.stage1.training.lr


def test_bf16_init_from_keeps_the_loaded_weights(parent, tmp_path):
    """The fp32 master weights of a bf16 run follow training.init_from (not the random init): the first step
    moves every weight by about one LR step, not back to the init (regression: dt_bias jumped by 3.4)."""
    from dist_helpers import run_ranks

    root = fresh_root(parent, tmp_path)
    change, lr = run_ranks("test_elastic_stages:bf16_first_step", 1, tmp_path, {"root": root})[0]
    assert change < 20 * lr, change  # Adam's first step is ~lr per weight; bf16 rounding adds an ulp
