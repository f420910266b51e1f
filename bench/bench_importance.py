"""Cost of the importance pass relative to a plain forward over the same calibration data, side by side.

    python bench/bench_importance.py                                   # tiny recipe, 32 x 256 tokens
    python bench/bench_importance.py model.hidden_size=512 --samples 16  # any recipe override
    torchrun --standalone --nproc-per-node 2 bench/bench_importance.py parallelism.tp=2

Builds the recipe's model (random weights: the cost does not depend on them), then alternates a plain
forward pass and an importance pass (every hook of ``pipeline.elastic.importance.collect`` attached, then
the DP/TP/EP reduction) over the same micro-batches, ``--repeats`` times each after one warm-up of each, and
prints the median seconds of both and their ratio. Both run through the same forward-only megatron schedule.
The depth ranking (optional) is not included: it costs plain forwards (its pass count is in importance.json).
The recipe's elastic axes are cleared (the bench does not use them), so model sizes can be overridden freely.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import quiet_libraries  # noqa: E402

quiet_libraries()  # before megatron is imported: it warns about every optional kernel it lacks

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline import parallel  # noqa: E402
from pipeline.config.load import load_recipe  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "tiny.yaml"))
    ap.add_argument("--samples", type=int, default=32, help="calibration sequences per pass (all ranks)")
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = ap.parse_args()
    no_axes = [f"elastic.axes.{a}=[]" for a in ("hidden", "attention_heads", "mamba_heads", "ffn", "moe_ffn",
                                                 "shared_expert_ffn", "experts", "depth")]
    recipe = load_recipe(args.recipe, no_axes + list(args.overrides) + [
        "importance.data=synthetic", f"importance.samples={args.samples}", f"importance.seq_length={args.seq_length}",
        f"importance.micro_batch_size={args.micro_batch_size}", "importance.depth=false"])

    from megatron.core import parallel_state as ps

    from pipeline.elastic.importance.collect import Collector
    from pipeline.elastic.importance.forward import forward_only
    from pipeline.elastic.importance.layers import scoring_model
    from pipeline.elastic.importance.plan import calibration_plan
    from pipeline.elastic.importance.run import calibration_batches

    device = parallel.initialize(recipe)
    model = scoring_model(recipe, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    plan = calibration_plan(recipe)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    n_micro = plan["samples"] // (plan["micro_batch_size"] * dp)
    batches = list(itertools.islice(calibration_batches(recipe, plan, dp_rank, dp), n_micro))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def plain() -> None:
        forward_only(model, iter(batches), n_micro, plan["seq_length"], plan["micro_batch_size"])

    def importance() -> None:
        collector = Collector(model, recipe.model.pattern)
        plain()
        collector.finish()

    def timed(fn) -> float:
        dist.barrier()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        dist.barrier()
        return time.perf_counter() - start

    times = {"plain": [], "importance": []}
    for r in range(args.repeats + 1):  # the first round warms up (kernels, allocator) and is not counted
        for name, fn in (("plain", plain), ("importance", importance)):
            t = timed(fn)
            if r:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    if dist.get_rank() == 0:
        m, p = recipe.model, recipe.parallelism
        tokens = plan["samples"] * plan["seq_length"]
        print(f"model {m.pattern} hidden {m.hidden_size} experts {m.num_experts} | tp {p.tp} pp {p.pp} ep {p.ep} "
              f"dp {dp} | {device.type} {args.dtype} | {plan['samples']} x {plan['seq_length']} tokens, "
              f"micro-batch {plan['micro_batch_size']}, median of {args.repeats}")
        for name in ("plain", "importance"):
            print(f"  {name:<11} {med[name]:8.3f} s  {tokens / med[name]:12,.0f} tokens/s   "
                  f"(runs: {', '.join(f'{t:.3f}' for t in times[name])})")
        print(f"importance pass / plain forward = {med['importance'] / med['plain']:.3f}")
    parallel.shutdown()


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a bad override or flag: one line, as the CLI
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
