"""Stop a diverging run with one line: the first step whose loss or gradient norm is NaN / inf.

megatron's own check (DDP ``check_for_nan_in_grad`` through the rerun state machine) ends in a traceback, on
CPU in "Torch not compiled with CUDA enabled"; it is switched off in ``optim.wrap_ddp`` and this check runs
instead, after every step and on every rank together (the loss lives on the last pipeline stage only), so all
ranks stop at the same step. The step's update is never saved: the last checkpoint stays the last good one.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from pipeline.errors import NonFiniteError


def non_finite_keys(values: Dict[str, float], grad_norm: Optional[float]) -> List[str]:
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append("grad_norm")
    return bad


def check_finite(values: Dict[str, float], grad_norm: Optional[float], step: int, stage: str,
                 device: torch.device) -> None:
    """Raise ``NonFiniteError`` on every rank when any rank saw a non-finite loss or gradient norm."""
    bad = non_finite_keys(values, grad_norm)
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return
    if dist.is_initialized() and dist.get_world_size() > 1:  # every rank names the same keys
        gathered: List[List[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, bad)
        bad = sorted({k for keys in gathered for k in keys})
    parts = [f"{k.replace('_', ' ')} = {values[k]}" if k in values else
             (f"grad norm = {grad_norm}" if k == "grad_norm" else k) for k in bad]
    # per-budget values are logged as "<what>/<budget>[/...]": name the budgets at fault, else those trained
    at_fault = sorted({k.split("/")[1] for k in bad if "/" in k})
    trained = sorted({k.split("/")[1] for k in values if "/" in k})
    budget = ", ".join(at_fault or trained) or "full model"
    raise NonFiniteError(f"{stage}: non-finite {', '.join(parts)} at step {step} (budget: {budget}); the run "
                         "diverged and this step was not saved: lower training.lr and start from the last "
                         "checkpoint's weights (training.init_from)")
