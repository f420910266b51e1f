"""``importance`` stage: score the parent on calibration data, permute it, save it for the elastic stages.

See docs/importance.md. The recipe checks run before megatron is imported, so ``--dry-run`` and user errors
are quick.
"""

from __future__ import annotations

from pipeline.config.schema import Recipe
from pipeline.elastic.importance.plan import calibration_plan, depth_rounds, resolve_parent, stage_path
from pipeline.errors import UserError


def dry_run(recipe: Recipe, args) -> None:
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
        passes = 1 + sum(m.num_layers - r for r in range(rounds))
        print(f"# depth: {rounds} removal rounds, {passes} forward passes over {plan['depth_samples']} samples")
    print(f"# output: {stage_path(recipe)}/checkpoints + importance.json")


def main(recipe: Recipe, args) -> None:
    calibration_plan(recipe)
    resolve_parent(recipe)
    from pipeline.elastic.importance.run import run

    run(recipe)
