"""``qad``: nested quantisation after stage 2 (docs/qad.md). Calibrates one set of input scales over every
budget's subnet (``quant_scales.json``: FP8 PTQ and NVFP4 both use it), then distils the fake-quantised
elastic model (``qad.format``, NVFP4 by default) from the BF16 stage-2 model at the same budget's subnet."""

from __future__ import annotations


def dry_run(recipe, args) -> None:
    from pipeline.quant.task import budgets_path, read_qad_budgets

    budgets = read_qad_budgets(recipe)
    print(f"# qad: {recipe.qad.format} at budgets {', '.join(b.name for b in budgets)} of {budgets_path(recipe)}")


def main(recipe, args) -> None:
    from pipeline.config.validate import check_elastic_run
    from pipeline.quant.task import read_qad_budgets

    check_elastic_run(recipe, "qad")
    if recipe.qad.training.fp8 != "none":  # checked here, not in the recipe: other stages may train in FP8
        from pipeline.errors import UserError

        raise UserError(f"qad.training.fp8 = {recipe.qad.training.fp8!r}: QAD emulates {recipe.qad.format} on "
                        "megatron's own linears; set qad.training.fp8=none")
    read_qad_budgets(recipe)  # a clear error before any process group work
    from pipeline.quant.task import QADTask
    from pipeline.training.loop import Trainer

    Trainer(recipe, "qad", QADTask(recipe)).run()
