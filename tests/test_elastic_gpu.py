"""GPU: the elastic masks on the CUDA path (mamba-ssm's Triton SSD and gated norm), fp32.

Masked == sliced for every subnet of tests/elastic_worker.py at L=256; the eps-scaled gated norm on the Triton
kernel equals the kernel on the sliced input; a hard router choice on the GPU is exact and differentiable.
Run on the device machine (``make test-gpu``); figures in docs/elastic.md."""

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from elastic_worker import REMOVAL_ORDER, SUBNETS, build_parent, recipe, subnet  # noqa: E402

TOL = 1e-5  # observed <= 1.5e-6 on an H100


@pytest.fixture(scope="module")
def env():
    from pipeline import parallel
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.hf.memory import hf_state_from_model
    from pipeline.elastic.masks.spec import build_elastic_model

    r = recipe(["elastic.axes.depth=[8, 5]"])
    dev = parallel.initialize(r)
    tok = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(3)).to(dev)
    pos = torch.arange(256, device=dev)[None].expand(2, -1)
    parent = build_parent(r)
    elastic = build_elastic_model(r).eval()
    elastic.load_state_dict(parent.state_dict())
    with torch.no_grad():
        parent_logits = parent(tok, pos, None)
    yield {"r": r, "dev": dev, "fwd": lambda model: model(tok, pos, None), "parent": parent, "elastic": elastic,
           "parent_logits": parent_logits, "masks": ElasticMasks(elastic, r.model, r.elastic.axes, REMOVAL_ORDER),
           "hf": {k: v.cpu() for k, v in hf_state_from_model(parent, r.model).items()}}
    parallel.shutdown()


@pytest.mark.parametrize("name", list(SUBNETS))
def test_masked_equals_sliced_on_the_triton_path(env, name):
    from pipeline.elastic.slicing import slice_state_dict
    from pipeline.hf.memory import load_hf_state
    from pipeline.model.build import build_model

    r, sub = env["r"], subnet(env["r"].model, name)
    assert type(env["elastic"].decoder.layers[0].mixer.norm).__name__ == "ElasticExtendedRMSNorm"
    small = sub.model_config(r.model)
    sliced = build_model(dataclasses.replace(r, model=small)).eval()
    load_hf_state(sliced, small, slice_state_dict(env["hf"], r.model, sub))
    with torch.no_grad():
        want = env["fwd"](sliced)
        env["masks"].set_subnet(sub)
        got = env["fwd"](env["elastic"])
        env["masks"].clear()
        assert torch.equal(env["fwd"](env["elastic"]), env["parent_logits"])
    diff = (got - want).abs().max().item()
    print(f"[gpu-result] masked vs sliced {name}: {diff:.1e}")
    assert (want - env["parent_logits"]).abs().max() > 1e-2 and diff <= TOL


def test_eps_scaled_gated_norm_on_the_triton_kernel(env):
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as TritonGatedNorm

    from pipeline.elastic.masks.modules import _gated_norm_class

    dev = env["dev"]
    g = torch.Generator(device=dev).manual_seed(0)
    x, z = torch.randn(4, 64, 256, device=dev, generator=g), torch.randn(4, 64, 256, device=dev, generator=g)
    full = TritonGatedNorm(256, eps=1e-5, group_size=64, norm_before_gate=False, device=dev)
    torch.nn.init.normal_(full.weight)
    keep = torch.cat([torch.arange(q * 64, q * 64 + 32) for q in range(4)]).to(dev)  # half of each group
    small = TritonGatedNorm(128, eps=1e-5, group_size=32, norm_before_gate=False, device=dev)
    small.weight.data.copy_(full.weight.data[keep])
    full.__class__ = _gated_norm_class(TritonGatedNorm)
    mask = torch.zeros(256, device=dev)
    mask[keep] = 1.0
    full.set_elastic_mask(mask, 0.5)
    with torch.no_grad():
        y, want = full(x, z), small(x[..., keep], z[..., keep])
    assert (y[..., keep] - want).abs().max() <= TOL
    assert y.abs().sum() == y[..., keep].abs().sum()  # dropped channels are exactly zero


def test_hard_router_choice_on_the_gpu(env):
    from pipeline.elastic.router import ElasticRouter, kind_layers

    r, m = env["r"], env["r"].model
    torch.manual_seed(0)
    router = ElasticRouter(r.elastic, m).to(env["dev"])
    choice = router(1, 1.0, 1.0, hard=True, generator=torch.Generator(device=env["dev"]).manual_seed(4))
    sub = choice.argmax_subnet(m, REMOVAL_ORDER)
    with torch.no_grad():
        env["masks"].set_subnet(sub)
        want = env["fwd"](env["elastic"])
    env["masks"].set_choice(choice)
    got = env["fwd"](env["elastic"])
    assert (got.detach() - want).abs().max() <= TOL
    (got - env["parent_logits"]).pow(2).mean().backward()
    kept = set(sub.kept_layers(m))
    for axis, net in router.mlps.items():
        if kept & set(kind_layers(m, axis)):
            assert net[-1].weight.grad is not None and net[-1].weight.grad.abs().max() > 0, axis
    env["masks"].clear()
