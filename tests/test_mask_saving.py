"""Mask arithmetic that keeps no activation copy of its own (pipeline/elastic/masks/saving.py).

- ``masked_input``: the consumer of ``x * m`` does not keep the product alive (a weak reference to it dies once
  the caller drops it, the graph still waiting for its backward), also when it keeps slices of it (as TE's
  grouped expert linears do); with ``SAVE_MEMORY`` off it does (the reference case, so the check can fail);
  gradients equal plain autograd's bit for bit;
- ``scaled``: ``y * s`` keeps its output, not ``y``; gradients equal plain autograd's (the scale's to rounding);
- the tiny elastic model, a hard router choice at the medium budget: every parameter's gradient, the router's
  included, equals the plain-autograd model's (fp32, CPU).
"""

import dataclasses
import gc
import weakref

import torch

from pipeline.elastic.masks import saving


def _masked_linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g).requires_grad_()
    m = (torch.arange(32) < 20).float().requires_grad_()  # a hard prefix mask: its gradient needs x beyond 20
    w = torch.randn(8, 32, generator=g).requires_grad_()
    with saving.masked_input(x, m) as product:
        out = torch.nn.functional.linear(product, w)
    alive = weakref.ref(product)
    del product
    gc.collect()
    kept = alive() is not None  # before the backward, which frees what the graph kept
    out.pow(2).sum().backward()
    return kept, out.detach(), x.grad, m.grad, w.grad


def test_masked_input_keeps_x_not_the_product():
    kept, *got = _masked_linear()
    assert not kept  # dropped before the backward ran: only x and m were kept
    saving.SAVE_MEMORY = False
    try:
        kept_ref, *want = _masked_linear()
    finally:
        saving.SAVE_MEMORY = True
    assert kept_ref  # plain autograd: the linear keeps the product
    for a, b in zip(got, want):
        assert torch.equal(a, b)


class _GroupedLinear(torch.autograd.Function):
    """A consumer like TE's grouped linear: splits its input by rows (one slice per expert) and keeps the slices."""

    @staticmethod
    def forward(ctx, x, w, splits):
        parts = torch.split(x, splits)
        ctx.save_for_backward(w, *parts)
        return torch.cat([p @ w.t() for p in parts])

    @staticmethod
    def backward(ctx, grad):
        w, *parts = ctx.saved_tensors
        gs = torch.split(grad, [p.shape[0] for p in parts])
        return (torch.cat([g @ w for g in gs]), sum(g.t() @ p for g, p in zip(gs, parts)), None)


def _masked_grouped():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 32, generator=g).requires_grad_()
    m = (torch.arange(32) < 12).float().requires_grad_()
    w = torch.randn(8, 32, generator=g).requires_grad_()
    with saving.masked_input(x, m) as product:
        out = _GroupedLinear.apply(product, w, [5, 11, 8])
    alive = weakref.ref(product)
    del product
    gc.collect()
    kept = alive() is not None
    out.pow(2).sum().backward()
    return kept, out.detach(), x.grad, m.grad, w.grad


def test_masked_input_views_of_the_product_are_recomputed():
    kept, *got = _masked_grouped()
    assert not kept  # the three saved slices became recipes (one recomputation serves them all)
    saving.SAVE_MEMORY = False
    try:
        kept_ref, *want = _masked_grouped()
    finally:
        saving.SAVE_MEMORY = True
    assert kept_ref
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _scaled_exp():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, generator=g).requires_grad_()
    s = torch.tensor(0.6).requires_grad_()
    y = a * 3.0  # a non-leaf nobody else keeps
    out = saving.scaled(y, s)
    alive = weakref.ref(y)
    del y
    gc.collect()
    kept = alive() is not None
    out.exp().sum().backward()
    return kept, a.grad, s.grad


def test_scaled_keeps_only_its_output():
    kept, ga, gs = _scaled_exp()
    assert not kept
    saving.SAVE_MEMORY = False
    try:
        kept_ref, want_a, want_s = _scaled_exp()
    finally:
        saving.SAVE_MEMORY = True
    assert kept_ref
    assert torch.equal(ga, want_a)
    assert torch.allclose(gs, want_s, rtol=1e-6, atol=0)


def _elastic_grads():
    from elastic_worker import REMOVAL_ORDER, build_parent, forward, recipe
    from pipeline import parallel
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.elastic.masks.spec import build_elastic_model
    from pipeline.elastic.router import ElasticRouter

    r = recipe(["elastic.axes.depth=[8, 5]"])
    parallel.initialize(r)
    try:
        parent = build_parent(r)
        model = build_elastic_model(r).train()
        model.load_state_dict(parent.state_dict())
        torch.manual_seed(0)
        router = ElasticRouter(dataclasses.replace(r.elastic), r.model)
        masks = ElasticMasks(model, r.model, r.elastic.axes, REMOVAL_ORDER)
        masks.set_choice(router(1, tau=1.0, logit_scale=1.0, hard=True, generator=torch.Generator().manual_seed(4)))
        forward(model).pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        grads.update({f"router.{n}": p.grad.clone() for n, p in router.named_parameters() if p.grad is not None})
        return grads
    finally:
        parallel.shutdown()


def test_elastic_gradients_equal_plain_autograd():
    got = _elastic_grads()
    saving.SAVE_MEMORY = False
    try:
        want = _elastic_grads()
    finally:
        saving.SAVE_MEMORY = True
    assert got.keys() == want.keys() and any(k.startswith("router.") for k in got)
    for name, g in want.items():
        if name.startswith("router."):  # through a scale's division (out / s for y): rounding allowed
            assert (got[name] - g).abs().max() / g.abs().max().clamp_min(1e-12) <= 1e-5, name
        else:
            assert torch.equal(got[name], g), name


def test_a_forward_without_backward_leaves_nothing_alive():
    """Tensors the block saves as they are (here sigmoid's own output) are kept as detached aliases: no cycle
    between a saved output and its graph node, so a forward that is never differentiated is freed."""
    refs = []
    for _ in range(3):
        x, m = torch.randn(8, 16).requires_grad_(), torch.rand(16).requires_grad_()
        with saving.masked_input(x, m) as product:
            z = torch.sigmoid(product)
        refs += [weakref.ref(z), weakref.ref(product)]
        del x, m, product, z
    gc.collect()
    assert not any(r() is not None for r in refs)

