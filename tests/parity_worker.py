"""Rank-side code of tests/test_parallel_parity.py (run through dist_helpers.run_ranks).

``layouts`` (2 ranks) writes each model's initial checkpoint at TP=1, then runs one Trainer step from it under
each TP/EP/PP/DP layout and saves the updated weights and the gradients at that layout. ``reference`` (1 rank)
runs the same step from the same checkpoint, then loads every layout's checkpoints at TP=1 so each tensor comes
back at full shape, ready to compare.
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from pipeline import parallel
from pipeline.config.load import load_recipe
from pipeline.model.build import build_model
from pipeline.training import checkpoint
from pipeline.training.loop import Trainer
from pipeline.training.task import LMTask

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny.yaml")
# one step of the tiny recipe, smaller; no warmup so the step moves the weights (lr(0) = 0 with warmup)
# Adam's first step is lr * g / (|g| + eps): with a tiny eps it is ~lr * sign(g) and turns rounding noise in
# near-zero gradients into lr-sized weight differences; eps = 1e-3 keeps updated weights comparable at fp32.
STEP = ["training.seq_length=64", "training.micro_batch_size=2", "training.global_batch_size=4",
        "training.lr_warmup_iters=0", "training.adam_eps=1.0e-3", "logging.tensorboard=false"]
MODELS = {
    "moe": [],  # tiny as shipped: Mamba-2, attention, MoE (sigmoid router with expert bias)
    "dense": ["model.pattern=M*-M*-", "model.num_layers=6"],  # TP without sequence parallel (MoE needs SP)
}
# layout name -> (model, overrides); all on 2 ranks
LAYOUTS = {
    "tp2": ("dense", ["parallelism.tp=2", "parallelism.sequence_parallel=false"]),
    "tp2_sp": ("moe", ["parallelism.tp=2", "parallelism.sequence_parallel=true"]),
    "ep2": ("moe", ["parallelism.ep=2"]),  # alltoall dispatcher (the recipe's)
    "ep2_allgather": ("moe", ["parallelism.ep=2", "parallelism.moe_token_dispatcher=allgather"]),
    "pp2": ("moe", ["parallelism.pp=2"]),
    "dp2": ("moe", []),
}


def recipe(root: str, name: str, model: str, extra: List[str] = ()):
    return load_recipe(TINY, STEP + MODELS[model] + list(extra) + [f"run.root={root}", f"run.name={name}"])


def init_checkpoint(root: str, model: str) -> str:
    return os.path.join(root, "init", model)


def one_step(r) -> Dict:
    """Trainer.setup() + Trainer.step(); the gradients are read just before the optimizer step."""
    trainer = Trainer(r, "pretrain", LMTask(r, "pretrain"))
    trainer.setup()
    grads: Dict[torch.nn.Parameter, torch.Tensor] = {}
    optimizer_step = trainer.optimizer.step

    def step_after_reading_grads():
        for m in trainer.model:
            for p in m.module.parameters():
                grads[p] = p.main_grad.detach().clone()
        return optimizer_step()

    trainer.optimizer.step = step_after_reading_grads
    values = trainer.step()
    trainer.iteration, trainer.consumed = 1, r.pretrain.training.global_batch_size
    return {"trainer": trainer, "values": values, "grads": grads}


def initial_checkpoints(root: str) -> None:
    """Each model built once at TP=1 (here DP=2: both ranks build the same weights) and saved."""
    for model in MODELS:
        r = recipe(root, "init", model)
        parallel.initialize(r)
        checkpoint.save(init_checkpoint(root, model), 0, [build_model(r)])


def layouts(root: str, names: List[str] = tuple(LAYOUTS)) -> Dict:
    """Two ranks: the initial checkpoints, then one step per layout from them; saves the updated weights
    (``Trainer.save``) and the gradients (as a model checkpoint) at that layout. Returns the step's values."""
    initial_checkpoints(root)
    out = {}
    for name in names:
        model, extra = LAYOUTS[name]
        r = recipe(root, name, model, extra + [f"training.init_from={init_checkpoint(root, model)}"])
        res = one_step(r)
        trainer = res["trainer"]
        trainer.save()
        for p, g in res["grads"].items():
            p.data.copy_(g)
        checkpoint.save(os.path.join(root, name, "grads"), 1, [m.module for m in trainer.model])
        out[name] = {"model": model, "values": res["values"], "tp_replica_spread": _tp_replica_spread(res["grads"])}
    parallel.shutdown()
    return out


def reference(root: str, names: List[str] = tuple(LAYOUTS)) -> Dict:
    """One rank: per model, the same step from the same checkpoint (loss, grad norm, grads, new weights); then
    every layout's saved weights and grads loaded at TP=1, i.e. at full shape."""
    models = {}
    for model in MODELS:
        r = recipe(root, f"ref_{model}", model, [f"training.init_from={init_checkpoint(root, model)}"])
        res = one_step(r)
        module = res["trainer"].model[0].module
        names_of = {p: n for n, p in module.named_parameters()}
        models[model] = {
            "values": res["values"],
            "grads": {names_of[p]: g for p, g in res["grads"].items()},
            "weights": _tensors(module.state_dict()),
            "initial": _load_at_tp1(r, checkpoint.resolve(init_checkpoint(root, model))),
        }
    loaded = {}
    for name in names:
        model, _ = LAYOUTS[name]
        r = recipe(root, "load", model)
        saved = {"weights": os.path.join(root, name, "pretrain", "checkpoints"),  # Trainer.save's stage dir
                 "grads": os.path.join(root, name, "grads")}
        loaded[name] = {key: _load_at_tp1(r, checkpoint.resolve(d)) for key, d in saved.items()}
    parallel.shutdown()
    return {"models": models, "layouts": loaded}


def _load_at_tp1(r, ckpt: str) -> Dict[str, torch.Tensor]:
    m = build_model(r)
    checkpoint.load(ckpt, [m], load_rng=False)
    return _tensors(m.state_dict())


def _tensors(state: Dict) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()
            if isinstance(v, torch.Tensor) and "_extra_state" not in k}


def _tp_replica_spread(grads: Dict[torch.nn.Parameter, torch.Tensor]) -> float:
    """Largest difference between TP ranks' gradients of a parameter they replicate (norms, router)."""
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return 0.0
    worst = torch.zeros(())
    for p, g in grads.items():
        if not getattr(p, "tensor_model_parallel", False):
            first = g.clone()
            dist.broadcast(first, src=dist.get_global_rank(group, 0), group=group)
            worst = torch.maximum(worst, (g - first).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
    return float(worst)
