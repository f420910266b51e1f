"""What a training stage optimises. The loop (``loop.py``) is shared; stages differ in their Task.

A Task builds the trainable model, turns a micro-batch into (output, loss_func) for megatron's pipeline
schedules, and may carry extra checkpointed state. ``LMTask`` is plain next-token prediction (pretrain).
"""

from __future__ import annotations

import abc
from functools import partial
from typing import Any, Dict, Iterator, List, Tuple

import torch

from megatron.core import parallel_state

from pipeline.config.schema import Recipe
from pipeline.model.build import build_model


class Task(abc.ABC):
    name = "task"

    def __init__(self, recipe: Recipe, stage: str):
        self.recipe = recipe
        self.stage = stage

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        check_document_mask(self.recipe, self.stage)
        return build_model(self.recipe, dtype, fp8=getattr(self.recipe, self.stage).training.fp8, trainable=True)

    def setup(self, model_chunks: List[torch.nn.Module], device: torch.device) -> None:
        """Called once the model is wrapped and weights are loaded (teachers, routers...)."""

    def optimizer_overrides(self):
        return None

    # Checkpoint keys a ``training.init_from`` source may lack (modules the stage adds, e.g. the elastic router).
    init_missing_ok: Tuple[str, ...] = ()

    def overlap_grad_reduce_ok(self) -> bool:
        """Whether DDP may reduce gradients during the backward (the task syncs nothing before DDP does)."""
        return True

    # Whether a frozen teacher's forward runs next to the model (KD): counted in the MFU.
    teacher_forward: bool = False

    # Micro-batches per optimizer step (set by the loop before the first step; 0 = unknown).
    num_microbatches: int = 0

    def begin_step(self, iteration: int) -> None:
        """Called before each optimizer step's micro-batches (iteration = steps already taken)."""

    def schedule_kwargs(self) -> Dict[str, Any]:
        """Extra keyword arguments for megatron's forward-backward function (e.g. adjust_tensor_shapes_fn)."""
        return {}

    def log_extra(self, values: Dict[str, float]) -> str:
        """Task-specific text appended to the loop's log line."""
        return ""

    def evaluate(self, model_chunks) -> Dict[str, float]:
        """Validation values every ``training.eval_interval`` steps (logged, TensorBoard, metrics.jsonl)."""
        return {}

    def finish(self, stage_dir: str) -> None:
        """Called on every rank after the last step (and its checkpoint)."""

    @abc.abstractmethod
    def forward_step(self, data_iterator: Iterator[Dict[str, torch.Tensor]], model) -> Tuple[torch.Tensor, Any]:
        """(output tensor, loss_func(output) -> (loss, {name: value})) for one micro-batch."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def reduce_logs(self, loss_dicts: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Mean of every reported value over the step's micro-batches."""
        return mean_logs(loss_dicts)


def mean_logs(loss_dicts: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Each key's mean over the micro-batches that report it, brought to the host in one transfer per device
    (one sync per step, not one per value)."""
    keys = sorted({k for d in loss_dicts for k in d})
    means = {k: torch.stack([d[k].detach().float() for d in loss_dicts if k in d]).mean() for k in keys}
    out: Dict[str, float] = {}
    for device in {v.device for v in means.values()}:
        ks = [k for k in keys if means[k].device == device]
        out.update(zip(ks, torch.stack([means[k] for k in ks]).double().cpu().tolist()))
    return {k: out[k] for k in keys}


def token_mean(per_token: torch.Tensor, loss_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, value to log): the sum over this rank's tokens / the tokens of its context-parallel group, and the
    group's token mean. megatron's schedule multiplies a (loss, logs) loss by the CP size and DDP averages over
    DP x CP, so the gradient is that of the global token mean (as megatron's own GPT loss)."""
    total = (per_token.float() * loss_mask).sum()
    sums = torch.stack([total.detach(), loss_mask.sum().float()])
    if parallel_state.model_parallel_is_initialized() and parallel_state.get_context_parallel_world_size() > 1:
        torch.distributed.all_reduce(sums, group=parallel_state.get_context_parallel_group())
    count = sums[1].clamp(min=1)
    return total / count, sums[0] / count


def context_parallel_shard(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This context-parallel rank's part of a micro-batch (every [b, s, ...] entry: tokens, labels, loss mask,
    position ids; an attention mask on its query dim), in megatron's load-balanced zigzag layout: the sequence
    in 2 x cp chunks, rank r holding chunks r and 2cp-1-r. megatron's TE attention and Mamba context
    parallelism expect exactly this layout. Identity without CP."""
    if not (parallel_state.model_parallel_is_initialized() and parallel_state.get_context_parallel_world_size() > 1):
        return batch
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False,
                                     cp_group=parallel_state.get_context_parallel_group())


def check_document_mask(recipe: Recipe, stage: str) -> None:
    """``training.document_attention_mask`` hands attention an explicit block-causal mask: megatron's local
    attention applies it; the TE path would need THD packed sequences (not wired)."""
    from pipeline.errors import UserError
    from pipeline.model.spec import use_te

    if getattr(recipe, stage).training.document_attention_mask and use_te(recipe.model):
        raise UserError(f"{stage}.training.document_attention_mask needs megatron's local attention, but "
                        f"model.backend = {recipe.model.backend} runs Transformer Engine: set model.backend: local")


def masked_mean(loss_mask: torch.Tensor, per_token: torch.Tensor):
    loss, value = token_mean(per_token, loss_mask)
    return loss, {"loss": value}


class LMTask(Task):
    name = "lm"

    def forward_step(self, data_iterator, model):
        batch = context_parallel_shard(next(data_iterator))
        device = next(model.parameters()).device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        per_token = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
        return per_token, partial(masked_mean, batch["loss_mask"])
