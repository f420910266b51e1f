"""Rank-side code of tests/test_context_parallel.py (run through dist_helpers.run_ranks).

A Mamba + MoE pattern without attention (megatron's local attention has no CP; TE attention under CP runs on
GPUs). ``cp2`` (2 ranks) writes the student and teacher initial checkpoints (at CP=1: DP=2, both ranks build the
same weights), then takes one real Trainer step at CP=2 for pretrain (LMTask) and for the elastic stage
(ElasticTask: sampled budget, router, hard masks, frozen teacher, KD + budget loss). ``cp1`` (1 rank) takes the
same steps from the same checkpoints. Each returns the step's logged values and every parameter's gradient
(after megatron's DP x CP reduction, read just before the optimizer step, on the CPU).

``extra`` (recipe overrides) reshapes the run for GPUs (tests/gpu/test_multi_gpu.py: attention layers on
Transformer Engine, bf16; one GPU per rank, NCCL): the steps themselves are this CPU gloo code as is.
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch

from pipeline import parallel
from pipeline.config.load import load_recipe
from pipeline.config.validate import check_elastic_run
from pipeline.model.build import build_model
from pipeline.training import checkpoint
from pipeline.training.loop import Trainer
from pipeline.training.task import LMTask

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny.yaml")
# 4 layers, no attention; 2 micro-batches of 1 x 64 tokens (2 budget draws in the elastic step)
BASE = ["model.pattern=MEME", "model.num_layers=4", "training.seq_length=64", "training.micro_batch_size=1",
        "training.global_batch_size=2", "training.lr_warmup_iters=0", "training.adam_eps=1.0e-3",
        "logging.tensorboard=false", "elastic.axes.mamba_heads=[]", "elastic.axes.attention_heads=[]",
        "elastic.budgets=[{name: full, fraction: 1.0}, {name: small, fraction: 0.6}]"]
ELASTIC = ["stage1.training.micro_batch_size=1", "stage1.training.global_batch_size=2", "stage2.budget_weights=[]",
           "qad.budget_weights=[]"]  # 2 budgets here: the weights per budget follow


def recipe(root: str, name: str, extra: List[str] = ()):
    return load_recipe(TINY, BASE + ELASTIC + list(extra) + [f"run.root={root}", f"run.name={name}"])


def _init(root: str, which: str) -> str:
    return os.path.join(root, "init", which)


def write_initial_checkpoints(root: str, extra: List[str] = ()) -> None:
    r = recipe(root, "init", extra)
    parallel.initialize(r)
    for which, seed in (("student", 7), ("teacher", 8)):
        torch.manual_seed(seed)
        checkpoint.save(_init(root, which), 0, [build_model(r)])


def one_step(r, stage: str, task) -> Dict:
    trainer = Trainer(r, stage, task)
    trainer.setup()
    grads: Dict[str, torch.Tensor] = {}
    optimizer_step = trainer.optimizer.step

    def step_after_reading_grads():
        for name, p in trainer.model[0].module.named_parameters():
            grads[name] = p.main_grad.detach().float().cpu()
        return optimizer_step()

    trainer.optimizer.step = step_after_reading_grads
    values = trainer.step()
    values = {k: float(v) for k, v in values.items()}
    return {"values": values, "grads": grads}


def steps(root: str, cp: int, extra: List[str] = ()) -> Dict:
    from megatron.core import parallel_state

    layout = [f"parallelism.cp={cp}", *extra]
    init = [f"training.init_from={_init(root, 'student')}"]
    out = {}
    r = recipe(root, f"pretrain_cp{cp}", layout + init)
    out["pretrain"] = one_step(r, "pretrain", LMTask(r, "pretrain"))
    out["cp_size"] = parallel_state.get_context_parallel_world_size()
    out["elastic"] = elastic_step(root, f"stage1_cp{cp}", layout)
    out["shard"] = shard_positions(16)
    return out


def elastic_step(root: str, name: str, extra: List[str]) -> Dict:
    from pipeline.elastic.task import ElasticTask

    r = recipe(root, name, list(extra) + [f"stage1.training.init_from={_init(root, 'student')}",
                                          f"stage1.teacher={_init(root, 'teacher')}"])
    check_elastic_run(r, "stage1")
    return one_step(r, "stage1", ElasticTask(r, "stage1"))


def recompute_steps(root: str, modes: List[str], extra: List[str] = ()) -> Dict:
    """The elastic step under each recompute mode (``full``, ``selective:moe,mamba``, ``none``)."""
    out = {}
    for mode in modes:
        kind, _, mods = mode.partition(":")
        layout = [f"parallelism.recompute={kind}"] + ([f"parallelism.recompute_modules=[{mods}]"] if mods else [])
        out[mode] = elastic_step(root, f"rc_{kind}_{mods.replace(',', '_')}", list(extra) + layout)
    return out


def cp2(root: str, extra: List[str] = (), pp2: bool = True) -> Dict:
    write_initial_checkpoints(root, extra)
    out = steps(root, 2, extra)
    if not pp2:
        parallel.shutdown()
        return out
    # PP=2 (1F1B: micro-batch 0's backward runs after micro-batch 1's forward set other masks)
    out["pp2_recompute"] = recompute_steps(root, ["none", "full"], ["parallelism.pp=2"])
    parallel.shutdown()
    return out


def cp1(root: str, extra: List[str] = ()) -> Dict:
    out = steps(root, 1, extra)
    parallel.shutdown()
    return out


def shard_positions(seq: int) -> Dict:
    """This CP rank's part of a batch through ``context_parallel_shard`` (every entry encodes the positions)."""
    from megatron.core import parallel_state

    from pipeline.training.task import context_parallel_shard

    positions = torch.arange(seq).unsqueeze(0).repeat(2, 1)
    batch = {"tokens": positions + 1000, "labels": positions + 2000, "loss_mask": positions.float(),
             "position_ids": positions.clone(),
             "attention_mask": torch.arange(seq).view(1, 1, seq, 1).expand(2, 1, seq, seq).contiguous()}
    return {"rank": parallel_state.get_context_parallel_rank(), "shard": context_parallel_shard(batch)}
