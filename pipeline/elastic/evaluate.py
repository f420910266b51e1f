"""Validation loss of every nested budget: after elastic training vs sliced from the permuted parent untrained.

Both rows use the same subnet per budget (the trained router's choice, ``elastic_budgets.json``) and the same
validation micro-batches; the parent row is the permuted parent unmasked (the importance stage's model,
which computes the parent's function). A subnet under hard masks computes exactly the sliced model
(tests/test_elastic_slice_vs_masked.py), so no slicing is needed to score it.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from pipeline.config.schema import Recipe
from pipeline.elastic.masks import ElasticMasks
from pipeline.elastic.masks.spec import build_elastic_model
from pipeline.elastic.router_slot import SLOT
from pipeline.elastic.subnet import ResolvedBudget
from pipeline.training import checkpoint


def validation_batches(recipe: Recipe, stage: str, micro_batch_size: int) -> List[Dict[str, torch.Tensor]]:
    """This DP rank's validation micro-batches: the data stage's validation split, or for synthetic data
    samples far beyond any training step (same distribution, never trained on)."""
    t = getattr(recipe, stage).training
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n = max(1, t.eval_iters) * t.global_batch_size // (micro_batch_size * dp)
    if t.data == "synthetic":
        from itertools import islice

        from pipeline.training.synthetic import synthetic_batches

        it = synthetic_batches(recipe.model.vocab_size, t.seq_length, recipe.run.seed, 10 ** 9, micro_batch_size,
                               dp_rank, dp)
        return list(islice(it, n))
    from data_prep.loading import valid_batches

    return list(valid_batches(recipe, stage, micro_batch_size, dp_rank, dp))


def lm_loss(model: torch.nn.Module, batches: List[Dict[str, torch.Tensor]], seq_length: int,
            micro_batch_size: int) -> float:
    """Token-mean LM loss over ``batches`` (all DP ranks), on the last pipeline stage (nan elsewhere)."""
    device = next(model.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)

    def step(data_iterator: Iterator, module):
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}
        out = module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss(per_token):
            mask = batch["loss_mask"].float()
            sums[0] += (per_token.float() * mask).sum().double()
            sums[1] += mask.sum().double()
            return per_token.new_zeros(()), {}

        return out, loss

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches), model=[model],
                                    num_microbatches=len(batches), seq_length=seq_length,
                                    micro_batch_size=micro_batch_size, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return float("nan")
    dist.all_reduce(sums, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(sums[0] / sums[1].clamp(min=1))


def evaluate_budgets(recipe: Recipe, stage: str, budgets: List[ResolvedBudget], trained_ckpt: str,
                     parent_ckpt: str, dtype: torch.dtype, say=print, valid_stage: str = "") -> Dict:
    """{"budgets": [{name, fraction, active_params, trained, untrained}], "parent": loss} (the loss on the last
    pipeline stage). ``valid_stage``: whose validation batches (sequence length, batch, eval_iters, document order)
    score it; default ``stage``'s (another stage's lets checkpoints of different stages share one validation set)."""
    valid_stage = valid_stage or stage
    t = getattr(recipe, valid_stage).training
    mbs = t.micro_batch_size
    batches = validation_batches(recipe, valid_stage, mbs)
    model = build_elastic_model(recipe, dtype)
    if dtype == torch.bfloat16:  # as in training: every parameter bf16 (Mamba's A_log / D too)
        model = Float16Module(model.config, model)
    masks = ElasticMasks(model, recipe.model, recipe.elastic.axes)  # subnets name their skipped layers
    rows = {b.name: {"name": b.name, "fraction": b.fraction,
                     "active_params": int(b.subnet.count(recipe.model).active)} for b in budgets}
    out: Dict = {"stage": stage, "trained": trained_ckpt, "parent_checkpoint": parent_ckpt,
                 "tokens": len(batches) * mbs * t.seq_length * ps.get_data_parallel_world_size()}
    for label, ckpt in (("untrained", parent_ckpt), ("trained", trained_ckpt)):
        checkpoint.load(ckpt, [model], load_rng=False, missing_ok=(SLOT,))
        model.eval()
        if label == "untrained":
            masks.clear()
            out["parent"] = lm_loss(model, batches, t.seq_length, mbs)
        for b in budgets:
            masks.set_subnet(b.subnet)
            rows[b.name][label] = lm_loss(model, batches, t.seq_length, mbs)
            say(f"{label} {b.name}: {rows[b.name][label]:.4f}")
        masks.clear()
    out["budgets"] = list(rows.values())
    return out


def format_table(result: Dict) -> str:
    lines = [f"validation LM loss ({result['tokens']:,} tokens) after {result['stage']}:",
             f"{'budget':<10} {'target':>6} {'active params':>14} {'trained':>9} {'untrained':>10} {'parent':>8}"]
    for r in result["budgets"]:
        lines.append(f"{r['name']:<10} {r['fraction']:>6g} {r.get('active_params', 0):>14,} {r['trained']:>9.4f} "
                     f"{r['untrained']:>10.4f} {result['parent']:>8.4f}")
    lines.append("trained: the elastic checkpoint at each budget's subnet; untrained: the same subnet of the "
                 "permuted parent; parent: the full permuted parent")
    return "\n".join(lines)
