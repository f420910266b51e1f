"""Running sums of per-unit activation statistics and their reduction across DP / TP / EP ranks.

Every statistic is a mean over tokens, kept as (sum, tokens) in float64 and reduced as sums, so a rank that
saw the same tokens as another (a replica) scales both by the same factor and the mean is unchanged. What
differs is which ranks hold *different units* (gathered) and which hold *different tokens* (summed):

- ``RESIDUAL`` (norm outputs, all hidden channels on every rank): tokens differ over DP (with CP) and, under
  sequence parallelism, over TP: summed over both (without SP the TP ranks are replicas).
- ``TP_SHARDED`` (attention / Mamba heads, dense and shared-expert FFN channels): all tokens of the DP rank,
  units split over TP: summed over DP, gathered over TP along ``gather_dim``.
- ``EXPERT`` (routed experts): each expert-data-parallel replica saw the tokens routed to it from its own
  dispatch domain: summed over expert DP; FFN channels gathered over expert TP, experts over EP (dim 0).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

RESIDUAL, TP_SHARDED, EXPERT = "residual", "tp_sharded", "expert"


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` in group-rank order."""
    if _size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def all_sum(t: torch.Tensor, groups: Sequence) -> torch.Tensor:
    for g in groups:
        if _size(g) > 1:
            dist.all_reduce(t, group=g)
    return t


class Stat:
    """Per-unit sums of one statistic, ``shape`` units; ``tokens`` has shape ``count_shape`` (per unit or one
    count for all, broadcast from the left)."""

    def __init__(self, scope: str, shape: Tuple[int, ...], device, count_shape: Tuple[int, ...] = (),
                 gather_dim: int = 0, channel_dim: Optional[int] = None):
        self.scope, self.gather_dim, self.channel_dim = scope, gather_dim, channel_dim
        self.total = torch.zeros(shape, dtype=torch.float64, device=device)
        # one count for all units stays on the host (no kernel per hook call); per-unit counts on the device
        self.tokens = torch.zeros(count_shape, dtype=torch.float64, device=device) if count_shape else 0.0

    def add(self, values: torch.Tensor, tokens, index=None) -> None:
        """Sums of one batch (any float dtype: accumulated in float64) and the tokens they cover."""
        if index is None:
            self.total.add_(values)
            self.tokens += tokens
        else:
            self.total[index].add_(values)
            self.tokens[index] += tokens

    def add_segments(self, values: torch.Tensor, segment: torch.Tensor, counts: torch.Tensor) -> None:
        """Per-row ``values`` summed into unit ``segment[row]``; ``counts`` rows per unit."""
        self.total.index_add_(0, segment, values.double())
        self.tokens += counts

    def finish(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean over tokens, tokens): reduced, then gathered to the global unit shape (on every rank)."""
        tokens = torch.as_tensor(self.tokens, dtype=torch.float64, device=self.total.device)
        packed = torch.cat([self.total.flatten(), tokens.flatten()])
        if self.scope == RESIDUAL:
            groups = [ps.get_data_parallel_group(with_context_parallel=True), ps.get_tensor_model_parallel_group()]
        elif self.scope == TP_SHARDED:
            groups = [ps.get_data_parallel_group(with_context_parallel=True)]
        else:
            groups = [ps.get_expert_data_parallel_group()]
        all_sum(packed, groups)
        total = packed[:self.total.numel()].view_as(self.total)
        tokens = packed[self.total.numel():].view_as(tokens)
        mean = total / tokens.clamp(min=1).reshape(tokens.shape + (1,) * (total.dim() - tokens.dim()))
        if self.scope == TP_SHARDED:
            mean = gather(mean, self.gather_dim, ps.get_tensor_model_parallel_group())
        elif self.scope == EXPERT:
            if self.channel_dim is not None:
                mean = gather(mean, self.channel_dim, ps.get_expert_tensor_parallel_group())
            ep = ps.get_expert_model_parallel_group()
            mean, tokens = gather(mean, 0, ep), gather(tokens, 0, ep)
        return mean.float(), tokens
