"""Rank-side code of the importance tests (in-process on one rank, or through dist_helpers.run_ranks).

A parent with every layer kind (pattern ``MEM*-M*E``: Mamba-2, MoE with a shared expert, attention, dense
MLP) is built once at TP=1 with randomised norms, expert bias, A_log / D / dt_bias (so each permuted tensor
matters), saved, then loaded under each layout: scored on synthetic calibration data, permuted, re-scored.
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model

from pipeline import parallel
from pipeline.config.load import load_recipe
from pipeline.elastic.importance.forward import forward_only
from pipeline.elastic.importance.layers import scoring_model
from pipeline.elastic.importance.orders import orders_from_scores
from pipeline.elastic.importance.run import calibration_batches, calibration_plan, score
from pipeline.elastic.permute import permute_model
from pipeline.model.build import build_model
from pipeline.training import checkpoint
from pipeline.training.synthetic import synthetic_batches

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny.yaml")
PATTERN = "MEM*-M*E"
# small calibration: 8 sequences of 64 tokens, micro-batches of 2
BASE = [f"model.pattern={PATTERN}", "importance.data=synthetic", "importance.samples=8",
        "importance.seq_length=64", "importance.micro_batch_size=2", "logging.log_interval=100"]
LAYOUTS = {
    "tp2": ["parallelism.tp=2", "parallelism.sequence_parallel=true"],  # MoE under TP needs SP
    "ep2": ["parallelism.ep=2"],
    "pp2": ["parallelism.pp=2"],
    "dp2": [],
    # 4 ranks: dense part TP=2 (SP), experts EP=2 x expert-TP=2 (megatron's default ETP = TP), DP=2
    "tp2ep2": ["parallelism.tp=2", "parallelism.sequence_parallel=true", "parallelism.ep=2",
               "parallelism.moe_token_dispatcher=allgather"],
}
NO_ELASTIC = [f"elastic.axes.{a}=[]" for a in ("hidden", "attention_heads", "mamba_heads", "moe_ffn",
                                                 "shared_expert_ffn", "experts")]


def recipe(root: str, name: str = "imp", extra: List[str] = ()):
    return load_recipe(TINY, BASE + list(extra) + [f"run.root={root}", f"run.name={name}"])


def parent_path(root: str) -> str:
    return os.path.join(root, "parent")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for the tensors a fresh model initialises to constants."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                continue
            u = lambda: torch.rand(t.shape, generator=g)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                t.copy_(0.5 + u())
            elif name.endswith("expert_bias"):
                t.copy_((u() - 0.5) * 0.2)
            elif name.endswith(("A_log", "mixer.D", "dt_bias", "conv1d_bias")):
                t.copy_(u() - 0.3)


def make_parent(root: str, extra: List[str] = ()) -> str:
    """The parent at TP=1 (every rank of a DP group builds the same weights), saved to ``parent_path``."""
    r = recipe(root, "parent", extra)
    parallel.initialize(r)
    model = build_model(r)
    randomize(model, 7)
    checkpoint.save(parent_path(root), 0, [model])
    return checkpoint.resolve(parent_path(root))


def load_parent(r, root: str) -> torch.nn.Module:
    model = scoring_model(r, torch.float32)
    checkpoint.load(checkpoint.resolve(parent_path(root)), [model], load_rng=False)
    return model


def logits(model: torch.nn.Module, r) -> torch.Tensor:
    """Full-vocabulary logits of a fixed batch (2 x 64 tokens, not calibration data); None off the last stage."""
    batch = next(synthetic_batches(r.model.vocab_size, 64, 99, 0, 2, 0, 1))
    out = []
    forward_only(model, iter([batch]), 1, 64, 2, lambda i, y: out.append(y.detach().clone()))
    if not out:
        return None
    y = out[0]
    group = ps.get_tensor_model_parallel_group()
    if dist.get_world_size(group) > 1:
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, y.contiguous(), group=group)
        y = torch.cat(parts, dim=-1)
    return y


def scores_of(model: torch.nn.Module, r):
    plan = calibration_plan(r)
    dp = ps.get_data_parallel_world_size()
    batches = calibration_batches(r, plan, ps.get_data_parallel_rank(), dp)
    scores, _ = score(model, r, batches, plan["samples"] // (plan["micro_batch_size"] * dp), plan, lambda s: None)
    return scores


def flat(scores) -> Dict[str, torch.Tensor]:
    out = {"hidden": scores.hidden.cpu()}
    for i, axes in scores.layers.items():
        out.update({f"{i}.{a}": v.cpu() for a, v in axes.items()})
    return out


def permutation_case(root: str, name: str, extra: List[str] = (), save: bool = False) -> Dict:
    """Score, permute, re-score one layout: logits before / after, scores, orders, scores after."""
    r = recipe(root, name, extra)
    parallel.initialize(r)
    model = load_parent(r, root)
    before = logits(model, r)
    scores = scores_of(model, r)
    orders = orders_from_scores(scores, r.model)
    permute_model(model, r.model.pattern, orders)
    after = logits(model, r)
    out = {"before": before, "after": after, "scores": flat(scores), "rescored": flat(scores_of(model, r)),
           "hidden_order": orders.hidden, "orders": {f"{i}.{a}": o for i, ax in orders.layers.items()
                                                     for a, o in ax.items()}}
    if save:
        checkpoint.save(os.path.join(root, name, "permuted"), 0, [model])
    return out


def layouts(root: str, names: List[str]) -> Dict:
    """Two ranks: the parent (at TP=1), then one permutation case per layout (saving the permuted model)."""
    make_parent(root)
    out = {name: permutation_case(root, name, LAYOUTS[name], save=True) for name in names}
    parallel.shutdown()
    return out


def reloaded_logits(root: str, name: str) -> torch.Tensor:
    """One rank: a layout's saved permuted model loaded at TP=1 (resharded by dist_checkpointing)."""
    r = recipe(root, "reload")
    parallel.initialize(r)
    model = scoring_model(r, torch.float32)
    checkpoint.load(checkpoint.resolve(os.path.join(root, name, "permuted")), [model], load_rng=False)
    return logits(model, r)


def stack(model):
    return unwrap_model(model).decoder.layers
