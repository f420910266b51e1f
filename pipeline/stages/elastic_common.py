"""What stage1 and stage2 share: the elastic checks (before megatron is imported), then the Trainer."""

from pipeline.config.validate import check_elastic_run


def run_elastic(recipe, stage: str) -> None:
    check_elastic_run(recipe, stage)
    from pipeline.elastic.task import ElasticTask
    from pipeline.training.loop import Trainer

    Trainer(recipe, stage, ElasticTask(recipe, stage)).run()
