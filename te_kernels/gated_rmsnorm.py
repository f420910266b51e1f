"""Gated group RMSNorm of the Mamba-2 mixer output, in plain PyTorch.

Same contract as ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` with ``norm_before_gate=False``:
y = rmsnorm_per_group(x * silu(z)) * weight, groups of ``group_size`` contiguous channels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def gated_rmsnorm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=False):
    dtype = x.dtype
    f = torch.promote_types(dtype, torch.float32)
    x = x.to(f)
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.to(f))
    shape = x.shape
    g = group_size or shape[-1]
    xg = x.reshape(*shape[:-1], shape[-1] // g, g)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    y = xg.reshape(shape) * weight.to(f)
    if z is not None and norm_before_gate:
        y = y * F.silu(z.to(f))
    return y.to(dtype)


class GatedRMSNorm(nn.Module):
    """Drop-in for mamba-ssm's Triton ``RMSNorm`` (gated, grouped); parameter ``weight`` only."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=False, device=None,
                 dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        return gated_rmsnorm(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)
