"""Mamba-2 SSD (state-space duality) in plain PyTorch: forward and backward through autograd.

Stands in for mamba-ssm's Triton ``mamba_chunk_scan_combined`` on machines without Triton/CUDA (CPU CI)
with the same signature and semantics; ``tests/gpu/test_mamba_kernels.py`` checks it against the Triton
kernel on the GPU and ``tests/test_ssd_torch.py`` against a sequential scan in float64.

The chunked algorithm follows the Mamba-2 paper (Dao & Gu, 2024, listing 1): quadratic attention-like form
inside each chunk, a linear recurrence over chunk states between chunks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sums: out[..., i, j] = sum(x[..., j+1 : i+1]) for j <= i, -inf above the diagonal."""
    t = x.size(-1)
    x = x.unsqueeze(-1).expand(*x.shape, t)
    strict = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict, 0)
    out = torch.cumsum(x, dim=-2)
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def ssd_chunked(
    x: torch.Tensor,  # (b, l, h, p), already multiplied by dt
    a: torch.Tensor,  # (b, l, h), A * dt
    b: torch.Tensor,  # (b, l, h, n)
    c: torch.Tensor,  # (b, l, h, n)
    chunk: int,
    initial_states: Optional[torch.Tensor] = None,  # (b, h, p, n)
) -> Tuple[torch.Tensor, torch.Tensor]:
    bsz, length, heads, p = x.shape
    pad = (-length) % chunk
    if pad:
        x, b, c = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, b, c))
        a = F.pad(a, (0, 0, 0, pad))
    nc = x.shape[1] // chunk
    x = x.reshape(bsz, nc, chunk, heads, p)
    b = b.reshape(bsz, nc, chunk, heads, -1)
    c = c.reshape(bsz, nc, chunk, heads, -1)
    a = a.reshape(bsz, nc, chunk, heads).permute(0, 3, 1, 2)  # b h c l
    a_cum = torch.cumsum(a, dim=-1)

    # 1. intra-chunk (diagonal blocks)
    decay = torch.exp(segsum(a))  # b h c l s
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", c, b, decay, x)
    # 2. state at the end of each chunk
    decay_states = torch.exp(a_cum[..., -1:] - a_cum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", b, decay_states, x)
    # 3. recurrence over chunks
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    else:
        initial_states = initial_states.unsqueeze(1).to(states.dtype)
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # b h (c+1) (c+1)
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. contribution of the carried state to each position
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", c, states, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(bsz, nc * chunk, heads, p)
    return y[:, :length], final_state


def mamba_chunk_scan_combined(
    x: torch.Tensor,  # (b, l, h, p)
    dt: torch.Tensor,  # (b, l, h)
    A: torch.Tensor,  # (h,)
    B: torch.Tensor,  # (b, l, g, n)
    C: torch.Tensor,  # (b, l, g, n)
    chunk_size: int,
    D: Optional[torch.Tensor] = None,  # (h,) or (h, p)
    z: Optional[torch.Tensor] = None,  # (b, l, h, p)
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx=None,
    cu_seqlens=None,
    dt_softplus: bool = False,
    dt_limit=(0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    state_dtype=None,
):
    """Same contract as ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`` (no varlen)."""
    if seq_idx is not None or cu_seqlens is not None or return_varlen_states:
        raise ValueError("packed sequences (seq_idx/cu_seqlens) need mamba-ssm's Triton kernels (GPU)")
    out_dtype = x.dtype
    f = torch.promote_types(x.dtype, torch.float32)  # compute in fp32 (fp64 stays fp64 for tests)
    heads, groups = x.shape[2], B.shape[2]
    dt = dt.to(f)
    if dt_bias is not None:
        dt = dt + dt_bias.to(f)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    rep = heads // groups  # head h reads group h // rep
    Bh = B.to(f).repeat_interleave(rep, dim=2)
    Ch = C.to(f).repeat_interleave(rep, dim=2)
    xf = x.to(f)
    y, final = ssd_chunked(xf * dt.unsqueeze(-1), A.to(f) * dt, Bh, Ch, chunk_size, initial_states)
    if D is not None:
        Df = D.to(f)
        y = y + xf * (Df.unsqueeze(-1) if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(out_dtype)
    return (y, final) if return_final_states else y


def ssd_sequential(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True):
    """Token-by-token recurrence (the definition); the float64 reference for tests."""
    heads, groups = x.shape[2], B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    rep = heads // groups
    Bh, Ch = B.repeat_interleave(rep, dim=2), C.repeat_interleave(rep, dim=2)
    state = x.new_zeros(x.shape[0], heads, x.shape[3], B.shape[3])
    ys = []
    for t in range(x.shape[1]):
        da = torch.exp(A * dt[:, t])  # b h
        state = state * da[..., None, None] + torch.einsum(
            "bh,bhp,bhn->bhpn", dt[:, t], x[:, t], Bh[:, t]
        )
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D.unsqueeze(-1) if D.dim() == 1 else D)
    return y, state
