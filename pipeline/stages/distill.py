"""``distill``: prune + distil one fixed budget's subnet from the frozen parent (the independent, sequential
compression baseline of docs/quality.md); ``distill.budget`` names the budget, ``distill.budgets_from`` the
stage whose resolved subnets (the elastic router's choice) fix its architecture."""

from __future__ import annotations


def dry_run(recipe, args) -> None:
    from pipeline.elastic.distill import budgets_path, read_distill_budget

    budgets, i = read_distill_budget(recipe)
    print(f"# distill: subnet {budgets[i].name} of {budgets_path(recipe)} from teacher {recipe.distill.teacher}")


def main(recipe, args) -> None:
    from pipeline.config.validate import check_elastic_run
    from pipeline.elastic.distill import read_distill_budget

    check_elastic_run(recipe, "distill")
    read_distill_budget(recipe)  # a clear error before any process group work
    from pipeline.elastic.distill import DistillTask
    from pipeline.training.loop import Trainer

    Trainer(recipe, "distill", DistillTask(recipe)).run()
