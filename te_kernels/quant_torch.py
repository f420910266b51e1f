"""FP8 (E4M3) and NVFP4 (E2M1 in blocks of 16, E4M3 block scales, FP32 global scale) in plain PyTorch.

The reference numerics of the project (CPU and GPU): the same expressions as nvidia-modelopt's export path
(``FP8QTensor`` / ``NVFP4QTensor`` quantize + dequantize), which is what vLLM's ModelOpt loader computes from
the exported tensors, so fake-quant training, export and the reader agree bit for bit
(tests/test_quant_numerics.py). ``te_kernels/quant_triton.py`` is the fused GPU kernel of the same function.

- FP8: scale s = amax / 448 (fp32); q = e4m3(clamp(x / s, +-448)); x' = q * s.
- NVFP4: global scale g = amax / (6 * 448) (fp32); per block of 16 along the last dim
  b = e4m3(clamp(block_amax / (6 g), 2^-9, 448)) (a zero block gets 1); q = E2M1 round-to-nearest-even of
  x / (b g) (saturating at 6); x' = q * (b g). Codes: 4 bits (sign << 3 | magnitude index), two per byte,
  the even element in the low nibble.
"""

from __future__ import annotations

from typing import Tuple

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
BLOCK = 16
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# round-to-nearest-even decision points between consecutive magnitudes: a value equal to a bound rounds to
# the even code (bounds 0.25, 1.25, 2.5, 5 go down; 0.75, 1.75, 3.5 go up)
_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_ROUND_UP_AT_BOUND = (False, True, False, True, False, True, False)


# ---- FP8 E4M3, per tensor
def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.float() / E4M3_MAX


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values of ``x / scale`` (saturating: a static input scale may see larger values)."""
    return (x.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def fp8_fake_quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    s = fp8_scale(amax)
    return fp8_dequantize(fp8_quantize(x, s), s, x.dtype)


# ---- NVFP4
def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.float() / (E2M1_MAX * E4M3_MAX)


def nvfp4_block_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn scale of every block of 16 along the last dim: shape ``(*x.shape[:-1], n / 16)``."""
    if x.shape[-1] % BLOCK:
        raise ValueError(f"NVFP4 needs the last dim ({x.shape[-1]}) to be a multiple of {BLOCK}")
    block_amax = x.float().abs().view(*x.shape[:-1], -1, BLOCK).amax(-1)
    scale = block_amax / (E2M1_MAX * global_scale.float())
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale.clamp(min=2.0 ** -9, max=E4M3_MAX).to(torch.float8_e4m3fn)


def _per_block(x: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The fp32 scale of each block (b * g), shaped to broadcast over ``x.view(..., n / 16, 16)``."""
    return (block_scales.float() * global_scale.float()).unsqueeze(-1)


def e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """4-bit codes (uint8) of already-scaled values: round to nearest even, saturate at 6, sign in bit 3."""
    mag = scaled.abs()
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for bound, up in zip(_BOUNDS, _ROUND_UP_AT_BOUND):
        code += (mag >= bound if up else mag > bound).to(torch.uint8)
    return code | ((scaled < 0).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of 4-bit codes (a negative zero code reads as +0, as modelopt's table)."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), device=codes.device)
    table[8] = 0.0
    return table[codes.long()]


def nvfp4_quantize(x: torch.Tensor, global_scale: torch.Tensor,
                   block_scales: torch.Tensor | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 of x's shape, block scales float8_e4m3fn); block scales computed from x unless given."""
    if block_scales is None:
        block_scales = nvfp4_block_scales(x, global_scale)
    blocks = x.float().view(*x.shape[:-1], -1, BLOCK)
    codes = e2m1_codes(blocks / _per_block(x, block_scales, global_scale))
    return codes.view(x.shape), block_scales


def nvfp4_dequantize(codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values = e2m1_values(codes).view(*codes.shape[:-1], -1, BLOCK)
    return (values * _per_block(codes, block_scales, global_scale)).view(codes.shape).to(dtype)


def nvfp4_fake_quant(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    g = nvfp4_global_scale(amax)
    codes, scales = nvfp4_quantize(x, g)
    return nvfp4_dequantize(codes, scales, g, x.dtype)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim, the even element in the low nibble."""
    return (codes[..., 1::2] << 4) | codes[..., 0::2]


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(*packed.shape[:-1], -1)


# ---- straight-through backward
def ste_grad(grad: torch.Tensor, x: torch.Tensor | None, amax: torch.Tensor | None) -> torch.Tensor:
    """Straight-through gradient, zero where the quantiser saturated (|x| > amax); ``x=None``: pass through
    (weights, whose amax is their own maximum)."""
    if x is None:
        return grad
    return torch.where(x.abs() <= amax.to(x.dtype), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
