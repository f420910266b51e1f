"""GPU + TE: ``model.moe_fused_grouped_mlp`` (megatron's TE op-fuser expert MLP: fc1 + weighted squared ReLU + fc2)
against the unfused TE experts on the same weights: logits and every gradient (fp32, TF32 off), with a next-token
loss so the router's probabilities carry gradient. The elastic student never takes the fused path (its masks sit on
fc1 / fc2): checked on the built modules. Run: ``bash tests/gpu/run.sh tests/gpu/test_fused_grouped_mlp.py``."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("transformer_engine", reason="the fused grouped MLP is a Transformer Engine path")

from conftest import TINY  # noqa: E402

TOL = 1e-4  # relative to each tensor's largest value; both paths run the same GEMMs in fp32


def _grouped_mlps(model):
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    return [m for m in model.modules() if isinstance(m, TEGroupedMLP)]


def test_fused_grouped_mlp_equals_the_unfused_experts(record):
    from pipeline import parallel
    from pipeline.config import load_recipe
    from pipeline.elastic.masks.spec import build_elastic_model
    from pipeline.model.build import build_model

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    base = ["model.backend=te"]
    plain_recipe = load_recipe(TINY, base)
    fused_recipe = load_recipe(TINY, base + ["model.moe_fused_grouped_mlp=true"])
    dev = parallel.initialize(plain_recipe)
    unfused = build_model(plain_recipe)
    fused = build_model(fused_recipe)
    fused.load_state_dict(unfused.state_dict())
    assert _grouped_mlps(fused) and all(m._with_fused_impl for m in _grouped_mlps(fused))
    assert not any(m._with_fused_impl for m in _grouped_mlps(unfused))
    assert not any(m._with_fused_impl for m in _grouped_mlps(build_elastic_model(fused_recipe)))

    tok = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(3)).to(dev)
    pos = torch.arange(256, device=dev)[None].expand(2, -1)
    labels = torch.roll(tok, -1, dims=1)
    out = {}
    for name, model in (("fused", fused), ("unfused", unfused)):
        model.zero_grad(set_to_none=True)
        loss = model(tok, pos, None, labels=labels).float().mean()
        loss.backward()
        with torch.no_grad():
            logits = model(tok, pos, None)
        out[name] = (loss.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None})
    (l_f, y_f, g_f), (l_u, y_u, g_u) = out["fused"], out["unfused"]
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()  # noqa: E731
    errs = {"loss": rel(l_f, l_u), "logits": rel(y_f, y_u), "grads": max(rel(g_f[n], g_u[n]) for n in g_u),
            "expert_grads": max(rel(g_f[n], g_u[n]) for n in g_u if ".experts." in n)}
    record("TE fused grouped MLP vs unfused experts (fp32, tiny)", errs)
    assert set(g_f) == set(g_u) and max(errs.values()) < TOL, errs
    parallel.shutdown()
