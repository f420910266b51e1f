"""The slicer (pipeline/elastic/slicing.py) and the in-memory HF <-> megatron helpers (pipeline/hf/memory.py).

A seeded random NemotronH parent (every block kind, Mamba groups > 1, perturbed 1-D parameters and
expert bias) is sliced at every budget-like subnet of the tiny recipe's axes and at combinations with
skipped layers. Each sliced model must (1) load into transformers' NemotronHForCausalLM with the sliced
config.json, (2) load through ``load_hf_state`` into a megatron model built from ``subnet.model_config``
and give transformers' logits (fp32, max |d| <= 1e-4), (3) come back bit-exact from
``hf_state_from_model``. Nesting: a smaller budget sliced from the parent equals it sliced from the larger.
"""

import json
import os

import pytest
import torch

from test_hf_roundtrip import TOL, make_hf_parent, recipe_for

# the tiny recipe's elastic.axes (recipes/tiny.yaml), plus a dense-MLP width for the '-' layer of PATTERN
AXES = {"hidden": [128, 96, 64], "attention_heads": [4, 2], "mamba_heads": [8, 4], "ffn": [256, 128],
        "moe_ffn": [64, 48, 32], "shared_expert_ffn": [128, 96, 64], "experts": [8, 6, 4]}


def budget_subnet(j: int, skip=()):
    from pipeline.elastic.subnet import Subnet

    return Subnet(**{a: c[min(j, len(c) - 1)] for a, c in AXES.items()}, skip_layers=list(skip))


def cases():
    """(name, subnet): the three budgets, budgets with skipped layers, and mixed choices."""
    from pipeline.elastic.subnet import Subnet

    out = [(f"budget{j}", budget_subnet(j)) for j in range(3)]
    out += [("budget1_skip_mamba", budget_subnet(1, [2])), ("budget2_skip_attn_mlp", budget_subnet(2, [3, 5])),
            ("full_skip_moe", budget_subnet(0, [4])),
            ("mixed", Subnet(hidden=64, attention_heads=4, mamba_heads=4, ffn=256, moe_ffn=64,
                             shared_expert_ffn=64, experts=4, skip_layers=[6]))]
    return out


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    from safetensors.torch import load_file

    d = str(tmp_path_factory.mktemp("slicing_parent"))
    make_hf_parent(d)
    with open(os.path.join(d, "config.json")) as f:
        base = json.load(f)
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    model = recipe_for(d).model
    return {"tensors": load_file(os.path.join(d, "model.safetensors")), "config": base, "model": model,
            "tokens": tokens, "root": d}


def write_hf(out_dir: str, tensors, cfg) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f)


def transformers_logits(hf_dir: str, tokens):
    from transformers import NemotronHForCausalLM

    model = NemotronHForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def megatron_model(root: str, m):
    """A fresh megatron model of model config ``m`` (single process, fp32, CPU)."""
    import dataclasses

    from pipeline import parallel
    from pipeline.model.build import build_model

    recipe = dataclasses.replace(recipe_for(root), model=m)
    parallel.initialize(recipe)
    return build_model(recipe).eval()


def megatron_logits(model, tokens):
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, position_ids, None)


@pytest.mark.parametrize("name,subnet", cases(), ids=[c[0] for c in cases()])
def test_sliced_model_matches_transformers_and_megatron(parent, tmp_path, name, subnet):
    from pipeline.elastic.slicing import slice_state_dict, sliced_hf_config
    from pipeline.hf.mapping import hf_shapes
    from pipeline.hf.memory import hf_state_from_model, load_hf_state

    m = parent["model"]
    sliced = slice_state_dict(parent["tensors"], m, subnet)
    small = subnet.model_config(m)
    expected = hf_shapes(small)
    assert sorted(sliced) == sorted(expected)
    assert all(tuple(sliced[k].shape) == expected[k] for k in expected)

    cfg = sliced_hf_config(parent["config"], m, subnet)
    assert cfg["hidden_size"] == subnet.hidden and cfg["num_hidden_layers"] == m.num_layers - len(subnet.skip_layers)
    assert cfg["time_step_min"] == parent["config"]["time_step_min"]  # the parent's keys carry through
    write_hf(str(tmp_path / "hf"), sliced, cfg)
    ref = transformers_logits(str(tmp_path / "hf"), parent["tokens"])

    model = megatron_model(parent["root"], small)
    load_hf_state(model, small, sliced)
    ours = megatron_logits(model, parent["tokens"])
    delta = (ours - ref).abs().max().item()
    print(f"\n{name}: {subnet.to_json()} max |megatron - transformers| = {delta:.3g}")
    assert ref.abs().max() > 0.5 and delta <= TOL

    back = hf_state_from_model(model, small)
    assert sorted(back) == sorted(sliced) and all(torch.equal(back[k], sliced[k]) for k in sliced)


def test_full_subnet_is_the_parent(parent):
    from pipeline.elastic.slicing import slice_state_dict
    from pipeline.elastic.subnet import Subnet

    m = parent["model"]
    full = slice_state_dict(parent["tensors"], m, Subnet.full(m))
    assert sorted(full) == sorted(parent["tensors"])
    assert all(torch.equal(full[k], parent["tensors"][k]) for k in full)


