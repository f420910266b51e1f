"""Knowledge distillation loss and budget sampling of the elastic stages.

``forward_kl`` is KL(teacher || student) per token on full-vocabulary logits. Under tensor parallelism the
logits are sharded along the vocabulary (HybridModel with ``parallel_output=True``): the max and the sum of
exponentials of each log-softmax, and the KL sum itself, are reduced over the TP group. The reductions use
megatron's ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward): the loss is
replicated on every TP rank, so each rank back-propagates into its own vocabulary shard only.

``forward_kl`` runs over chunks of ``chunk_tokens`` tokens (recipe ``training.kd_chunk_tokens``) in a
``torch.autograd.Function``: the forward keeps only per-token statistics (the student's and teacher's
log-partition), the backward recomputes each chunk's softmaxes and writes T * (p_s - p_t) into the student's
gradient, so no full fp32 [tokens x vocab/tp] tensor of either model is ever held (the autograd form,
``forward_kl_unchunked``, saved about ten). Same formula, same reductions per chunk: equal to fp32 rounding.
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


def _log_partitions(xs, group):
    """log sum_v exp(x) over the full (sharded) vocabulary, per row, for each tensor of ``xs`` (same rows): one
    MAX and one SUM all-reduce for all of them. No autograd (the Function's own)."""
    sharded = group is not None and dist.get_world_size(group) > 1
    top = torch.stack([x.max(dim=-1).values for x in xs])
    if sharded:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([(x - m[:, None]).exp_().sum(dim=-1) for x, m in zip(xs, top)])
    if sharded:
        dist.all_reduce(sums, group=group)
    return sums.log_() + top


class _ChunkedKL(torch.autograd.Function):
    """Per-token KL(teacher || student) * T^2 over [N, V/tp] logits, ``chunk`` rows at a time."""

    @staticmethod
    def forward(ctx, student, teacher, temperature: float, group, chunk: int):
        n = student.shape[0]
        kl = torch.empty(n, dtype=torch.float32, device=student.device)
        s_logz = torch.empty_like(kl)
        t_logz = torch.empty_like(kl)
        for i in range(0, n, chunk):
            rows = slice(i, min(i + chunk, n))
            s = student[rows].float() / temperature
            t = teacher[rows].float() / temperature
            s_logz[rows], t_logz[rows] = _log_partitions((s, t), group)
            log_t = t.sub_(t_logz[rows, None])
            # sum_v p_t (log p_t - log p_s) = sum_v p_t (log_t - s) + logZ_s   (sum_v p_t = 1)
            part = (log_t.exp() * (log_t - s)).sum(dim=-1)
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(part, group=group)
            kl[rows] = part + s_logz[rows]
        ctx.save_for_backward(student, teacher, s_logz, t_logz)
        ctx.temperature, ctx.chunk = temperature, chunk
        return kl * temperature ** 2

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, s_logz, t_logz = ctx.saved_tensors
        temp, chunk = ctx.temperature, ctx.chunk
        grad = torch.empty_like(student)
        scale = grad_kl.float() * temp  # d(T^2 KL)/dz = T^2 (p_s - p_t) / T
        for i in range(0, student.shape[0], chunk):
            rows = slice(i, min(i + chunk, student.shape[0]))
            p_s = (student[rows].float() / temp).sub_(s_logz[rows, None]).exp_()
            p_t = (teacher[rows].float() / temp).sub_(t_logz[rows, None]).exp_()
            grad[rows] = p_s.sub_(p_t).mul_(scale[rows, None]).to(grad.dtype)
        return grad, None, None, None, None


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: Optional[torch.Tensor],
               temperature: float = 1.0, group=None, chunk_tokens: int = 0) -> torch.Tensor:
    """Per-token KL(teacher || student) [leading dims of the logits, e.g. b, s], times ``loss_mask``; see
    ``forward_kl_unchunked`` for the conventions. ``chunk_tokens``: tokens per chunk (0: all at once, still
    without autograd temporaries)."""
    group = _tp_group(group)
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, student_logits.shape[-1])
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    chunk = chunk_tokens if chunk_tokens > 0 else max(s.shape[0], 1)
    kl = _ChunkedKL.apply(s, t, float(temperature), group, chunk).view(lead)
    return kl if loss_mask is None else kl * loss_mask.to(kl.dtype)


def forward_kl_unchunked(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         loss_mask: Optional[torch.Tensor], temperature: float = 1.0, group=None) -> torch.Tensor:
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
