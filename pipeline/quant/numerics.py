"""Fake quantisation with straight-through gradients, and whole-tensor quantisation for export.

The numbers are ``te_kernels/quant_torch.py``'s (nvidia-modelopt's export numerics); on CUDA the fused Triton
kernel (``te_kernels/quant_triton.py``) computes the same bits. Weights pass their gradient straight through
(their amax is their own maximum: nothing saturates); activations, quantised with a static calibrated amax,
get a zero gradient where they saturated.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from te_kernels import quant_torch as ref

FORMATS = ("fp8", "nvfp4")


def _triton_ok(x: torch.Tensor) -> bool:
    if not x.is_cuda or os.environ.get("PIPELINE_QUANT_TORCH"):  # the reference on GPU too (tests, debugging)
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fake_quant_values(x: torch.Tensor, amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantise-dequantise without autograd."""
    if _triton_ok(x):
        from te_kernels import quant_triton

        return quant_triton.fake_quant(x, amax, fmt)
    return ref.nvfp4_fake_quant(x, amax) if fmt == "nvfp4" else ref.fp8_fake_quant(x, amax)


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, amax, fmt: str, clip: bool):
        ctx.clip = clip
        if clip:
            ctx.save_for_backward(x, amax)
        return fake_quant_values(x, amax, fmt)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.clip:
            return grad, None, None, None
        x, amax = ctx.saved_tensors
        if _triton_ok(grad):
            from te_kernels import quant_triton

            return quant_triton.ste_grad(grad, x, amax), None, None, None
        return ref.ste_grad(grad, x, amax), None, None, None


def fake_quant(x: torch.Tensor, amax: torch.Tensor, fmt: str, clip: bool) -> torch.Tensor:
    """``fmt`` (fp8 | nvfp4) quantise-dequantise of ``x`` with per-tensor ``amax`` (a 0-d fp32 tensor);
    ``clip``: zero gradient where |x| > amax (activations), else straight through (weights)."""
    return _FakeQuant.apply(x, amax, fmt, clip)


def quantize_weight(w: torch.Tensor, fmt: str, amax: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The exported tensors of one weight (ModelOpt HF layout, without input_scale):
    fp8 -> {weight: float8_e4m3fn, weight_scale: fp32 []}; nvfp4 -> {weight: uint8 [out, in / 2] packed E2M1,
    weight_scale: float8_e4m3fn [out, in / 16], weight_scale_2: fp32 []}. ``amax`` defaults to the weight's."""
    amax = (w.float().abs().amax() if amax is None else amax).float().reshape(())
    if fmt == "fp8":
        scale = ref.fp8_scale(amax)
        return {"weight": ref.fp8_quantize(w, scale), "weight_scale": scale}
    g = ref.nvfp4_global_scale(amax)
    codes, block_scales = ref.nvfp4_quantize(w, g)
    return {"weight": ref.pack_fp4(codes), "weight_scale": block_scales, "weight_scale_2": g}


def dequantize_weight(t: Dict[str, torch.Tensor], fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if fmt == "fp8":
        return ref.fp8_dequantize(t["weight"], t["weight_scale"], dtype)
    return ref.nvfp4_dequantize(ref.unpack_fp4(t["weight"]), t["weight_scale"], t["weight_scale_2"], dtype)


def input_scale(amax: float, fmt: str) -> torch.Tensor:
    """The exported static activation scale: amax / 448 (fp8) or the NVFP4 global scale amax / (6 * 448)."""
    a = torch.tensor(float(amax), dtype=torch.float32)
    return ref.fp8_scale(a) if fmt == "fp8" else ref.nvfp4_global_scale(a)


