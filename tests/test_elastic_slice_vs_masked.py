"""Zero-shot slicing through the export path equals the masked elastic model (fp32, CPU, one process).

The parent: the tiny recipe's model with a dense MLP layer added (pattern ``MEM*E-M*E``, so every width axis
has layers), built with ``build_elastic_model`` from a fixed seed, every 1-D parameter perturbed (norms, A_log, D,
dt_bias, conv bias: a mis-sliced vector changes the logits) and negative expert biases (a masked expert must
never be routed to). It is saved as a stage checkpoint with its ``elastic_budgets.json`` and written by
``export_elastic`` as the elastic checkpoint directory. Each budget reduces every axis at once and drops layers
by a removal order (a Mamba, an attention and an MoE layer). Per budget, on the same tokens:

  (a) the live elastic model under ``ElasticMasks.set_subnet(budget)`` -- and under ``set_choice`` of the hard
      one-hot router choice whose argmax (depth through ``REMOVAL_ORDER``) is that budget, bit for bit;
  (b) ``slice_to_hf`` of the elastic directory, loaded in transformers' ``NemotronHForCausalLM``;
  (c) ``slice_to_megatron`` of the elastic directory, loaded into a megatron model of the budget's size.

max |(a) - (b)| and max |(a) - (c)| <= 1e-5. The exported config sets ``time_step_min = 1e-8``: transformers'
PyTorch Mamba path clamps dt at ``time_step_min`` where megatron, vLLM and the CUDA kernels do not
(docs/hf_interop.md), so the comparison stays one of slicing whatever dt a seed gives (this parent's dt stays
above transformers' default 1e-3: the figures are the same without it).
"""

import dataclasses
import json
import os

import pytest
import torch

from conftest import TINY

PATTERN = "MEM*E-M*E"
# layers 6 (M), 3 (*), 1 (E), 8 (E) go first: medium keeps 7 layers, small 6 (the dense MLP stays)
REMOVAL_ORDER = [6, 3, 1, 8]
AXES = {"hidden": [128, 96, 64], "attention_heads": [4, 2], "mamba_heads": [8, 4], "ffn": [256, 128],
        "moe_ffn": [64, 48, 32], "shared_expert_ffn": [128, 96, 64], "experts": [8, 6, 4], "depth": [9, 7, 6]}
# budget -> choice index per axis (the last choice where an axis has fewer), and the subnet it must resolve to
BUDGETS = {
    "medium": (1, {"hidden": 96, "attention_heads": 2, "mamba_heads": 4, "ffn": 128, "moe_ffn": 48,
                   "shared_expert_ffn": 96, "experts": 6, "skip_layers": [3, 6]}),
    "small": (2, {"hidden": 64, "attention_heads": 2, "mamba_heads": 4, "ffn": 128, "moe_ffn": 32,
                  "shared_expert_ffn": 64, "experts": 4, "skip_layers": [1, 3, 6]}),
}
TOL = 1e-5
HF_BASE_CONFIG = {"time_step_min": 1e-8}


def recipe_at(root: str):
    from pipeline.config import load_recipe

    axes = [f"elastic.axes.{a}=[{', '.join(map(str, c))}]" for a, c in AXES.items()]
    return load_recipe(TINY, [f"run.root={root}", "run.device=cpu", "training.seq_length=40",
                              f"model.pattern={PATTERN}", f"model.num_layers={len(PATTERN)}", *axes])


def hard_choice(j: int):
    """The router's hard choice that picks choice j of every axis (one-hot probabilities)."""
    from pipeline.elastic.router import AxisChoice, Choice

    axes = {}
    for axis, sizes in AXES.items():
        probs = torch.zeros(len(sizes))
        probs[min(j, len(sizes) - 1)] = 1.0
        axes[axis] = AxisChoice(sizes, probs)
    return Choice(axes, hard=True)


