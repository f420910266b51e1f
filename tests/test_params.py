"""The parameter counter: Nano v3 figures, and exact agreement with the built megatron model."""

import dataclasses

import pytest

from conftest import NANO, TINY
from pipeline.config import load_recipe
from pipeline.model.params import Dims, count_model, count_parameters


def test_nano_v3_total_and_active():
    c = count_model(load_recipe(NANO).model)
    assert abs(c.total / 31.58e9 - 1) < 0.005, c.total
    assert abs(c.active / 3.58e9 - 1) < 0.005, c.active


@pytest.fixture(scope="module")
def build():
    from pipeline import parallel
    from pipeline.model.build import build_model

    recipe = load_recipe(TINY)
    parallel.initialize(recipe)

    def make(**model_overrides):
        r = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, **model_overrides))
        return r.model, build_model(r)

    yield make
    parallel.shutdown()


NESTED = [
    {},
    {"hidden_size": 96, "moe_ffn_hidden_size": 48},  # a nested width
    {"num_attention_heads": 2, "mamba_num_heads": 4, "num_experts": 6, "moe_shared_expert_ffn_hidden_size": 64},
    {"pattern": "M-*E", "num_layers": 4, "tie_embeddings": True},  # dense MLP layer, tied embeddings
]


@pytest.mark.parametrize("overrides", NESTED, ids=lambda o: ",".join(o) or "full")
def test_counter_equals_model_numel(build, overrides):
    m, model = build(**overrides)
    assert count_model(m).total == sum(p.numel() for p in model.parameters())


def test_active_counts_topk_experts_only():
    m = load_recipe(TINY).model
    c = count_model(m)
    per_expert = 2 * m.hidden_size * m.moe_ffn_hidden_size
    n_moe = m.pattern.count("E")
    assert c.total - c.active == n_moe * (m.num_experts - m.moe_topk) * per_expert


def test_per_layer_override_and_depth_skip():
    m = load_recipe(TINY).model
    d = Dims.from_model(m)
    base = count_parameters(m.pattern, d)
    narrow = count_parameters(m.pattern, dataclasses.replace(d, per_layer={1: {"moe_ffn": 32}}))
    assert base.total - narrow.total == m.num_experts * 2 * m.hidden_size * (64 - 32)
    one_layer = count_parameters(m.pattern[1], d).total - count_parameters("", d).total
    assert base.total - count_parameters(m.pattern, d, skip=[1]).total == one_layer


def test_counter_is_differentiable():
    import torch

    m = load_recipe(TINY).model
    h = torch.tensor(96.0, requires_grad=True)
    c = count_parameters(m.pattern, dataclasses.replace(Dims.from_model(m), hidden=h))
    c.active.backward()
    assert h.grad is not None and h.grad > 0
