"""GPU, Transformer Engine backend (what cluster users run): fused norm + linear, TE attention, grouped-GEMM experts.

- masked == sliced on TE modules for every axis and combinations (the hidden mask folded into the fused norms'
  eps and output scale), a hard router choice exact and differentiable;
- a checkpoint written by the local backend (what import and importance write) loads into a TE model with every
  tensor accounted for and gives the local model's logits, and back;
- the tiny recipe's whole chain with TE: data -> pretrain -> importance -> stage1 -> stage2 -> export -> slice ->
  evaluate (CLI, as users run it).
Run: ``bash tests/gpu/run.sh tests/gpu/test_te_path.py`` with TE on PYTHONPATH (tests/gpu/RESULTS.md).
"""

import dataclasses
import json
import math
import os
import re

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("transformer_engine", reason="the TE path needs transformer_engine on the GPU machine")

from conftest import TINY, run_cli  # noqa: E402
from elastic_worker import REMOVAL_ORDER, SUBNETS, build_parent, recipe, subnet  # noqa: E402

# fp32 on both sides with TF32 off (tests/gpu/conftest.py); masked and sliced models run the same TE kernels on
# different widths, so they agree to fp32 rounding (measured 2e-6 relative on the logits, RESULTS.md); a wrong
# prefix, group or eps/scale fold moves the logits by > 1e-2 (asserted below for every subnet).
TOL = 1e-4
# TE (cuBLAS, cuDNN, fused RMSNorm) vs megatron's local layers (torch) on the same weights: kernel arithmetic
# only (measured 9e-7 relative with TF32 off); a tensor loaded into the wrong place moves the logits by O(1).
CROSS_TOL = 1e-4


def _perturb_norms(model) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=gen).to(p.device))


@pytest.fixture(scope="module")
def env():
    from pipeline import parallel
    from pipeline.elastic.masks.spec import build_elastic_model
    from pipeline.hf.memory import hf_state_from_model

    r = recipe(["model.backend=te", "elastic.axes.depth=[8, 5]"])
    dev = parallel.initialize(r)
    tok = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(3)).to(dev)
    pos = torch.arange(256, device=dev)[None].expand(2, -1)
    parent = build_parent(r)
    _perturb_norms(parent)
    elastic = build_elastic_model(r).eval()
    elastic.load_state_dict(parent.state_dict())  # strict: the elastic TE model has the parent's exact layout
    with torch.no_grad():
        parent_logits = parent(tok, pos, None)
    yield {"r": r, "dev": dev, "fwd": lambda model: model(tok, pos, None), "parent": parent, "elastic": elastic,
           "parent_logits": parent_logits, "hf": {k: v.cpu() for k, v in hf_state_from_model(parent, r.model).items()}}
    parallel.shutdown()


def test_the_te_layout_is_built(env):
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    layer = env["elastic"].decoder.layers[0]
    assert isinstance(layer.mixer.in_proj, TELayerNormColumnParallelLinear)
    assert type(layer.mixer.in_proj).__name__ == "ElasticTELayerNormColumnParallelLinear"
    experts = type(env["elastic"].decoder.layers[1].mlp.experts).__name__
    assert experts == "TEGroupedMLP", experts


@pytest.mark.parametrize("name", list(SUBNETS))
def test_masked_equals_sliced_on_te(env, name, record):
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.elastic.slicing import slice_state_dict
    from pipeline.hf.memory import load_hf_state
    from pipeline.model.build import build_model

    r, sub = env["r"], subnet(env["r"].model, name)
    small = sub.model_config(r.model)
    sliced = build_model(dataclasses.replace(r, model=small)).eval()
    load_hf_state(sliced, small, slice_state_dict(env["hf"], r.model, sub))
    masks = ElasticMasks(env["elastic"], r.model, r.elastic.axes, REMOVAL_ORDER)
    with torch.no_grad():
        want = env["fwd"](sliced)
        masks.set_subnet(sub)
        got = env["fwd"](env["elastic"])
        masks.clear()
        assert torch.equal(env["fwd"](env["elastic"]), env["parent_logits"])
    diff = (got - want).abs().max().item()
    record(f"TE masked vs sliced {name}", {"max_abs": diff, "logit_scale": want.abs().max().item()})
    assert (want - env["parent_logits"]).abs().max() > 1e-2 and diff <= TOL


