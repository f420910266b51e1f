"""The importance stage as a library: load the parent, one pass over the calibration set with hooks, optional
depth ranking, permute in place, save a model-only checkpoint and ``importance.json``.

Output (``<root>/<name>/importance/``): ``checkpoints/`` in the Trainer's format (``training.init_from:
importance`` of the elastic stages loads it), ``importance.json`` (``report.py``),
``importance_tensors.pt`` (per-expert FFN and per-head channel scores/orders, too large for JSON) and
``config.yaml`` (the resolved recipe).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Callable, Dict, Iterator

import torch
import torch.distributed as dist
import yaml

from megatron.core import parallel_state as ps

from pipeline import parallel
from pipeline.config.load import recipe_to_dict
from pipeline.config.schema import Recipe
from pipeline.elastic.importance import depth as depth_mod
from pipeline.elastic.importance.collect import Collector
from pipeline.elastic.importance.forward import chunks, forward_only
from pipeline.elastic.importance.layers import scoring_model
from pipeline.elastic.importance.orders import orders_from_scores
from pipeline.elastic.importance.plan import STAGE, calibration_plan, depth_rounds, resolve_parent
from pipeline.elastic.importance.report import write_report
from pipeline.elastic.permute import permute_model
from pipeline.errors import UserError
from pipeline.training import checkpoint
from pipeline.training.loop import stage_dir

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def model_dtype(recipe: Recipe, parent: str) -> torch.dtype:
    """``importance.precision``; auto = the parent's stored dtype, so the permuted copy is bit-exact."""
    if recipe.importance.precision != "auto":
        return DTYPES[recipe.importance.precision]
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(parent)
    key = "embedding.word_embeddings.weight"
    return meta[key].dtype if key in meta else next(iter(meta.values())).dtype


def calibration_batches(recipe: Recipe, plan: Dict[str, int], dp_rank: int, dp: int) -> Iterator:
    """This DP rank's micro-batches: global micro-batch m (samples [m*mbs, (m+1)*mbs)) goes to rank m % dp."""
    mbs, seq = plan["micro_batch_size"], plan["seq_length"]
    if recipe.importance.data == "synthetic":
        from pipeline.training.synthetic import synthetic_batches

        return synthetic_batches(recipe.model.vocab_size, seq, recipe.run.seed, 0, mbs, dp_rank, dp)
    from data_prep.loading import calibration_batches as blend_calibration

    return itertools.islice(blend_calibration(recipe, plan["samples"], seq, mbs), dp_rank, None, dp)


def score(model, recipe: Recipe, batches: Iterator, num_micro: int, plan: Dict[str, int],
          log: Callable[[str], None]):
    """The calibration pass with hooks -> (Scores, cost). One progress line per logging.log_interval
    micro-batches (of this rank)."""
    collector = Collector(model, recipe.model.pattern)
    tokens_per_micro = plan["micro_batch_size"] * plan["seq_length"] * ps.get_data_parallel_world_size()
    start, done = time.perf_counter(), 0
    try:
        for n in chunks(num_micro, recipe.logging.log_interval):
            forward_only(model, batches, n, plan["seq_length"], plan["micro_batch_size"])
            done += n
            elapsed = time.perf_counter() - start
            log(f"calibration {done}/{num_micro} micro-batches per rank | {done * tokens_per_micro:,} tokens | "
                f"{done * tokens_per_micro / elapsed:,.0f} tokens/s | eta {elapsed / done * (num_micro - done):.0f}s")
    finally:
        collector.close()
    seconds = time.perf_counter() - start
    scores = collector.finish()
    tokens = num_micro * tokens_per_micro
    cost = {"seconds": round(seconds, 3), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "tokens_per_s_per_rank": round(tokens / seconds / dist.get_world_size(), 1)}
    return scores, cost


def run(recipe: Recipe, log: Callable[[str], None] = print) -> Dict:
    """The whole stage on every rank; returns the report (rank 0) or {} (others)."""
    plan = calibration_plan(recipe)
    parent = resolve_parent(recipe)
    parallel.initialize(recipe)
    try:
        return _run(recipe, plan, parent, log)
    finally:
        parallel.shutdown()


def _run(recipe: Recipe, plan: Dict[str, int], parent: str, log) -> Dict:
    rank0 = dist.get_rank() == 0
    say = (lambda s: log(f"[{STAGE}] {s}")) if rank0 else (lambda s: None)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_step = plan["micro_batch_size"] * dp
    for key in ("samples", "depth_samples"):
        if plan[key] % per_step:
            raise UserError(f"importance.{key} = {plan[key]} is not a multiple of micro_batch_size x data-parallel "
                            f"size = {plan['micro_batch_size']} x {dp}")
    out_dir = stage_dir(recipe, STAGE)
    if rank0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(recipe_to_dict(recipe), f, sort_keys=False)
    dtype = model_dtype(recipe, parent)
    model = scoring_model(recipe, dtype)
    checkpoint.load(parent, [model], load_rng=False)
    say(f"parent {parent} ({str(dtype).replace('torch.', '')}) | {plan['samples']} samples x {plan['seq_length']} "
        f"tokens ({recipe.importance.data}) | tp {ps.get_tensor_model_parallel_world_size()} "
        f"pp {ps.get_pipeline_model_parallel_world_size()} ep {ps.get_expert_model_parallel_world_size()} dp {dp}")

    num_micro = plan["samples"] // per_step
    scores, cost = score(model, recipe, calibration_batches(recipe, plan, dp_rank, dp), num_micro, plan, say)
    costs = {"calibration": cost}
    depth = None
    if recipe.importance.depth:
        n_depth = plan["depth_samples"] // per_step
        subset = list(itertools.islice(calibration_batches(recipe, plan, dp_rank, dp), n_depth))

        def run_pass(on_final):
            forward_only(model, iter(subset), n_depth, plan["seq_length"], plan["micro_batch_size"], on_final)

        depth = depth_mod.removal_order(model, recipe.model.num_layers, depth_rounds(recipe), run_pass, say)
        depth["samples"] = plan["depth_samples"]
        costs["depth"] = {"seconds": depth.pop("seconds"), "forward_passes": depth["passes"],
                          "relative_to_calibration": round(depth["passes"] * plan["depth_samples"]
                                                           / plan["samples"], 3)}
        say(f"depth: removal order {depth['removal_order']}")

    orders = orders_from_scores(scores, recipe.model)
    start = time.perf_counter()
    permute_model(model, recipe.model.pattern, orders)
    costs["permute_seconds"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    ckpt_root = os.path.join(out_dir, "checkpoints")
    saved = checkpoint.save(ckpt_root, 0, [model], state={"stage": STAGE, "parent": parent})
    costs["save_seconds"] = round(time.perf_counter() - start, 3)
    report = write_report(out_dir, recipe, scores, orders, depth, costs,
                          {"parent": parent, "data": recipe.importance.data, **plan, "tokens": cost["tokens"],
                           "checkpoint": saved, "dtype": str(dtype).replace("torch.", "")})
    say(f"scored {cost['tokens']:,} tokens in {cost['seconds']:.1f}s ({cost['tokens_per_s']:,.0f} tokens/s); "
        f"permuted model in {saved}; report {os.path.join(out_dir, 'importance.json')}")
    return report
