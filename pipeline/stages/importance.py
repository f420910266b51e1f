"""``importance`` stage: score the parent on calibration data, permute it, save it for the elastic stages.

See docs/importance.md. Heavy imports (megatron) happen in ``main`` so ``--dry-run`` stays quick.
"""

from __future__ import annotations

import os

from pipeline.config.schema import Recipe
from pipeline.errors import UserError


def dry_run(recipe: Recipe, args) -> None:
    from pipeline.elastic.importance.run import calibration_plan, depth_rounds, resolve_parent
    from pipeline.training.loop import stage_dir

    plan = calibration_plan(recipe)
    try:
        parent = resolve_parent(recipe)
    except UserError as e:
        parent = f"not found yet ({e})"
    imp, m = recipe.importance, recipe.model
    print(f"# importance: parent {parent}")
    print(f"# calibration: {plan['samples']} samples x {plan['seq_length']} tokens = "
          f"{plan['samples'] * plan['seq_length']:,} tokens ({imp.data}), micro-batch {imp.micro_batch_size}")
    if imp.depth:
        rounds = min(depth_rounds(recipe), m.num_layers - 1)
        passes = sum(m.num_layers - r for r in range(max(1, rounds)))
        print(f"# depth: {rounds} removal rounds, {passes} passes over {plan['depth_samples']} samples")
    print(f"# output: {os.path.join(stage_dir(recipe, 'importance'), 'checkpoints')} + importance.json")


def main(recipe: Recipe, args) -> None:
    from pipeline.elastic.importance.run import run

    run(recipe)
