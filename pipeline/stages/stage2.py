"""``stage2`` elastic training: long context, weighted budget sampling; writes each budget's resolved
subnet (``elastic_budgets.json``) next to its checkpoints (docs/elastic.md)."""

from pipeline.stages.elastic_common import run_elastic


def main(recipe, args) -> None:
    run_elastic(recipe, "stage2")
