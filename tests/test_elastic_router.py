"""Router, budget loss, KD and budget sampling (no model; CPU)."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from pipeline.config import load_recipe
from pipeline.elastic.budget import budget_loss, choice_size, memory_bytes, target_size
from pipeline.elastic.kd import forward_kl, forward_kl_unchunked, sample_budget
from pipeline.elastic.router import (AxisChoice, Choice, ElasticRouter, budget_vector, fetch_to_host,
                                     logit_scale_at, tau_at)
from pipeline.elastic.subnet import Subnet
from pipeline.model.params import Dims, count_model


@pytest.fixture(scope="module")
def tiny():
    return load_recipe(TINY)


def one_hot_choice(r, **picks) -> Choice:
    """A Choice putting probability 1 on ``picks[axis]`` (a size from the recipe's choices)."""
    axes = {}
    for axis, size in picks.items():
        sizes = getattr(r.elastic.axes, axis)
        axes[axis] = AxisChoice(sizes, F.one_hot(torch.tensor(sizes.index(size)), len(sizes)).float())
    return Choice(axes, hard=False)


def test_budget_loss_dead_zone_and_full_budget_penalty(tiny):
    m, e = tiny.model, tiny.elastic
    choice = one_hot_choice(tiny, hidden=96, moe_ffn=48)
    sub = dataclasses.replace(Subnet.full(m), hidden=96, moe_ffn=48)
    ratio = sub.count(m).active / count_model(m).active
    loss, expected = budget_loss(choice, m, ratio, e)
    assert float(expected) == pytest.approx(sub.count(m).active, rel=1e-6) and float(loss) == 0.0
    assert float(budget_loss(choice, m, ratio / 1.04, e)[0]) == 0.0  # 4% over the target: inside
    assert float(budget_loss(choice, m, ratio / 0.96, e)[0]) == 0.0  # 4% under
    assert float(budget_loss(choice, m, ratio / 1.06, e)[0]) == pytest.approx(0.06, rel=1e-4)
    assert float(budget_loss(choice, m, ratio / 0.9, e)[0]) == pytest.approx(0.1, rel=1e-4)
    # the full budget: (1 - P/P_full) on top, no dead zone (here P/P_full = ratio < 0.95)
    full_loss = float(budget_loss(choice, m, 1.0, dataclasses.replace(e, full_budget_penalty=2.0))[0])
    assert full_loss == pytest.approx((1 - ratio) + 2.0 * (1 - ratio), rel=1e-5)
    near_full = one_hot_choice(tiny, moe_ffn=48)  # ~3% below the parent: inside the dead zone
    near = Subnet.full(m)
    near.moe_ffn = 48
    gap = 1 - near.count(m).active / count_model(m).active
    assert 0 < gap < 0.05
    assert float(budget_loss(near_full, m, 1.0, e)[0]) == pytest.approx(gap, rel=1e-4)


def test_memory_target_against_hand_computation(tiny):
    m = tiny.model  # pattern MEM*EM*E: 3 Mamba, 2 attention layers
    # attention: K and V, 2 KV groups x head dim 32, per token: 2 * 2 * 32 = 128 elements
    kv = 2 * (4096 * 128)
    # Mamba: d_inner = 8 heads x 16; conv window (d_inner + 2 groups x state 16) x (kernel 4 - 1); SSM d_inner x 16
    ssm = 3 * ((128 + 64) * 3 + 128 * 16)
    params = count_model(m).total
    assert memory_bytes(Dims.from_model(m), m.pattern, 4096, 2.0) == 2 * params + 2 * (kv + ssm)
    # half the Mamba heads, 1-byte cache, a dispatch buffer of 100 tokens x top-2 x hidden 128
    sub = dataclasses.replace(Subnet.full(m), mamba_heads=4)
    ssm_half = 3 * ((64 + 64) * 3 + 64 * 16)
    got = memory_bytes(sub.dims(m), m.pattern, 4096, 2.0, cache_bytes=1.0, dispatch_tokens=100)
    assert got == 2 * sub.count(m).total + (kv + ssm_half + 100 * 2 * 128)
    # the budget loss on the memory target counts exactly this
    e = dataclasses.replace(tiny.elastic, target="memory", memory_seq_length=4096, memory_cache_bytes=1.0,
                            memory_dispatch_tokens=100)
    _, expected = budget_loss(one_hot_choice(tiny, mamba_heads=4), m, 0.9, e)
    assert float(expected) == pytest.approx(got, rel=1e-6)


def test_expected_sizes_are_differentiable_including_depth(tiny):
    m = tiny.model
    logits = torch.zeros(3, requires_grad=True)
    probs = torch.softmax(logits + torch.tensor([0.0, 1.0, 2.0]), -1)
    depth = torch.tensor([0.25, 0.75])
    choice = Choice({"hidden": AxisChoice([128, 96, 64], probs), "depth": AxisChoice([8, 6], depth)}, hard=False)
    dims = choice.expected_subnet_dims(m)
    assert float(dims.hidden) == pytest.approx(float(probs @ torch.tensor([128.0, 96.0, 64.0])))
    keep = choice.expected_keep(m, removal_order=[5, 2, 7])
    assert [float(k) for k in keep] == [1, 1, 0.25, 1, 1, 0.25, 1, 1]
    budget_loss(choice, m, 0.3, tiny.elastic, removal_order=[5, 2, 7])[0].backward()
    assert logits.grad.abs().max() > 0


@pytest.mark.parametrize("target", ["active", "params", "memory"])
def test_vectorised_size_equals_the_per_layer_counter(tiny, target):
    """``choice_size`` (one formula per layer kind on vectors) == the per-layer counter, value and gradient,
    with per-layer (heterogeneous) choices and a depth axis."""
    m = tiny.model
    e = dataclasses.replace(tiny.elastic, target=target, heterogeneous=True, memory_dispatch_tokens=64)
    e.axes = dataclasses.replace(e.axes, depth=[8, 6, 5])
    torch.manual_seed(0)
    router = ElasticRouter(e, m)
    order = [5, 2, 7, 1]
    choice = router(1, 0.7, 2.0, hard=False, generator=torch.Generator().manual_seed(3))
    assert any(a.probs.dim() == 2 for a in choice.axes.values())
    per_layer = target_size(choice.expected_subnet_dims(m), m, e, choice.expected_keep(m, order))
    fast = choice_size(choice, m, e, order)
    assert float(fast) == pytest.approx(float(per_layer), rel=1e-6)
    g_fast = torch.autograd.grad(fast, list(router.parameters()), retain_graph=True)
    g_ref = torch.autograd.grad(per_layer, list(router.parameters()))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_host_copy_matches_the_device_choice(tiny):
    """One transfer per step brings every axis' probs and argmax over; they equal the tensors'."""
    torch.manual_seed(0)
    e = dataclasses.replace(tiny.elastic, heterogeneous=True)
    router = ElasticRouter(e, tiny.model)
    choices = [router(b, 1.0, 1.0, hard=True, generator=torch.Generator().manual_seed(b)) for b in range(3)]
    fetch_to_host([a for c in choices for a in c.axes.values()])
    for c in choices:
        for a in c.axes.values():
            np.testing.assert_array_equal(a.host_probs, a.probs.detach().double().numpy())
            np.testing.assert_array_equal(a.host_argmax, a.probs.detach().argmax(-1).numpy())


TARGET_CASES = {  # target -> (heterogeneous, budget fractions); memory at 4K is dominated by the KV cache
    "active": (False, None), "active_per_layer": (True, None), "params": (False, None),
    "memory": (False, [1.0, 0.85, 0.7]),
}


@pytest.mark.parametrize("case", list(TARGET_CASES))
def test_router_alone_reaches_every_budget(tiny, case):
    """300 steps of Adam on the budget loss only; the noise-free argmax subnet must then be within +-5% of
    each budget (and the full budget the parent)."""
    m = tiny.model
    heterogeneous, fractions = TARGET_CASES[case]
    e = dataclasses.replace(tiny.elastic, target=case.split("_")[0], heterogeneous=heterogeneous)
    if fractions:
        e.budgets = [dataclasses.replace(b, fraction=f) for b, f in zip(e.budgets, fractions)]
    torch.manual_seed(0)
    router = ElasticRouter(e, m)
    opt = torch.optim.Adam(router.parameters(), lr=1e-2)
    gen, steps = torch.Generator().manual_seed(0), 300
    for step in range(steps):
        tau, scale = tau_at(step, e), logit_scale_at(step, steps, e)
        loss = sum(budget_loss(router(b, tau, scale, hard=False, generator=gen), m, budget.fraction, e)[0]
                   for b, budget in enumerate(e.budgets))
        opt.zero_grad()
        loss.backward()
        opt.step()
    full = float(target_size(Dims.from_model(m), m, e))
    for b, budget in enumerate(e.budgets):
        sub = router(b, tau_at(steps, e), e.logit_scale_end, hard=True).argmax_subnet(m)
        got = float(target_size(sub.dims(m), m, e)) / full
        assert abs(got / budget.fraction - 1) <= e.dead_zone, f"{budget.name}: {got:.3f} vs {budget.fraction}"
        if budget.fraction == 1.0:
            assert sub.to_json() == Subnet.full(m).to_json()


def test_schedules_and_budget_interpolation(tiny):
    e = tiny.elastic
    assert tau_at(0, e) == e.tau0 and tau_at(1000, e) == pytest.approx(e.tau0 * e.tau_decay ** 1000)
    assert [logit_scale_at(s, 100, e) for s in (0, 50, 100, 200)] == [1.0, 5.5, 10.0, 10.0]
    assert budget_vector(0.75, e).tolist() == [0, 1, 0]  # budgets: full 1.0, medium 0.75, small 0.5
    assert budget_vector(0.625, e).tolist() == [0, 0.5, 0.5]
    assert budget_vector(0.9, e).tolist() == pytest.approx([0.6, 0.4, 0])
    assert budget_vector(0.2, e).tolist() == [0, 0, 1]


def test_router_noise_comes_from_the_generator(tiny):
    torch.manual_seed(0)
    router = ElasticRouter(dataclasses.replace(tiny.elastic, heterogeneous=True), tiny.model)
    assert set(router.mlps) == {"hidden", "attention_heads", "mamba_heads", "moe_ffn", "shared_expert_ffn",
                                "experts"}
    a = router(1, 1.0, 1.0, hard=True, generator=torch.Generator().manual_seed(1))
    b = router(1, 1.0, 1.0, hard=True, generator=torch.Generator().manual_seed(1))
    c = router(1, 1.0, 1.0, hard=True, generator=torch.Generator().manual_seed(2))
    assert all(torch.equal(a.axes[k].probs, b.axes[k].probs) for k in a.axes)
    assert not all(torch.equal(a.axes[k].probs, c.axes[k].probs) for k in a.axes)
    assert a.axes["moe_ffn"].probs.shape == (3, 3) and a.axes["attention_heads"].probs.shape == (2, 2)
    clean = router(budget_vector(0.75, tiny.elastic), 1.0, 1.0, hard=False)
    assert torch.equal(clean.axes["hidden"].probs, router(1, 1.0, 1.0, hard=False).axes["hidden"].probs)


def test_sample_budget_matches_weights():
    weights = [0.5, 0.3, 0.2, 0.0]
    draws = [sample_budget(1234, it, mb, weights) for it in range(1500) for mb in range(4)]
    counts = np.bincount(draws, minlength=4)
    assert counts[3] == 0
    expected = len(draws) * np.array(weights[:3])
    chi2 = float(((counts[:3] - expected) ** 2 / expected).sum())
    assert chi2 < 13.82, counts  # chi-square, 2 dof, p = 0.001 (fixed seeds: deterministic)
    assert sample_budget(1234, 7, 1, weights) == sample_budget(1234, 7, 1, weights)
    uniform = [sample_budget(5, it, 0, [1, 1, 1]) for it in range(30)]
    assert len(set(uniform)) == 3
    with pytest.raises(ValueError):
        sample_budget(0, 0, 0, [0, 0])


def test_forward_kl_single_rank():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    want = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(forward_kl(s, t, mask), want * mask)
    assert forward_kl(t, t, None).abs().max() < 1e-6


@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_equals_the_unchunked_autograd_form(chunk, temperature):
    """Loss and student gradient of the chunked Function == the autograd form (which holds every fp32
    temporary), for chunks that divide the 10 tokens, do not, or exceed them; bf16 logits too."""
    gen = torch.Generator().manual_seed(1)
    s0, t = 3 * torch.randn(2, 5, 48, generator=gen), 3 * torch.randn(2, 5, 48, generator=gen)
    mask = (torch.rand(2, 5, generator=gen) > 0.3).float()
    w = torch.rand(2, 5, generator=gen)  # a non-uniform upstream gradient
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        a, b = (s0.to(dtype).clone().requires_grad_(True) for _ in range(2))
        got = forward_kl(a, t.to(dtype), mask, temperature, chunk_tokens=chunk)
        want = forward_kl_unchunked(b, t.to(dtype), mask, temperature)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        (got * w).sum().backward()
        (want * w).sum().backward()
        assert a.grad.dtype == dtype
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=tol)
        assert b.grad.abs().max() > 1e-2
