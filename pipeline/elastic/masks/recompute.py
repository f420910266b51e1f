"""Elastic masks under activation recompute (``parallelism.recompute``: full or selective).

Two things break when a layer's forward is re-run in the backward (megatron's ``CheckpointFunction``):

1. The masks are attributes read at forward time. Under pipeline parallelism (1F1B) micro-batch k's
   backward -- and its recompute -- runs after later micro-batches set their own masks, so the recomputed
   forward would use another budget's masks. ``reapply_on_backward`` puts an identity on the micro-batch's
   output whose backward (the first node of that backward) re-applies k's masks, identically.
2. The masks carry the router's gradient (hard: straight-through max(p); soft: the mixture). Every
   checkpointed layer runs its own nested backward; through a shared mask graph the second one finds the
   router's graph already freed. So the modules get detached leaf copies of the masks: the nested backwards
   stop there and accumulate into the leaves, and ``push_router_grads`` (before megatron's gradient reduction)
   sends the leaves' gradients through the mask graph into the router once per micro-batch. The budget loss
   must use a second router forward (same seed, same values: ``ElasticTask``), whose graph the main backward
   consumes.

The values and gradients equal the run without recompute (tests/test_recompute.py).
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from pipeline.elastic.masks import ElasticMasks


class RecomputeMasks(ElasticMasks):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (mask in the router's graph, its leaf)
        self.applied = None

    def _leaf(self, t):
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            return t
        leaf = t.detach().requires_grad_(True)
        self.pending.append((t, leaf))
        return leaf

    def _apply(self, plan, share, skip, layer_weights, active) -> None:
        plan = {axis: {layer: self._leaf(t) for layer, t in by_layer.items()} for axis, by_layer in plan.items()}
        layer_weights = self._leaf(layer_weights)
        self.applied = (plan, share, skip, layer_weights, active)
        super()._apply(plan, share, skip, layer_weights, active)

    def reapply(self, applied) -> None:
        """Set the masks of an earlier ``_apply`` again (the same leaf tensors)."""
        if applied is not None:
            self.applied = applied
            super()._apply(*applied)

    def push_router_grads(self) -> None:
        """The leaves' gradients of every micro-batch since the last call, through the mask graphs into the
        router's parameters (one backward over all of them)."""
        pairs = [(src, leaf.grad) for src, leaf in self.pending if leaf.grad is not None]
        self.pending = []
        if pairs:
            torch.autograd.backward([s for s, _ in pairs], [g.to(s.dtype) for s, g in pairs])


class _ReapplyOnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, reapply: Callable[[], None]):
        ctx.reapply = reapply
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.reapply()
        return grad, None


def reapply_on_backward(output: torch.Tensor, masks: RecomputeMasks) -> torch.Tensor:
    """``output`` unchanged; its backward first re-applies the masks in force now (this micro-batch's)."""
    applied = masks.applied
    return _ReapplyOnBackward.apply(output, lambda: masks.reapply(applied))
