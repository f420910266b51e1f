"""The frozen teacher of the elastic stages and how it rides along the student's pipeline.

The teacher is the permuted parent (the importance stage's checkpoint), built with the same parallel layout
as the student and never trained. Under pipeline parallelism each stage runs its part of the teacher next to
its part of the student; the activation sent to the next stage is ``[student | teacher]`` concatenated on
the hidden dim (megatron's ``adjust_tensor_shapes_fn`` doubles the p2p shapes), so the last stage has both
logits for the KD loss. The teacher half carries no gradient: its slot of the backward message is zeros.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from megatron.core import parallel_state
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import unwrap_model

from pipeline.config.schema import Recipe
from pipeline.errors import UserError
from pipeline.model.build import build_model
from pipeline.training import checkpoint


def freeze_expert_bias(model: torch.nn.Module) -> None:
    """Keep the parent's MoE routing: masked experts see no tokens, and an updated expert bias would drift the full
    model's routing away from the teacher's (students and teachers alike)."""
    for router in (m for m in model.modules() if hasattr(m, "expert_bias")):
        router.frozen_expert_bias = True


def teacher_source(recipe: Recipe, key: str, value: str) -> str:
    """The checkpoint dir a ``<section>.teacher`` names (a stage or a path); a bad one is an error on ``key``."""
    from pipeline.training.loop import resolve_init

    try:
        return resolve_init(recipe, value)
    except UserError as e:
        raise UserError(f"{key}: {str(e).split(': ', 1)[-1]}") from None


def teacher_fp8(stage_cfg) -> str:
    """The teacher's FP8 recipe: the student's ``training.fp8``, unless ``teacher_fp8: false`` keeps it in bf16 (its
    targets then equal a bf16 run's: what an FP8-vs-bf16 comparison of the student needs)."""
    return stage_cfg.training.fp8 if stage_cfg.teacher_fp8 else "none"


def build_teacher(recipe: Recipe, ckpt: str, bf16: bool, fp8: str = "none") -> torch.nn.Module:
    """The frozen parent at ``ckpt`` (a resolved dist-checkpoint dir), this rank's pipeline stage; ``fp8``: its
    FP8 recipe (``teacher_fp8``)."""
    model = build_model(recipe, torch.bfloat16 if bf16 else torch.float32, fp8=fp8)
    checkpoint.load(ckpt, [model], load_rng=False)
    freeze_expert_bias(model)
    model.requires_grad_(False)
    model.eval()
    return Float16Module(model.config, model) if bf16 else model


def double_hidden_shapes(recv: List[Tuple[int, ...]], send: List[Tuple[int, ...]]):
    """``adjust_tensor_shapes_fn``: every p2p activation carries student and teacher side by side."""
    widen = lambda shapes: [tuple(s[:-1]) + (2 * s[-1],) for s in shapes]  # noqa: E731
    return widen(recv), widen(send)


def split_stage_input(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """On a non-first pipeline stage, hand each model its half of the received ``[student | teacher]``."""
    if parallel_state.is_pipeline_first_stage():
        return
    s, t = unwrap_model(student), unwrap_model(teacher)
    both = s.decoder.input_tensor
    if isinstance(both, list):
        both = both[0]
    h = both.shape[-1] // 2
    s.decoder.set_input_tensor(both[..., :h])
    t.decoder.set_input_tensor(both[..., h:].detach())
