"""Fused FP8 / NVFP4 quantise-dequantise (forward) and straight-through backward as Triton kernels (GPU).

The function is ``te_kernels/quant_torch.py``'s, bit for bit (tests/gpu/test_quant_kernels.py): one read of
the input and one write of the output per pass, scales computed in registers, no copy of the weight; tile sizes
autotuned per size class. Divisions use ``div_rn`` (IEEE round-to-nearest, as PyTorch) and E4M3 rounding is
round-to-nearest-even after the same clamp as the reference, in integer arithmetic (``_e4m3_round``: bit-exact
in the Triton interpreter on CPU too, tests/test_quant_numerics.py). Hopper has no NVFP4 GEMM (TE refuses its
NVFP4 recipe there), so QAD emulates it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 16


@triton.jit
def _e2m1_round(mag):
    """|x| / scale -> nearest E2M1 magnitude, ties to even, saturating at 6 (as quant_torch.e2m1_codes)."""
    return tl.where(mag <= 0.25, 0.0,
           tl.where(mag < 0.75, 0.5,
           tl.where(mag <= 1.25, 1.0,
           tl.where(mag < 1.75, 1.5,
           tl.where(mag <= 2.5, 2.0,
           tl.where(mag < 3.5, 3.0,
           tl.where(mag <= 5.0, 4.0, 6.0)))))))


@triton.jit
def _e4m3_round(v):
    """float8_e4m3fn round-to-nearest-even of fp32 values already clamped to +-448, as fp32 (what PyTorch's
    cast gives). In integer / fp32 arithmetic rather than the hardware cast, so TRITON_INTERPRET checks it too:
    normals keep 3 mantissa bits (round half to even on the bit pattern); below 2^-6 the subnormal grid is
    2^-9, reached by the add-and-subtract of 2^14 (whose fp32 ulp is 2^-9)."""
    a = tl.abs(v)
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # -1048576 = ~0xFFFFF
    sub = (a + 16384.0) - 16384.0
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(v < 0.0, -r, r)


@triton.autotune(configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in ((64, 4), (128, 4), (256, 8), (512, 8))],
                 key=["size_class"])
@triton.jit
def _nvfp4_fwd(x_ptr, y_ptr, amax_ptr, n_elements, size_class, ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.math.div_rn(tl.load(amax_ptr).to(tl.float32), 6.0 * 448.0)
    block_amax = tl.max(tl.abs(x), axis=1)
    b = tl.math.div_rn(block_amax, 6.0 * g)
    b = tl.where(b == 0.0, 1.0, b)
    b = tl.minimum(tl.maximum(b, 0.001953125), 448.0)
    b = _e4m3_round(b)
    per_block = (b * g)[:, None]
    mag = _e2m1_round(tl.math.div_rn(tl.abs(x), per_block))
    y = tl.where(x < 0.0, -mag, mag) * per_block
    y = tl.where(mag == 0.0, 0.0, y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=[triton.Config({"BLOCK_N": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))],
                 key=["size_class"])
@triton.jit
def _fp8_fwd(x_ptr, y_ptr, amax_ptr, n_elements, size_class, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.math.div_rn(tl.load(amax_ptr).to(tl.float32), 448.0)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, s), -448.0), 448.0)
    y = _e4m3_round(q) * s
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ste_bwd(g_ptr, x_ptr, amax_ptr, out_ptr, n_elements, BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n_elements
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    amax = tl.load(amax_ptr).to(x.dtype)
    tl.store(out_ptr + offs, tl.where(tl.abs(x) <= amax, g, 0.0).to(g.dtype), mask=mask)


def fake_quant(x: torch.Tensor, amax: torch.Tensor, fmt: str, tile: int = 0) -> torch.Tensor:
    """Quantise-dequantise of a CUDA tensor (NVFP4: blocks of 16 along the last dim); ``tile``: a fixed tile
    (blocks of 16 per program for NVFP4, elements for FP8) instead of the autotuned one (TRITON_INTERPRET runs)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    amax = amax.reshape(1).float()
    size_class = max(n, 1).bit_length()  # autotune per power of two (MoE activations change size every step)
    if fmt == "nvfp4":
        if x.shape[-1] % BLOCK:
            raise ValueError(f"NVFP4 needs the last dim ({x.shape[-1]}) to be a multiple of {BLOCK}")
        if tile:
            _nvfp4_fwd.fn[(triton.cdiv(n // BLOCK, tile),)](x, y, amax, n, size_class, ROWS=tile, BLOCK_SIZE=BLOCK)
        else:
            _nvfp4_fwd[lambda meta: (triton.cdiv(n // BLOCK, meta["ROWS"]),)](x, y, amax, n, size_class,
                                                                              BLOCK_SIZE=BLOCK)
    elif fmt == "fp8":
        if tile:
            _fp8_fwd.fn[(triton.cdiv(n, tile),)](x, y, amax, n, size_class, BLOCK_N=tile)
        else:
            _fp8_fwd[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](x, y, amax, n, size_class)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return y


def ste_grad(grad: torch.Tensor, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    grad, x = grad.contiguous(), x.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    _ste_bwd[(triton.cdiv(n, 2048),)](grad, x, amax.reshape(1).float(), out, n, BLOCK_N=2048, num_warps=8)
    return out
