"""What the importance stage will do, from the recipe alone (no megatron import: ``--dry-run`` and user
errors stay quick): calibration sizes, the parent checkpoint, depth rounds, where the output goes."""

from __future__ import annotations

import os
from typing import Dict

from pipeline.config.schema import Recipe
from pipeline.errors import UserError

STAGE = "importance"


def stage_path(recipe: Recipe, stage: str = STAGE) -> str:
    """``<root>/<name>/<stage>`` (as ``pipeline.training.loop.stage_dir``)."""
    return os.path.join(recipe.run.root, recipe.run.name, stage)


def calibration_plan(recipe: Recipe) -> Dict[str, int]:
    imp, d = recipe.importance, recipe.data
    samples = imp.samples or d.calibration_samples
    if samples < 1:
        raise UserError("importance.samples and data.calibration_samples are both 0: no calibration data")
    return {"samples": samples, "seq_length": imp.seq_length or d.calibration_seq_length,
            "micro_batch_size": min(imp.micro_batch_size, samples),  # a tiny calibration set: one batch
            "depth_samples": min(imp.depth_samples or samples, samples) if imp.depth else 0}


def resolve_parent(recipe: Recipe) -> str:
    """``importance.init_from``: a checkpoint path or a stage name (its latest checkpoint)."""
    src = recipe.importance.init_from
    where = src if os.path.exists(src) else os.path.join(stage_path(recipe, src), "checkpoints")
    if not os.path.exists(where):
        raise UserError(f"importance.init_from = {src!r}: neither a path nor a finished stage ({where} missing)")
    from pipeline.training import checkpoint  # megatron: only once there is something to resolve

    try:
        path = checkpoint.resolve(where)
    except UserError as e:
        raise UserError(f"importance.init_from = {src!r}: {e}") from None
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise UserError(f"importance.init_from = {src!r}: {path} is not a megatron dist checkpoint")
    return path


def depth_rounds(recipe: Recipe) -> int:
    """Removal rounds: as many layers as the smallest elastic.axes.depth choice drops (all but one if empty)."""
    kept = recipe.elastic.axes.depth
    return max(1, recipe.model.num_layers - (min(kept) if kept else 1))
