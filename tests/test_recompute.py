"""Activation recompute (``parallelism.recompute``) changes memory, not numbers: one elastic step (router, hard
masks of two sampled budgets, KD from a frozen teacher, budget loss) under full and selective recompute equals
the step without, loss and every gradient, router included (tests/cp_worker.py).

The elastic masks are why this needs a test: they are read at forward time and carry the router's gradient
(pipeline/elastic/masks/recompute.py). In one process: the tiny layer kinds (Mamba, attention, MoE; local
backend), full and selective (core_attn, moe, mamba). On 2 ranks at PP=2 (1F1B: micro-batch 0's backward, and its
recompute, runs after micro-batch 1 set its masks): full recompute vs none on each stage (in
test_context_parallel's 2-rank job).
"""

import pytest

import cp_worker
from test_context_parallel import runs, worst  # noqa: F401  (the 2-rank job's fixture)

TOL = 2e-5
MODES = ["full", "selective:core_attn,moe,mamba"]


def compare(got, want):
    assert want["values"]["loss"] > 0
    assert got["values"]["loss"] == pytest.approx(want["values"]["loss"], rel=1e-6)
    assert got["values"]["grad_norm"] == pytest.approx(want["values"]["grad_norm"], rel=1e-5)
    rel, name = worst(got["grads"], want["grads"])
    assert rel <= TOL, f"gradient of {name} differs by {rel:.1e} (relative)"
    router = [n for n in want["grads"] if "elastic_router" in n]
    assert router and all(want["grads"][n].abs().max() > 0 for n in router)


def test_recompute_keeps_the_elastic_step(tmp_path):
    root = str(tmp_path)
    extra = ["model.pattern=ME*E", "model.num_layers=4"]
    cp_worker.write_initial_checkpoints(root, extra)
    out = cp_worker.recompute_steps(root, ["none"] + MODES, extra)
    assert set(out["none"]["values"]) >= {"kd/full", "kd/small"}  # both budgets drawn: two mask sets
    for mode in MODES:
        compare(out[mode], out["none"])


@pytest.mark.slow
def test_recompute_under_pipeline_parallelism_reapplies_each_micro_batchs_masks(runs):  # noqa: F811
    _, ranks = runs
    last = [r for r in ranks if "loss" in r["pp2_recompute"]["none"]["values"]]  # the last stage logs the loss
    assert len(last) == 1 and set(last[0]["pp2_recompute"]["none"]["values"]) >= {"kd/full", "kd/small"}
    for r in ranks:
        got, want = r["pp2_recompute"]["full"], r["pp2_recompute"]["none"]
        rel, name = worst(got["grads"], want["grads"])
        assert rel <= TOL, f"PP=2: gradient of {name} differs by {rel:.1e} (relative)"
    compare(last[0]["pp2_recompute"]["full"], last[0]["pp2_recompute"]["none"])