def test_hard_router_choice_on_te(env):
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.elastic.router import ElasticRouter, kind_layers

    r, m = env["r"], env["r"].model
    masks = ElasticMasks(env["elastic"], m, r.elastic.axes, REMOVAL_ORDER)
    torch.manual_seed(0)
    router = ElasticRouter(r.elastic, m).to(env["dev"])
    choice = router(2, 1.0, 1.0, hard=True, generator=torch.Generator(device=env["dev"]).manual_seed(4))
    sub = choice.argmax_subnet(m, REMOVAL_ORDER)
    with torch.no_grad():
        masks.set_subnet(sub)
        want = env["fwd"](env["elastic"])
    masks.set_choice(choice)
    got = env["fwd"](env["elastic"])
    assert (got.detach() - want).abs().max() <= TOL
    (got - env["parent_logits"]).pow(2).mean().backward()
    kept = set(sub.kept_layers(m))
    for axis, net in router.mlps.items():
        if axis == "hidden" or kept & set(kind_layers(m, axis)):
            assert net[-1].weight.grad is not None and net[-1].weight.grad.abs().max() > 0, axis
    masks.clear()


def test_local_checkpoint_into_te_and_back(env, tmp_path, record):
    """The importance stage writes its checkpoint from megatron's local layers; stage 1 reads it into TE."""
    from pipeline.model.build import build_model
    from pipeline.training import checkpoint

    r_local = dataclasses.replace(env["r"], model=dataclasses.replace(env["r"].model, backend="local"))
    local = build_parent(r_local)
    _perturb_norms(local)
    with torch.no_grad():
        want = env["fwd"](local)
    checkpoint.save(str(tmp_path / "local"), 0, [local])
    te = build_model(env["r"]).eval()
    checkpoint.load(checkpoint.iter_dir(str(tmp_path / "local"), 0), [te], load_rng=False)  # strict accounting
    with torch.no_grad():
        got = env["fwd"](te)
    there = ((got - want).abs().max() / want.abs().max()).item()
    checkpoint.save(str(tmp_path / "te"), 0, [te])
    back = build_model(r_local).eval()
    checkpoint.load(checkpoint.iter_dir(str(tmp_path / "te"), 0), [back], load_rng=False)
    with torch.no_grad():
        again = env["fwd"](back)
    record("local -> TE -> local checkpoint, logits", {"te_vs_local_rel": there,
                                                       "back_vs_local_max_abs": (again - want).abs().max().item()})
    assert there <= CROSS_TOL
    assert torch.equal(again, want)  # the same local kernels on the same weights: bit for bit


def test_tiny_chain_with_te(tmp_path, record):
    """The whole pipeline on the tiny recipe with TE, bf16, as `make demo` runs it on CPU."""
    common = [f"run.root={tmp_path}", "model.backend=te", "training.seq_length=512", "logging.log_interval=10"]
    steps = ["training.train_iters=30", "training.lr_warmup_iters=0"]
    small = str(tmp_path / "small")
    chain = (("data", []), ("pretrain", ["training.data=blend"] + steps), ("importance", ["importance.data=blend"]),
             ("stage1", ["training.data=blend"] + steps), ("stage2", ["training.data=blend"] + steps),
             ("export", ["--overwrite"]), ("slice", ["--budget", "small", "--out", small, "--overwrite"]),
             ("evaluate", ["training.data=blend"]))
    logs = {}
    for stage, extra in chain:
        proc = run_cli(stage, "--recipe", TINY, *common, *extra)
        assert proc.returncode == 0, f"{stage}: " + proc.stderr[-4000:]
        logs[stage] = proc.stdout + proc.stderr  # log lines go through logging (stderr), results to stdout
        if stage in ("pretrain", "stage1", "stage2"):
            assert "cuda bf16 te" in logs[stage], logs[stage][-2000:]
    with open(os.path.join(tmp_path, "tiny", "evaluate", "stage2.json")) as f:
        result = json.load(f)
    done = re.compile(r"step (\d+)/\1 ")  # the last step's line (a stage section may set its own train_iters)
    last = {s: [line for line in logs[s].splitlines() if done.search(line)][-1] for s in ("pretrain", "stage1", "stage2")}
    record("tiny chain with TE", {"last_lines": last, "parent": result["parent"],
                                  "budgets": [{k: b[k] for k in ("name", "trained", "untrained")}
                                              for b in result["budgets"]]})
    assert os.path.isfile(os.path.join(small, "config.json"))
    for row in result["budgets"]:
        assert math.isfinite(row["trained"]) and math.isfinite(row["untrained"]), row