def test_nesting_smaller_budgets_are_prefixes_of_larger(parent):
    """Budget j+1 cut from the parent == budget j+1 cut from budget j's model (sizes are prefixes of
    prefixes, heads per group); and the plain-prefix axes are literally leading slices."""
    import dataclasses

    from pipeline.elastic.slicing import slice_state_dict

    m = parent["model"]
    large_sub, small_sub = budget_subnet(1, [2]), budget_subnet(2, [2, 5])
    large = slice_state_dict(parent["tensors"], m, large_sub)
    small = slice_state_dict(parent["tensors"], m, small_sub)
    # in the larger model's numbering layer 5 of the parent is layer 4
    relative = dataclasses.replace(small_sub, skip_layers=[4])
    again = slice_state_dict(large, large_sub.model_config(m), relative)
    assert sorted(again) == sorted(small) and all(torch.equal(again[k], small[k]) for k in small)
    h, k, f = small_sub.hidden, small_sub.experts, small_sub.moe_ffn
    assert torch.equal(small["backbone.embeddings.weight"], large["backbone.embeddings.weight"][:, :h])
    assert torch.equal(small["lm_head.weight"], large["lm_head.weight"][:, :h])
    # parent layer 4 (E) is layer 3 in large (layer 2 skipped) and layer 3 in small
    gate = "backbone.layers.3.mixer.gate.weight"
    assert torch.equal(small[gate], large[gate][:k, :h])
    assert torch.equal(small["backbone.layers.3.mixer.experts.3.up_proj.weight"],
                       large["backbone.layers.3.mixer.experts.3.up_proj.weight"][:f, :h])
    assert "backbone.layers.3.mixer.experts.4.up_proj.weight" not in small


def test_grouped_heads_keep_the_prefix_of_each_group(parent):
    """Mamba in_proj / A_log and attention q / o_proj: heads [0, 1] and [4, 5] of 8 heads in 2 groups."""
    from pipeline.elastic.slicing import slice_tensor

    m, t = parent["model"], parent["tensors"]
    sub = budget_subnet(0)
    sub.mamba_heads, sub.attention_heads = 4, 2
    a_log = slice_tensor("backbone.layers.0.mixer.A_log", t["backbone.layers.0.mixer.A_log"], m, sub)
    assert torch.equal(a_log, t["backbone.layers.0.mixer.A_log"][[0, 1, 4, 5]])
    w, P, d_inner = t["backbone.layers.0.mixer.in_proj.weight"], m.mamba_head_dim, 128
    got = slice_tensor("backbone.layers.0.mixer.in_proj.weight", w, m, sub)
    x_rows = torch.cat([w[d_inner + 0 * P:d_inner + 2 * P], w[d_inner + 4 * P:d_inner + 6 * P]])
    assert torch.equal(got[2 * P * 2:4 * P * 2], x_rows)  # z (4 heads) then x (4 heads)
    assert torch.equal(got[-4:], w[-8:][[0, 1, 4, 5]])  # dt rows
    q = t["backbone.layers.3.mixer.q_proj.weight"]  # 4 heads of 32 in 2 KV groups: keep heads 0 and 2
    got = slice_tensor("backbone.layers.3.mixer.q_proj.weight", q, m, sub)
    assert torch.equal(got, torch.cat([q[0:32], q[64:96]]))


def test_per_layer_sizes_slice_but_have_no_hf_config(parent):
    from pipeline.elastic.slicing import slice_state_dict, sliced_hf_config

    m = parent["model"]
    sub = budget_subnet(1)
    sub.per_layer = {1: {"experts": 4, "moe_ffn": 32}, 0: {"mamba_heads": 8}}
    sliced = slice_state_dict(parent["tensors"], m, sub)
    assert sliced["backbone.layers.1.mixer.gate.weight"].shape == (4, 96)
    assert sliced["backbone.layers.1.mixer.experts.0.up_proj.weight"].shape == (32, 96)
    assert sliced["backbone.layers.4.mixer.experts.5.up_proj.weight"].shape == (48, 96)
    assert sliced["backbone.layers.0.mixer.A_log"].shape == (8,)
    assert sliced["backbone.layers.2.mixer.A_log"].shape == (4,)
    with pytest.raises(ValueError, match=r"per-layer sizes \(layers \[0, 1\]\)"):
        sliced_hf_config(parent["config"], m, sub)


def test_dropped_and_unknown_tensors_are_errors(parent):
    from pipeline.elastic.slicing import slice_tensor

    m, t = parent["model"], parent["tensors"]
    sub = budget_subnet(2, [3])
    name = "backbone.layers.1.mixer.experts.5.up_proj.weight"
    with pytest.raises(ValueError, match="expert 5 is not kept"):
        slice_tensor(name, t[name], m, sub)
    with pytest.raises(ValueError, match="layer 3 is skipped"):
        slice_tensor("backbone.layers.3.mixer.q_proj.weight", t["backbone.layers.3.mixer.q_proj.weight"], m, sub)
    with pytest.raises(ValueError, match="not a NemotronH tensor"):
        slice_tensor("backbone.layers.0.mixer.q_proj.weight", t["backbone.layers.3.mixer.q_proj.weight"], m, sub)
