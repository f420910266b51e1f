"""GPU: the fused Triton fake-quant kernels (te_kernels/quant_triton.py) == the PyTorch reference, bit for bit.

The reference runs on the CPU on the same values (te_kernels/quant_torch.py, itself == nvidia-modelopt's export
numerics: tests/test_quant_numerics.py). Shapes cover a ragged last program (rows not a multiple of the tile),
inputs span six decades, one all-zero block, and values beyond a static amax (saturation, zero STE gradient).
Throughput: bench/bench_fake_quant.py.
"""

import pytest
import torch

from te_kernels import quant_torch as ref

pytestmark = pytest.mark.gpu


def _inputs(dtype, rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 2, cols)[torch.randperm(cols, generator=g)]
    x[1, 16:32] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1037, 2688), (3, 16)])
@pytest.mark.parametrize("amax_scale", [1.0, 0.25])  # the tensor's own amax (weights), a smaller static one
def test_triton_equals_reference(record, dtype, fmt, shape, amax_scale):
    from te_kernels import quant_triton

    x = _inputs(dtype, *shape)
    amax = x.float().abs().amax() * amax_scale
    want = ref.nvfp4_fake_quant(x, amax) if fmt == "nvfp4" else ref.fp8_fake_quant(x, amax)
    got = quant_triton.fake_quant(x.cuda(), amax.cuda(), fmt).cpu()
    mismatch = int((got != want).sum())
    if mismatch:
        record("mismatch", {"fmt": fmt, "dtype": str(dtype), "shape": shape, "elements": mismatch})
    assert torch.equal(got, want)
    # the same reference on the GPU (PyTorch CUDA ops) agrees too
    assert torch.equal(ref.nvfp4_fake_quant(x.cuda(), amax.cuda()).cpu() if fmt == "nvfp4"
                       else ref.fp8_fake_quant(x.cuda(), amax.cuda()).cpu(), want)


def test_ste_backward_equals_reference():
    from pipeline.quant.numerics import fake_quant

    x = _inputs(torch.bfloat16, 1037, 2688).cuda().requires_grad_(True)
    amax = x.detach().float().abs().amax() * 0.25
    g = torch.randn_like(x)
    fake_quant(x, amax, "nvfp4", clip=True).backward(g)
    assert torch.equal(x.grad, ref.ste_grad(g, x.detach(), amax))
    assert (x.grad == 0).any() and (x.grad != 0).any()


def test_modelopt_triton_fake_quant_agreement(record):
    """modelopt's Hopper fp4_fake_quant_block on the same tensors: reported (it treats tiny block scales
    differently: < 1e-5 -> 1 where the export path clamps at 2^-9), not required equal."""
    pytest.importorskip("modelopt")
    from modelopt.torch.kernels.quantization.gemm.fp4_kernel_hopper import fp4_fake_quant_block

    x = _inputs(torch.bfloat16, 4096, 4096).cuda()
    amax = x.float().abs().amax()
    ours = ref.nvfp4_fake_quant(x, amax)
    theirs = fp4_fake_quant_block(x, amax)
    frac = float((ours != theirs).float().mean())
    record("modelopt fp4_fake_quant_block vs ours", {"differing_fraction": frac})
    assert frac < 1e-3
