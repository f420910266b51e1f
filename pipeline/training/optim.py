"""megatron-core DDP, optimizer and LR schedule from the recipe.

Without TE or apex megatron falls back to torch AdamW (and local multi-tensor helpers); with them it uses
the fused kernels. bf16 keeps fp32 master weights (megatron's Float16Optimizer / DistributedOptimizer).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from pipeline.config.schema import Recipe, TrainingConfig


def wrap_ddp(recipe: Recipe, model: torch.nn.Module, overlap_ok: bool = True) -> DistributedDataParallel:
    """megatron DDP. With data parallelism the gradient reduction is bucketed and overlapped with the backward
    (``parallelism.overlap_grad_reduce``), and with the distributed optimizer the parameter all-gather with the
    next forward (``overlap_param_gather``). ``overlap_ok``: the task reduces any extra gradients after DDP's
    (finalize_model_grads), not before it (the elastic router under PP with the distributed optimizer cannot)."""
    p = recipe.parallelism
    multi = parallel_state.get_data_parallel_world_size(with_context_parallel=True) > 1
    overlap = p.overlap_grad_reduce and multi and overlap_ok
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap,
        overlap_param_gather=overlap and p.distributed_optimizer and p.overlap_param_gather,
        use_distributed_optimizer=p.distributed_optimizer,
        check_for_nan_in_grad=False,  # training/finite.py checks instead (megatron's check is a CUDA-only traceback)
    )
    # bucketing pays off with overlapped reduction, which needs CUDA streams
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                   disable_bucketing=not torch.cuda.is_available())


def sync_params(model_chunks) -> None:
    """With overlapped parameter all-gather the model's weights are refreshed lazily by the next forward:
    gather them now (before a checkpoint, evaluation or the end of a run)."""
    for m in model_chunks:
        if getattr(m, "use_forward_hook", False):
            m.disable_forward_pre_hook(param_sync=True)
            m.enable_forward_pre_hook()


def build_optimizer(recipe: Recipe, t: TrainingConfig, model_chunks: List[torch.nn.Module], bf16: bool,
                    overrides: Optional[Dict] = None):
    config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=recipe.parallelism.distributed_optimizer,
    )
    merged = None
    if overrides:  # megatron replaces its defaults (no weight decay on biases / norms) when given any
        merged = get_standard_config_overrides(config)
        merged.update(overrides)
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=merged)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.lr_warmup_iters else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(t.train_iters, 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.train_iters, 1),
        wd_incr_style="constant",
        # the recipe's schedule wins on resume (a re-run with a lowered lr must not die on megatron's assert)
        override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False,
    )
    return optimizer, scheduler


def hook_model_config(model_chunks: List[DistributedDataParallel], optimizer) -> None:
    """The callbacks megatron's pipeline schedules call (loss scaling, grad sync, grad finalisation)."""
    config = model_chunks[0].module.config
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model_chunks[0].no_sync if len(model_chunks) == 1 else [m.no_sync for m in model_chunks]
    config.finalize_model_grads_func = finalize_model_grads
