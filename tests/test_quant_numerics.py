"""Our FP8 / NVFP4 numerics == nvidia-modelopt's export numerics, bit for bit (CPU).

modelopt's ``FP8QTensor`` / ``NVFP4QTensor`` quantize + dequantize are the reference (the tensors vLLM's
ModelOpt loader reads). Inputs span six decades of magnitude, include an all-zero block, values on every
E2M1 rounding boundary (ties to even) and beyond the scale (saturation).
"""

import pytest
import torch

from te_kernels import quant_torch as ref



def _modelopt():
    from modelopt.torch.quantization.qtensor import FP8QTensor, NVFP4QTensor

    return FP8QTensor, NVFP4QTensor


def _tensor(dtype, seed=0, rows=48, cols=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 2, cols)[torch.randperm(cols, generator=g)]
    x[5, 32:48] = 0.0  # an all-zero block: scale 1
    return x.to(dtype)


def _boundaries(dtype):
    """Blocks whose scaled values sit exactly on every rounding bound (block amax 6 -> block scale 1)."""
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0,
                           0.1])
    return torch.stack([bounds, bounds * 0.5, bounds * 2.0, bounds * 1e-3]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("make", ["random", "boundaries"])
def test_nvfp4_equals_modelopt(dtype, make):
    _, NVFP4QTensor = _modelopt()
    x = _tensor(dtype) if make == "random" else _boundaries(dtype)
    amax = x.float().abs().amax()
    g = ref.nvfp4_global_scale(amax)
    qt, block_scales, g_mo = NVFP4QTensor.quantize(x.clone(), ref.BLOCK)
    codes, ours = ref.nvfp4_quantize(x, g)
    assert g.dtype == torch.float32 and torch.equal(g, g_mo)  # global scale amax / (6 * 448)
    assert torch.equal(ours.view(torch.uint8), block_scales.view(torch.uint8))  # E4M3 block scales, bit for bit
    assert torch.equal(ref.pack_fp4(codes), qt._quantized_data)  # packed E2M1 bytes
    assert torch.equal(ref.unpack_fp4(ref.pack_fp4(codes)), codes)
    deq = qt.dequantize(dtype=torch.float32, scale=block_scales, double_scale=g_mo, block_sizes={-1: ref.BLOCK})
    assert torch.equal(ref.nvfp4_dequantize(codes, ours, g), deq)
    assert torch.equal(ref.nvfp4_fake_quant(x, amax), deq.to(dtype))
    if make == "boundaries":  # ties to even on the block of scale 1: 0.25->0, 0.75->1, 1.25->1, 1.75->2, ...
        row = ref.nvfp4_fake_quant(x.float(), amax)[0, :8]
        assert row.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def test_nvfp4_static_scale_saturates_like_modelopt():
    """A global scale from a smaller amax (a calibrated activation): blocks above it saturate at 448 / 6."""
    _, NVFP4QTensor = _modelopt()
    x = _tensor(torch.float32, seed=3)
    g = ref.nvfp4_global_scale(x.abs().amax() / 8)
    qt, block_scales, _ = NVFP4QTensor.quantize(x.clone(), ref.BLOCK, weights_scaling_factor_2=g)
    codes, ours = ref.nvfp4_quantize(x, g)
    assert torch.equal(ours.view(torch.uint8), block_scales.view(torch.uint8))
    assert torch.equal(ref.pack_fp4(codes), qt._quantized_data)
    assert (ours.float() == 448).any() and (codes & 7 == 7).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_equals_modelopt(dtype):
    FP8QTensor, _ = _modelopt()
    x = _tensor(dtype, seed=1)
    amax = x.float().abs().amax()
    s = ref.fp8_scale(amax)
    # bf16 is compared through its exact fp32 copy: we divide in fp32, where modelopt's 0-d scale keeps a bf16
    # tensor's division in bf16 (rounded twice)
    qt, s_mo = FP8QTensor.quantize(x.float(), scales=s)
    assert torch.equal(s, FP8QTensor.quantize(x.float())[1])  # per-tensor scale amax / 448 (fp32)
    q = ref.fp8_quantize(x, s)
    assert torch.equal(q.view(torch.uint8), qt._quantized_data.view(torch.uint8))
    assert torch.equal(ref.fp8_dequantize(q, s), qt.dequantize(dtype=torch.float32, scale=s_mo))
    assert torch.equal(ref.fp8_fake_quant(x, amax), qt.dequantize(dtype=torch.float32, scale=s_mo).to(dtype))


def test_fp8_fake_quant_equals_modelopt_eager_within_rounding_of_the_scale():
    """modelopt's training-time FP8 fake quant multiplies by 448 / amax where export divides by amax / 448: the two
    agree except where that last-bit difference moves a value across a rounding point."""
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    x = _tensor(torch.float32, seed=2)
    amax = x.abs().amax()
    ours, theirs = ref.fp8_fake_quant(x, amax), fp8_eager(x, amax)
    assert (ours != theirs).float().mean() < 1e-3


def test_straight_through_gradients():
    from pipeline.quant.numerics import fake_quant

    x = torch.tensor([[-3.0, -1.0, 0.5, 2.0] * 4], requires_grad=True)
    amax = torch.tensor(2.0)
    fake_quant(x, amax, "nvfp4", clip=True).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0] * 4]  # zero where |x| > amax (saturated)
    x.grad = None
    fake_quant(x, amax, "fp8", clip=False).sum().backward()
    assert x.grad.tolist() == [[1.0] * 16]


def test_quantize_weight_roundtrip_and_config_matches_modelopt():
    from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

    from pipeline.quant.export import config_quantization, hf_quant_config
    from pipeline.quant.numerics import dequantize_weight, quantize_weight

    w = _tensor(torch.bfloat16, seed=4)
    for fmt in ("fp8", "nvfp4"):
        t = quantize_weight(w, fmt)
        fake = ref.fp8_fake_quant(w, w.float().abs().amax()) if fmt == "fp8" else ref.nvfp4_fake_quant(
            w, w.float().abs().amax())
        assert torch.equal(dequantize_weight(t, fmt, torch.bfloat16), fake)
        for kv in ("none", "fp8"):
            hfq = hf_quant_config(fmt, ["lm_head", "backbone.layers.0.mixer.gate"], kv)
            assert config_quantization(hfq) == convert_hf_quant_config_format(hfq)


INTERPRETED = r"""
import torch
from te_kernels import quant_torch as ref, quant_triton
for shape in ((64, 256), (3, 16), (37, 96)):
    x = _x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * torch.logspace(-4, 2, shape[1])
    x[0, :16] = 0.0
    for scale in (1.0, 0.25):
        amax = x.abs().amax() * scale
        for fmt, tile in (("nvfp4", 64), ("fp8", 1024)):
            want = ref.nvfp4_fake_quant(x, amax) if fmt == "nvfp4" else ref.fp8_fake_quant(x, amax)
            assert torch.equal(quant_triton.fake_quant(x, amax, fmt, tile=tile), want), (shape, scale, fmt)
g = torch.randn(37, 96)
assert torch.equal(quant_triton.ste_grad(g, x, amax), ref.ste_grad(g, x, amax))
print("ok")
"""


def test_triton_kernel_equals_reference_in_the_interpreter():
    """The Triton kernels' arithmetic on CPU (TRITON_INTERPRET=1), fp32 in and out: the same bits as the reference
    (E4M3 rounding is integer arithmetic in the kernel; the interpreter's own fp32 -> bf16 store truncates, so bf16
    outputs are checked on the GPU only: tests/gpu/test_quant_kernels.py)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
