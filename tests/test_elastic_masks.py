"""Nested masks on one process (fp32, CPU): the masked elastic model computes exactly the sliced subnet.

References are physically sliced models (the project's slicer on the parent's HF tensors, loaded into a
model of ``subnet.model_config``), or for per-layer sizes -- which no single sliced model expresses -- the
parent with the dropped channels' weights zeroed. The parent has negative expert biases (elastic_worker),
so masking experts by zeroing their bias would route tokens to them; the test shows that trap is live.
"""

import dataclasses

import pytest
import torch

from elastic_worker import REMOVAL_ORDER, SUBNETS, build_parent, forward, recipe, sliced_logits, subnet
from pipeline.elastic.router import AxisChoice, Choice, ElasticRouter, kind_layers
from pipeline.elastic.subnet import Subnet

TOL = 1e-5


@pytest.fixture(scope="module")
def env():
    from pipeline import parallel
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.hf.memory import hf_state_from_model
    from pipeline.elastic.masks.spec import build_elastic_model

    r = recipe(["elastic.axes.depth=[8, 5]"])
    parallel.initialize(r)
    parent = build_parent(r)
    elastic = build_elastic_model(r).eval()
    elastic.load_state_dict(parent.state_dict())  # strict: the parent's checkpoint loads as is
    with torch.no_grad():
        parent_logits = forward(parent)
    yield {"r": r, "m": r.model, "parent": parent, "elastic": elastic, "parent_logits": parent_logits,
           "hf": hf_state_from_model(parent, r.model),
           "masks": ElasticMasks(elastic, r.model, r.elastic.axes, REMOVAL_ORDER)}
    parallel.shutdown()


def masked_logits(env, sub: Subnet):
    env["masks"].set_subnet(sub)
    with torch.no_grad():
        return forward(env["elastic"])


def test_elastic_model_has_the_parents_parameters_and_checkpoint_keys(env):
    parent, elastic = env["parent"], env["elastic"]
    assert list(parent.state_dict()) == list(elastic.state_dict())
    assert sorted(parent.sharded_state_dict()) == sorted(elastic.sharded_state_dict())
    assert sum(p.numel() for p in parent.parameters()) == sum(p.numel() for p in elastic.parameters())


def test_clear_gives_the_parent_bit_exact(env):
    masked_logits(env, subnet(env["m"], "all"))
    env["masks"].clear()
    with torch.no_grad():
        assert torch.equal(forward(env["elastic"]), env["parent_logits"])


@pytest.mark.parametrize("name", list(SUBNETS))
def test_masked_equals_sliced(env, name):
    sub = subnet(env["m"], name)
    want = sliced_logits(env["r"], env["hf"], sub)
    assert (want - env["parent_logits"]).abs().max() > 1e-2  # the subnet changes the function
    diff = (masked_logits(env, sub) - want).abs().max().item()
    assert diff <= TOL, f"{name}: masked vs sliced differ by {diff:.2e}"


def _choice(m, probs_for, hard: bool, rows=None) -> Choice:
    """A Choice on the recipe's axes (+ depth [8, 5]) with the given probabilities per axis."""
    r = recipe(["elastic.axes.depth=[8, 5]"])
    axes = {}
    for axis, sizes in [(a, getattr(r.elastic.axes, a)) for a in probs_for]:
        p = torch.tensor(probs_for[axis])
        if rows and axis in rows:
            p = p.expand(rows[axis], -1).clone()
        axes[axis] = AxisChoice(sizes, p)
    return Choice(axes, hard)


# probabilities that pick SUBNETS["all"] (hidden 96, 2 heads, 4 Mamba heads, moe_ffn 48, shared 64, 4 experts,
# 5 layers kept = skip [6, 3, 1]): one-hot for soft masks, peaked elsewhere for hard ones
ONE_HOT = {"hidden": [0, 1, 0], "attention_heads": [0, 1], "mamba_heads": [0, 1], "moe_ffn": [0, 1, 0],
           "shared_expert_ffn": [0, 0, 1], "experts": [0, 0, 1], "depth": [0, 1]}
PEAKED = {"hidden": [0.3, 0.4, 0.3], "attention_heads": [0.2, 0.8], "mamba_heads": [0.45, 0.55],
          "moe_ffn": [0.1, 0.6, 0.3], "shared_expert_ffn": [0.3, 0.3, 0.4], "experts": [0.2, 0.3, 0.5],
          "depth": [0.4, 0.6]}


@pytest.mark.parametrize("mode", ["soft_one_hot", "hard", "hard_per_layer"])
def test_router_choices_equal_sliced(env, mode):
    m = env["m"]
    rows = {"attention_heads": 2, "mamba_heads": 3, "moe_ffn": 3, "shared_expert_ffn": 3, "experts": 3}
    choice = _choice(m, ONE_HOT if mode == "soft_one_hot" else PEAKED, hard=mode != "soft_one_hot",
                     rows=rows if mode == "hard_per_layer" else None)
    sub = choice.argmax_subnet(m, REMOVAL_ORDER)
    assert sub.to_json() == subnet(m, "all").to_json()
    env["masks"].set_choice(choice)
    with torch.no_grad():
        got = forward(env["elastic"])
    diff = (got - sliced_logits(env["r"], env["hf"], sub)).abs().max().item()
    assert diff <= TOL, f"{mode}: {diff:.2e}"


