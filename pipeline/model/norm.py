"""RMSNorm for the local (non-TE) spec that, unlike megatron's ``WrappedTorchNorm``, supports sequence
parallelism (required for MoE under TP): its weight is marked ``sequence_parallel`` so megatron's DDP
all-reduces its gradient over the TP group, exactly as it does for ``TENorm``."""

from __future__ import annotations

import torch
from torch import nn

from megatron.core.transformer import TransformerConfig


class RMSNorm(nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)
