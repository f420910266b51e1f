"""The elastic router as a submodule of each student model chunk.

Living inside the chunk gives the router megatron's DDP gradient buffers, the optimizer (with its own LR
multiplier), gradient clipping and dist checkpoints for free. Every rank holds an identical copy: it is
initialised from a fixed seed, its gradients are summed over the tensor- and pipeline-parallel groups (each
rank's masks touch only its own heads, channels, sequence shard and layers) and averaged over data-parallel
ranks by DDP, so the copies stay equal.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

SLOT = "elastic_router"  # the submodule name; also the checkpoint key prefix


class RouterSlot(torch.nn.Module):
    def __init__(self, router: torch.nn.Module):
        super().__init__()
        self.router = router

    def forward(self, *args, **kwargs):
        return self.router(*args, **kwargs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> Dict[str, ShardedTensor]:
        """Replicated on every rank; global rank 0 holds the main replica."""
        replica = 0 if dist.get_rank() == 0 else 1
        return {f"{prefix}{name}": ShardedTensor.from_rank_offsets(f"{prefix}{name}", t, replica_id=replica)
                for name, t in self.state_dict(keep_vars=True).items()}


def attach(model: torch.nn.Module, router: torch.nn.Module, seed: int) -> RouterSlot:
    """Add ``router`` to a bare HybridModel chunk, re-initialised identically on every rank."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            fresh = torch.empty(p.shape, dtype=torch.float32)
            if p.dim() > 1:
                torch.nn.init.kaiming_uniform_(fresh, a=5 ** 0.5, generator=gen)
            else:
                fresh.uniform_(-0.01, 0.01, generator=gen)
            p.copy_(fresh)
    param = next(iter(model.parameters()))
    slot = RouterSlot(router.to(device=param.device))
    # megatron's grad norm sums over TP x PP ranks: TP copies count on TP rank 0 only (not TP-partitioned),
    # PP copies must be marked shared on all but the first stage, or clipping sees them pp times
    for p in slot.parameters():
        p.shared = not parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    model.add_module(SLOT, slot)
    return slot


def sync_grads(slot: RouterSlot) -> None:
    """Sum the router's gradients over TP and PP (partial contributions); DDP then averages over DP."""
    groups = []
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        groups.append(parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        groups.append(parallel_state.get_pipeline_model_parallel_group())
    if not groups:
        return
    for p in slot.parameters():
        grad = getattr(p, "main_grad", None)
        if grad is None:
            grad = p.grad
        if grad is None:
            continue
        for g in groups:
            dist.all_reduce(grad, group=g)
