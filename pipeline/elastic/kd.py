"""Knowledge distillation loss and budget sampling of the elastic stages.

``forward_kl`` is KL(teacher || student) per token on full-vocabulary logits. Under tensor parallelism the
logits are sharded along the vocabulary (HybridModel with ``parallel_output=True``): the max and the sum of
exponentials of each log-softmax, and the KL sum itself, are reduced over the TP group. The reductions use
megatron's ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward): the loss is
replicated on every TP rank, so each rank back-propagates into its own vocabulary shard only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist


def _tp_group(group):
    if group is not None:
        return group
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over the vocabulary shards (identity backward: the result is replicated)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


def _shift_and_lse(logits: torch.Tensor, group):
    """(logits - max, log-sum-exp of that over the full vocabulary): log_softmax = shifted - lse."""
    top = logits.detach().max(dim=-1, keepdim=True).values  # a constant shift: exact and gradient-free
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - top
    return shifted, torch.log(_sum(shifted.exp().sum(dim=-1, keepdim=True), group))


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: Optional[torch.Tensor],
               temperature: float = 1.0, group=None) -> torch.Tensor:
    """Per-token KL(teacher || student) [leading dims of the logits, e.g. b, s], times ``loss_mask``.

    Softmaxes at ``temperature`` (the KL is scaled by T^2, Hinton's convention, so gradients keep their
    size); computed in fp32; no gradient into the teacher. ``group``: the vocabulary-parallel group
    (default megatron's TP group when initialised).

    KL = sum_v p_t (log p_t - shifted_s) + lse_s, using sum_v p_t = 1: written so, each rank's gradient
    (identity backward of the reductions) is the exact p_s - p_t on its shard."""
    group = _tp_group(group)
    shifted, lse = _shift_and_lse(student_logits.float() / temperature, group)
    with torch.no_grad():
        t_shifted, t_lse = _shift_and_lse(teacher_logits.float() / temperature, group)
        log_t = t_shifted - t_lse
    kl = _sum((log_t.exp() * (log_t - shifted)).sum(dim=-1), group) + lse.squeeze(-1)
    kl = kl * temperature ** 2
    return kl if loss_mask is None else kl * loss_mask.to(kl.dtype)


def sample_budget(seed: int, iteration: int, micro_batch: int, weights: Sequence[float]) -> int:
    """Index of the budget a micro-batch trains, drawn with probabilities ``weights`` (normalised; pass equal
    weights for uniform sampling). A pure function of (seed, iteration, micro_batch): identical on every rank, and
    a resumed run draws the same budgets."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"budget weights must be non-negative with a positive sum, got {list(weights)}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(iteration), int(micro_batch)]))
    return int(rng.choice(w.size, p=w / w.sum()))