def perturbed_parent(r):
    """Seeded elastic parent: 1-D parameters moved off their init, expert biases in [-1, -0.5)."""
    from elastic_worker import build_parent

    model = build_parent(r, elastic=True)
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def forward(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens), None)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The parent as a stage-2 checkpoint + elastic_budgets.json, exported to the elastic directory."""
    from pipeline import parallel
    from pipeline.elastic.elastic_dir import export_elastic, read_elastic
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.elastic.subnet import BUDGETS_FILE, ResolvedBudget, budgets_to_json
    from pipeline.training import checkpoint

    d = tmp_path_factory.mktemp("slice_vs_masked")
    r = recipe_at(str(d / "runs"))
    m = r.model
    parallel.initialize(r)
    parent = perturbed_parent(r)
    stage = d / "runs" / "tiny" / "stage2"
    ckpt = checkpoint.save(str(stage / "checkpoints"), 0, [parent])
    budgets = [ResolvedBudget(name, 1.0 - 0.3 * j, hard_choice(j).argmax_subnet(m, REMOVAL_ORDER))
               for name, (j, _) in BUDGETS.items()]
    with open(stage / BUDGETS_FILE, "w") as f:
        json.dump(budgets_to_json(m, budgets), f)
    elastic_dir = str(d / "elastic")
    export_elastic(m, ckpt, elastic_dir, budgets, str(stage / BUDGETS_FILE), base_config=HF_BASE_CONFIG,
                   progress=False)
    _, model_section, written = read_elastic(elastic_dir)  # slice the budgets as elastic.json holds them
    tokens = torch.randint(0, m.vocab_size, (2, 40), generator=torch.Generator().manual_seed(5))  # 2 SSD chunks
    yield {"r": r, "m": model_section, "budgets": {b.name: b for b in written}, "elastic": elastic_dir,
           "parent": parent, "masks": ElasticMasks(parent, m, r.elastic.axes, REMOVAL_ORDER), "tokens": tokens,
           "full_logits": forward(parent, tokens), "d": d}
    parallel.shutdown()


def test_budgets_resolve_through_the_removal_order(family):
    from pipeline.elastic.subnet import Subnet

    assert family["m"] == family["r"].model
    for name, (_, fields) in BUDGETS.items():
        want = dataclasses.replace(Subnet.full(family["m"]), **fields)
        assert family["budgets"][name].subnet.to_json() == want.to_json(), name


@pytest.mark.parametrize("name", list(BUDGETS))
def test_sliced_models_equal_the_masked_model(family, tmp_path, name):
    from pipeline.elastic.elastic_dir import slice_to_hf, slice_to_megatron
    from pipeline.model.build import build_model
    from pipeline.training import checkpoint
    from test_slicing import transformers_logits

    m, budget, tokens = family["m"], family["budgets"][name], family["tokens"]
    masks = family["masks"]
    masks.set_subnet(budget.subnet)
    masked = forward(family["parent"], tokens)
    masks.set_choice(hard_choice(BUDGETS[name][0]))
    by_choice = forward(family["parent"], tokens)
    masks.clear()
    assert torch.equal(by_choice, masked)
    assert masked.abs().max() > 0.5 and (masked - family["full_logits"]).abs().max() > 1e-2  # a real change

    hf_dir = slice_to_hf(family["elastic"], str(tmp_path / "hf"), m, budget, progress=False)
    hf = transformers_logits(hf_dir, tokens)

    mc_dir = slice_to_megatron(family["r"], family["elastic"], str(tmp_path / "mcore"), m, budget, progress=False)
    small = build_model(dataclasses.replace(family["r"], model=budget.subnet.model_config(m))).eval()
    checkpoint.load(checkpoint.resolve(os.path.join(mc_dir, "checkpoints")), [small], load_rng=False)
    mc = forward(small, tokens)
    d_hf, d_mc = (hf - masked).abs().max().item(), (mc - masked).abs().max().item()
    print(f"\n{name} {budget.subnet.to_json()}: max |masked - sliced HF (transformers)| = {d_hf:.3g}, "
          f"max |masked - sliced megatron| = {d_mc:.3g} (HF - megatron {(hf - mc).abs().max():.3g}), "
          f"max |logits| = {masked.abs().max():.3g}")
    assert d_hf <= TOL and d_mc <= TOL
