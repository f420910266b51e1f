"""Transformer Engine's layout on CPU (tests/fused_layout.py): pre-norms fused into the next linear.

- checkpoints move between the two layouts (separate norms <-> fused ``layer_norm_weight``) in both directions
  with the same logits, and a load that would leave a tensor unread or a parameter uninitialised is an error;
- the elastic model derived from the fused spec keeps it fused (the hidden mask folded into the norm's eps and
  the linear's output scale) and equals the physically sliced model for every axis and combinations, hard router
  choices included, with gradient reaching the router through the folded scale.
"""

import dataclasses

import pytest
import torch

from elastic_worker import REMOVAL_ORDER, SUBNETS, build_parent, forward, recipe, sliced_logits, subnet
from fused_layout import FusedLocalBackend, NormColumnParallelLinear
from pipeline.errors import UserError

TOL = 1e-5  # fp32; the fused and separate norms are the same arithmetic, slicing changes reduction lengths


def _fused(monkeypatch_ctx):
    import pipeline.model.build as build

    monkeypatch_ctx.setattr(build, "get_backend", lambda use_te: FusedLocalBackend())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from pipeline import parallel
    from pipeline.elastic.masks.spec import build_elastic_model
    from pipeline.hf.memory import hf_state_from_model
    from pipeline.model.build import build_model
    from pipeline.training import checkpoint

    tmp = tmp_path_factory.mktemp("te_layout")
    r = recipe(["elastic.axes.depth=[8, 5]"])
    parallel.initialize(r)
    parent = build_parent(r)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # norm weights that matter: a norm loaded into the wrong slot changes the logits
        for name, p in parent.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=gen))
    hf = hf_state_from_model(parent, r.model)
    refs = {name: sliced_logits(r, hf, subnet(r.model, name)) for name in SUBNETS}
    with torch.no_grad():
        refs["parent"] = forward(parent)
    checkpoint.save(str(tmp / "local"), 0, [parent])
    with pytest.MonkeyPatch.context() as mp:
        _fused(mp)
        fused = build_model(r).eval()
        elastic = build_elastic_model(r).eval()
    yield {"r": r, "tmp": tmp, "parent": parent, "fused": fused, "elastic": elastic, "refs": refs,
           "ckpt": checkpoint.iter_dir(str(tmp / "local"), 0)}
    parallel.shutdown()


def test_fused_layout_is_what_te_builds(env):
    layer = env["fused"].decoder.layers[0]  # M
    assert isinstance(layer.mixer.in_proj, NormColumnParallelLinear)
    assert type(layer.norm).__name__ == "IdentityOp"
    assert type(env["elastic"].decoder.layers[0].mixer.in_proj).__name__ == "ElasticNormColumnParallelLinear"
    assert type(env["elastic"].decoder.layers[1].pre_mlp_layernorm).__name__ == "ElasticRMSNorm"  # E: separate


def test_checkpoints_move_between_layouts_both_ways(env):
    from pipeline.model.build import build_model
    from pipeline.training import checkpoint

    fused = env["fused"]
    checkpoint.load(env["ckpt"], [fused], load_rng=False)
    want = env["parent"].decoder.layers[0].norm.weight
    assert torch.equal(fused.decoder.layers[0].mixer.in_proj.layer_norm_weight, want)
    with torch.no_grad():
        got = forward(fused)
    assert (got - env["refs"]["parent"]).abs().max() <= TOL
    checkpoint.save(str(env["tmp"] / "fused"), 0, [fused])
    back = build_model(env["r"]).eval()
    checkpoint.load(checkpoint.iter_dir(str(env["tmp"] / "fused"), 0), [back], load_rng=False)
    with torch.no_grad():
        assert (forward(back) - env["refs"]["parent"]).abs().max() <= TOL


def _without_norm_key_maps(spec):
    """A local spec that saves its pre-norms under their own names (not the fused names): a layout mismatch."""
    subs = spec.submodules
    out = {}
    for kind in ("mamba_layer", "attention_layer", "mlp_layer"):
        layer = getattr(subs, kind)
        out[kind] = dataclasses.replace(layer, submodules=dataclasses.replace(
            layer.submodules, sharded_state_dict_keys_map={}))
    return dataclasses.replace(spec, submodules=dataclasses.replace(subs, **out))


