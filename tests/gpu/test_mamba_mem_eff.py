"""GPU: megatron's memory-efficient Mamba path (mamba_split_conv1d_scan_combined, causal-conv1d or the
te_kernels stand-in) against the unfused path (conv1d -> SSD -> gated norm), on the elastic tiny model with a
Mamba head mask and a hidden mask set: logits and every gradient, bf16-free (fp32).
Run: ``bash tests/gpu/run.sh tests/gpu/test_mamba_mem_eff.py`` (tests/gpu/RESULTS.md)."""

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("mamba_ssm", reason="the fused Mamba path needs mamba-ssm on the GPU machine")

from elastic_worker import subnet, recipe  # noqa: E402

TOL = 5e-3  # TF32 inside Triton's tl.dot (RESULTS.md: SSD fp32 agreement 1.6e-3)


def test_mem_eff_path_equals_the_unfused_path(record):
    from megatron.core.ssm.mamba_mixer import MambaMixer

    from pipeline import parallel
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.elastic.masks.spec import build_elastic_model
    from pipeline.model.build import mamba_mem_eff_available

    r = recipe(["model.backend=local"])
    dev = parallel.initialize(r)
    assert mamba_mem_eff_available()  # causal-conv1d, or the stand-in registered by pipeline.model
    model = build_elastic_model(r)
    masks = ElasticMasks(model, r.model, r.elastic.axes)
    masks.set_subnet(subnet(r.model, "widths"))  # hidden and Mamba head masks on
    tok = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(3)).to(dev)
    pos = torch.arange(256, device=dev)[None].expand(2, -1)
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    assert mixers and all(m.use_mem_eff_path for m in mixers)
    out = {}
    for fused in (True, False):
        for m in mixers:
            m.use_mem_eff_path = fused
        model.zero_grad(set_to_none=True)
        logits = model(tok, pos, None)
        (logits.float() * torch.linspace(-1, 1, logits.shape[-1], device=dev)).sum().backward()
        out[fused] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (y, g), (y_ref, g_ref) = out[True], out[False]
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()  # noqa: E731
    errs = {"logits": rel(y, y_ref), "grads": max(rel(g[n], g_ref[n]) for n in g_ref)}
    record("mem-eff vs unfused Mamba path (fp32, masked)", errs)
    assert set(g) == set(g_ref) and max(errs.values()) < TOL, errs
    parallel.shutdown()
