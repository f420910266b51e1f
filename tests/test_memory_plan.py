"""The memory plan (pipeline/model/memory_plan.py): its terms against what this machine can measure, and the
shipped Nano layout's verdict. GPU peaks vs the plan: bench/bench_memory_plan.py (docs/memory_plan.md).

- weights: the plan's parameters on a rank == the built model's parameter count;
- activations (CPU, fp32, megatron's local layers): the bytes autograd saves for the backward per token of an
  MoE layer and of an attention layer (measured with saved-tensor hooks, two depths subtracted so the embedding
  and head cancel) within 10% of the plan's. Mamba is not compared here: the CPU path runs a pure-PyTorch SSD
  scan that keeps more than mamba-ssm's Triton kernel the plan models (GPU: the bench);
- layout arithmetic: recompute, CP, the distributed optimizer and EP shrink the terms they should;
- the Nano recipe's stage-2 layout fits an 80 GiB H100, the same stage at cp 1 without recompute does not.
"""

import dataclasses
import json
import os
import sys

import pytest
import torch

from conftest import NANO, ROOT, TINY
from pipeline import parallel
from pipeline.config import load_recipe
from pipeline.config.load import for_stage
from pipeline.model.build import build_model
from pipeline.model.memory_plan import GIB, layer_activation_bytes, plan

SEQ = 128


def saved_bytes_per_token(pattern: str) -> float:
    """Bytes of the tensors autograd saves (parameters excluded), per token, of a model with ``pattern``."""
    r = load_recipe(TINY, [f"model.pattern={pattern}", f"model.num_layers={len(pattern)}", "model.backend=local",
                           f"training.seq_length={SEQ}"])
    parallel.initialize(r)
    torch.manual_seed(0)
    model = build_model(r).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    tokens = torch.randint(0, 512, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(SEQ).unsqueeze(0).expand(2, SEQ), None)
    return sum(storages.values()) / tokens.numel()


@pytest.mark.parametrize("sym", ["E", "*"])
def test_layer_activations_match_saved_tensors(sym):
    measured = saved_bytes_per_token(sym * 2) - saved_bytes_per_token(sym)
    r = load_recipe(TINY, ["model.backend=local"])
    planned = layer_activation_bytes(sym, r, r.parallelism, SEQ, te=False, recompute="none", modules=[],
                                     elastic=False, a=4.0)
    print(f"{sym}: measured {measured:.0f} B/token, plan {planned:.0f}")
    assert abs(planned / measured - 1) <= 0.10


def test_weights_are_this_ranks_parameters():
    r = load_recipe(TINY)
    parallel.initialize(r)
    n = sum(p.numel() for p in build_model(r).parameters())
    assert plan(r, "pretrain", gpus=1).term("weights") == 2 * n  # bf16


def _with(r, stage, **kw):
    st = getattr(r, stage)
    return dataclasses.replace(r, **{stage: dataclasses.replace(st, parallelism=dataclasses.replace(
        st.parallelism, **kw))})


def test_layout_terms_shrink_as_they_should():
    r = load_recipe(NANO)
    base = plan(_with(r, "stage1", recompute="none"), "stage1", gpus=32)
    acts = lambda mp: mp.term("activations")  # noqa: E731
    full = plan(_with(r, "stage1", recompute="full"), "stage1", gpus=32)
    sel = plan(_with(r, "stage1", recompute="selective", recompute_modules=["moe"]), "stage1", gpus=32)
    assert acts(full) < acts(sel) < acts(base)
    none = plan(_with(r, "stage1", recompute="none", ep=16), "stage1", gpus=32)
    cp2 = plan(_with(r, "stage1", recompute="none", ep=16, cp=2), "stage1", gpus=32)
    assert cp2.term("activations moe") == pytest.approx(none.term("activations moe") / 2)
    assert cp2.term("kd logits") < none.term("kd logits")
    nodist = plan(_with(r, "stage1", recompute="none", ep=16, distributed_optimizer=False), "stage1", gpus=32)
    assert nodist.term("optimizer") > 2 * none.term("optimizer")  # experts: sharded over 2 ranks only
    ep8 = plan(_with(r, "stage1", recompute="none", ep=8), "stage1", gpus=32)
    assert ep8.term("weights") > none.term("weights")
    assert base.term("teacher") == base.term("weights") and not plan(r, "pretrain", gpus=32).term("teacher")


def test_nano_stage2_layout_fits_an_h100():
    r = load_recipe(NANO)
    shipped = plan(r, "stage2", gpu_gib=80)
    p = for_stage(r, "stage2").parallelism
    assert (shipped.gpus, p.tp, p.cp, p.ep) == (32, 2, 4, 16)
    assert shipped.fits and shipped.total < 72 * GIB
    naive = plan(_with(r, "stage2", cp=1, ep=8, recompute="none"), "stage2", gpu_gib=80)
    assert not naive.fits and naive.total > 2 * shipped.total


def test_plan_cli_and_dry_run(cli):
    proc = cli("plan", "--recipe", NANO, "--stage", "stage2")
    assert proc.returncode == 0, proc.stderr
    assert "memory plan, stage2: 32 GPUs = tp 2 x pp 1 x cp 4" in proc.stdout and "fits a 80 GiB GPU" in proc.stdout
    proc = cli("stage1", "--recipe", NANO, "--dry-run")
    assert proc.returncode == 0 and "memory plan, stage1" in proc.stdout
    proc = cli("plan", "--recipe", NANO, "--stage", "importance")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: plan --stage 'importance'")


def test_the_plan_stays_within_10_percent_of_the_h200_peaks():
    """The peaks measured on the H200 (tests/golden/memory_plan_h200.json: proxy_1b, pretrain and stage 1, seq 4096
    and 64K, with and without full recompute) against this code's plan: a change to the plan that breaks the
    issue's 10% shows here, without a GPU. The loss phase (logits) and the layer phase (a recomputed layer, MoE
    dispatch) count once: summing them overstated stage 1 at 64K with recompute by 13%."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_memory_plan import replan

    with open(os.path.join(ROOT, "tests", "golden", "memory_plan_h200.json")) as f:
        rows = replan(os.path.join(ROOT, "recipes", "proxy_1b.yaml"), json.load(f)["rows"])
    assert len(rows) == 8
    ratios = {(r["stage"], r["seq"], r["recompute"]): r["measured"] / r["plan"] for r in rows}
    assert all(0.9 <= v <= 1.1 for v in ratios.values()), ratios
    full64 = [r for r in rows if r["seq"] == 65536 and r["recompute"] == "full" and r["stage"] == "stage1"][0]
    summed = sum(b for _, b in full64["terms"])
    assert full64["plan"] < summed and full64["measured"] / summed < 0.9  # what the sum of every term said


def test_phases_count_once():
    r = load_recipe(NANO)
    mp = plan(r, "stage2", gpu_gib=80)
    names = [n for n, _, _ in mp.lines]
    assert {"kd logits", "activations recompute", "moe dispatch"} <= set(names)
    loss = mp.term("kd logits")
    layer = mp.term("activations recompute") + mp.term("moe dispatch")
    stored = sum(b for n, b, _ in mp.lines if n not in ("kd logits", "activations recompute", "moe dispatch"))
    assert mp.total == pytest.approx(stored + max(loss, layer))
