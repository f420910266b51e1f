"""``stage1`` elastic training: short context, budgets sampled uniformly (docs/elastic.md)."""

from pipeline.stages.elastic_common import run_elastic


def main(recipe, args) -> None:
    run_elastic(recipe, "stage1")