@pytest.mark.parametrize("heterogeneous", [False, True])
def test_gradient_reaches_the_router_through_hard_masks(env, heterogeneous):
    r, m = env["r"], env["m"]
    torch.manual_seed(0)
    router = ElasticRouter(dataclasses.replace(r.elastic, heterogeneous=heterogeneous), m)
    choice = router(2, tau=1.0, logit_scale=1.0, hard=True, generator=torch.Generator().manual_seed(4))
    sub = choice.argmax_subnet(m, REMOVAL_ORDER)
    # per-layer sizes have no sliced model: compare with the exact 0/1 masks of the same subnet instead
    want = masked_logits(env, sub) if heterogeneous else sliced_logits(env["r"], env["hf"], sub)
    assert sub.homogeneous != heterogeneous
    env["masks"].set_choice(choice)
    got = forward(env["elastic"])
    assert (got.detach() - want).abs().max() <= TOL  # straight-through: hard values are exact
    (got - env["parent_logits"]).pow(2).mean().backward()
    kept = set(sub.kept_layers(m))
    for axis, net in router.mlps.items():
        if not kept & set(kind_layers(m, axis)):
            continue  # depth dropped every layer of this axis' kind: nothing to differentiate
        grad = net[-1].weight.grad
        assert grad is not None and grad.abs().max() > 0, f"no gradient reaches the {axis} router"
    env["masks"].clear()


def test_masked_experts_are_never_selected_even_with_negative_bias(env):
    m = env["m"]
    seen = []

    def capture(router, inputs, outputs):
        logits = router.gating(inputs[0]).view(-1, m.num_experts)
        seen.append((logits, router.expert_bias.clone(), outputs[1].view(-1, m.num_experts)))

    routers = [mod for mod in env["elastic"].modules() if hasattr(mod, "expert_bias")]
    hooks = [rt.register_forward_hook(capture) for rt in routers]
    masked_logits(env, subnet(env["m"], "experts"))  # keeps experts 0..3
    for h in hooks:
        h.remove()
    naive_picks = 0
    for logits, bias, routing_map in seen:
        assert routing_map[:, 4:].sum() == 0 and routing_map[:, :4].sum() == m.moe_topk * logits.shape[0]
        # the naive mask (logit -inf -> sigmoid score 0, bias 0) would pick masked experts here
        naive = torch.cat([torch.sigmoid(logits[:, :4]) + bias[:4], torch.zeros_like(logits[:, 4:])], dim=1)
        naive_picks += int((naive.topk(m.moe_topk, dim=1).indices >= 4).sum())
    assert len(seen) == m.pattern.count("E") and naive_picks > 0


def test_skipped_layers_are_not_computed(env):
    calls = {}
    decoder = env["elastic"].decoder
    hooks = []
    for layer in decoder.layers:
        inner = getattr(layer, "mixer", None) or getattr(layer, "self_attention", None) or layer.mlp
        hooks.append(inner.register_forward_hook(
            lambda mod, i, o, n=layer.layer_number - 1: calls.__setitem__(n, calls.get(n, 0) + 1)))
    masked_logits(env, subnet(env["m"], "depth"))  # skips layers 6 and 3
    for h in hooks:
        h.remove()
    assert sorted(calls) == [0, 1, 2, 4, 5, 7] and set(calls.values()) == {1}


def test_per_layer_sizes_equal_the_parent_with_dropped_weights_zeroed(env):
    m = env["m"]
    sub = dataclasses.replace(Subnet.full(m), per_layer={1: {"moe_ffn": 32}, 3: {"attention_heads": 2}})
    from pipeline.model.build import build_model

    zeroed = build_model(env["r"]).eval()
    zeroed.load_state_dict(env["parent"].state_dict())
    layers = zeroed.decoder.layers
    with torch.no_grad():
        for expert in layers[1].mlp.experts.local_experts:
            expert.linear_fc2.weight[:, 32:] = 0.0
        hd = m.attention_head_dim  # 2 heads per KV group, keep 1: heads 1 and 3 go
        for head in (1, 3):
            layers[3].self_attention.linear_proj.weight[:, head * hd:(head + 1) * hd] = 0.0
        want = forward(zeroed)
    assert (want - env["parent_logits"]).abs().max() > 1e-2
    assert (masked_logits(env, sub) - want).abs().max() <= TOL
    # per-layer overrides equal to one size everywhere are the homogeneous subnet
    every = {i: {"attention_heads": 2} for i, s in enumerate(m.pattern) if s == "*"}
    same = masked_logits(env, dataclasses.replace(Subnet.full(m), per_layer=every))
    assert torch.equal(same, masked_logits(env, subnet(m, "attention_heads")))


def test_after_the_steps_one_fetch_the_elastic_code_reads_nothing_on_the_host(env, monkeypatch):
    """The step's host numbers come from one transfer (``fetch_to_host``, at begin_step); setting the masks, the
    budget loss and the logged choice then never read a tensor on the host (.item / .cpu / .tolist / float()):
    on a GPU each would wait for the device."""
    from pipeline.elastic.budget import budget_loss
    from pipeline.elastic.router import fetch_to_host

    r, m = env["r"], env["m"]
    torch.manual_seed(0)
    e = dataclasses.replace(r.elastic, heterogeneous=True)
    router = ElasticRouter(e, m)
    choices = [router(b, 1.0, 2.0, hard=hard, generator=torch.Generator().manual_seed(b))
               for b in range(3) for hard in (True, False)]
    fetch_to_host([a for c in choices for a in c.axes.values()])
    budget_loss(choices[0], m, 0.5, e, REMOVAL_ORDER)  # warm the device constants (built once per device)
    env["masks"].set_choice(choices[0])

    def sync(*args, **kwargs):
        raise AssertionError("host read of a tensor inside the step")

    for name in ("item", "cpu", "tolist", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for choice in choices:
        env["masks"].set_choice(choice)
        loss, size = budget_loss(choice, m, 0.5, e, REMOVAL_ORDER)
        choice.sizes()
    monkeypatch.undo()
    env["masks"].clear()
    assert loss.dim() == 0 and size.requires_grad is False