def _without_mamba_norms(spec):
    """A layout that misses the Mamba pre-norms entirely (an identity where the norm should be)."""
    from megatron.core.transformer.identity_op import IdentityOp

    layer = spec.submodules.mamba_layer
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, norm=IdentityOp))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mamba_layer=layer))


def test_a_missed_norm_is_an_error(env):
    """Before this check (``StrictHandling.ASSUME_OK_UNEXPECTED``) this load succeeded silently: every parameter
    of the model was found, and the checkpoint's Mamba norm weights were simply never read."""
    from pipeline.model.build import build_model
    from pipeline.training import checkpoint

    model = build_model(env["r"], spec_transform=_without_mamba_norms).eval()
    with pytest.raises(UserError, match=r"would not be loaded into this model, e\.g\. .*layer_norm_weight"):
        checkpoint.load(env["ckpt"], [model], load_rng=False)


def test_a_tensor_left_unloaded_is_an_error_both_ways(env):
    """Norms saved under another layout's names: one side's tensors unread, the other's parameters missing."""
    from pipeline.model.build import build_model
    from pipeline.training import checkpoint

    r = env["r"]
    odd = build_model(r, spec_transform=_without_norm_key_maps).eval()
    odd.load_state_dict(env["parent"].state_dict())
    root = str(env["tmp"] / "odd")
    checkpoint.save(root, 0, [odd])
    with pytest.raises(UserError, match=r"would not be loaded.*norm\.weight|lacks.*layer_norm"):
        checkpoint.load(checkpoint.iter_dir(root, 0), [env["fused"]], load_rng=False)
    fresh = build_model(r, spec_transform=_without_norm_key_maps).eval()
    with pytest.raises(UserError, match=r"lacks.*norm\.weight|would not be loaded.*layer_norm"):
        checkpoint.load(env["ckpt"], [fresh], load_rng=False)


@pytest.mark.parametrize("name", list(SUBNETS))
def test_masked_equals_sliced_on_the_fused_layout(env, name):
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.training import checkpoint

    r, elastic = env["r"], env["elastic"]
    checkpoint.load(env["ckpt"], [elastic], load_rng=False)
    masks = ElasticMasks(elastic, r.model, r.elastic.axes, REMOVAL_ORDER)
    with torch.no_grad():
        masks.set_subnet(subnet(r.model, name))
        got = forward(elastic)
        masks.clear()
        assert (forward(elastic) - env["refs"]["parent"]).abs().max() <= TOL
    diff = float((got - env["refs"][name]).abs().max())
    print(f"fused layout, masked vs sliced {name}: {diff:.1e}")
    assert float((env["refs"][name] - env["refs"]["parent"]).abs().max()) > 1e-2 and diff <= TOL


def test_hard_router_choice_through_the_fused_norms(env):
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.elastic.router import ElasticRouter
    from pipeline.training import checkpoint

    r, m, elastic = env["r"], env["r"].model, env["elastic"]
    checkpoint.load(env["ckpt"], [elastic], load_rng=False)
    masks = ElasticMasks(elastic, m, r.elastic.axes, REMOVAL_ORDER)
    torch.manual_seed(0)
    router = ElasticRouter(r.elastic, m)
    choice = router(2, 1.0, 1.0, hard=True, generator=torch.Generator().manual_seed(4))
    sub = choice.argmax_subnet(m, REMOVAL_ORDER)
    assert sub.hidden < m.hidden_size  # the hidden mask is folded into the fused norms
    with torch.no_grad():
        masks.set_subnet(sub)
        want = forward(elastic)
    masks.set_choice(choice)
    got = forward(elastic)
    assert (got.detach() - want).abs().max() <= TOL
    (got - env["refs"]["parent"]).pow(2).mean().backward()
    assert router.mlps["hidden"][-1].weight.grad.abs().max() > 0
    masks.clear()
