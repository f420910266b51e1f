"""Rank-side code of tests/test_overlap_grad_reduce.py: one elastic stage-1 step at DP=2 with megatron DDP's
gradient reduction overlapped with the backward and without; returns the reduced gradients of each."""

from __future__ import annotations

import os
from typing import Dict

import torch

from pipeline import parallel
from pipeline.elastic.task import ElasticTask
from pipeline.model.build import build_model
from pipeline.training import checkpoint
from pipeline.training.loop import Trainer
from parity_worker import STEP, TINY

from pipeline.config.load import load_recipe


def elastic_grads(root: str) -> Dict:
    parent = os.path.join(root, "parent")
    r = load_recipe(TINY, STEP + [f"run.root={root}", "run.name=init"])
    parallel.initialize(r)
    checkpoint.save(parent, 0, [build_model(r)])  # both DP ranks build the same weights (fixed seed)
    out = {}
    for overlap in (False, True):
        r = load_recipe(TINY, [f"stage1.{s}" for s in STEP if s.startswith("training.")] + ["logging.tensorboard=false",
            f"run.root={root}", f"run.name=overlap_{overlap}", f"parallelism.overlap_grad_reduce={overlap}",
            f"stage1.teacher={parent}", f"stage1.training.init_from={parent}", "stage1.training.train_iters=1"])
        trainer = Trainer(r, "stage1", ElasticTask(r, "stage1"))
        trainer.setup()
        ddp = trainer.model[0]
        grads = {}
        step = trainer.optimizer.step

        def read_then_step():
            grads.update({n: p.main_grad.detach().clone() for n, p in ddp.module.named_parameters()})
            return step()

        trainer.optimizer.step = read_then_step
        values = trainer.step()
        out[overlap] = {"overlapped": ddp.ddp_config.overlap_grad_reduce, "grads": grads, "loss": values["loss"]}
    parallel.shutdown()
    return out
