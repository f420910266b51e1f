"""``pretrain`` stage: train the parent as a plain language model (the demo and proxy studies need one)."""

from pipeline.training.loop import Trainer
from pipeline.training.task import LMTask


def main(recipe, args) -> None:
    Trainer(recipe, "pretrain", LMTask(recipe, "pretrain")).run()
