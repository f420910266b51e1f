"""Step time of the elastic step vs a plain KD step of the same model, side by side in one process.

    python bench/bench_elastic_step.py                                  # tiny recipe, stage1 shapes
    python bench/bench_elastic_step.py --dtype bf16 model.hidden_size=1024 ...   # any recipe override

Both steps run megatron's forward-backward schedule over the same micro-batches with the same frozen
teacher and the same KD loss; the elastic step adds what stage 1 adds: budget sampling, the router
(Gumbel-softmax), the nested masks (hard), the budget loss. The plain step is the same student built
without elastic submodules. Weights are random (the cost does not depend on them). Prints the median
seconds of each over ``--repeats`` alternating runs (after a warm-up of each) and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import quiet_libraries  # noqa: E402

quiet_libraries()

import torch  # noqa: E402

from pipeline import parallel  # noqa: E402
from pipeline.config.load import load_recipe  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "tiny.yaml"))
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value")
    args = ap.parse_args()
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except UserError as e:
        sys.exit(f"error: {e}")

    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from pipeline.elastic.kd import forward_kl
    from pipeline.elastic.masks import ElasticMasks
    from pipeline.elastic.task import ElasticTask
    from pipeline.model.build import build_model
    from pipeline.training.synthetic import synthetic_batches

    device = parallel.initialize(recipe)
    bf16 = args.dtype == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    wrap = (lambda m: Float16Module(m.config, m)) if bf16 else (lambda m: m)  # noqa: E731
    t = recipe.stage1.training
    task = ElasticTask(recipe, "stage1")
    elastic = wrap(task.build_model(dtype))
    plain = wrap(build_model(recipe, dtype))
    teacher = wrap(build_model(recipe, dtype)).requires_grad_(False).eval()
    task.teacher, task.student = teacher, elastic
    task.masks = ElasticMasks(elastic, recipe.model, recipe.elastic.axes, task.order)
    task.num_microbatches = args.micro_batches  # choices drawn at begin_step, as the Trainer runs it
    batches = list(zip(range(args.micro_batches), synthetic_batches(recipe.model.vocab_size, t.seq_length,
                                                                    recipe.run.seed, 0, t.micro_batch_size, 0, 1)))
    batches = [b for _, b in batches]

    def kd_step(data_iterator, model):
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}
        with torch.no_grad():
            t_out = teacher(batch["tokens"], batch["position_ids"], None)
        s_out = model(batch["tokens"], batch["position_ids"], None)

        def loss(mask, out):
            per_token = forward_kl(out, t_out, mask, recipe.elastic.kd_temperature)
            value = per_token.sum() / mask.sum().clamp(min=1)
            return value, {"loss": value.detach()}

        return s_out, partial(loss, batch["loss_mask"])

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(step_fn, model) -> float:
        model.zero_grad(set_to_none=True)
        task.begin_step(0)
        sync()
        start = time.perf_counter()
        get_forward_backward_func()(forward_step_func=step_fn, data_iterator=iter(batches), model=[model],
                                    num_microbatches=len(batches), seq_length=t.seq_length,
                                    micro_batch_size=t.micro_batch_size, forward_only=False)
        sync()
        return time.perf_counter() - start

    run(kd_step, plain), run(task.forward_step, elastic)  # warm-up (kernels, autotuning)
    times = {"plain": [], "elastic": []}
    for _ in range(args.repeats):
        times["plain"].append(run(kd_step, plain))
        times["elastic"].append(run(task.forward_step, elastic))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = len(batches) * t.micro_batch_size * t.seq_length
    print(f"device {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) | "
          f"{args.dtype} | {len(batches)} micro-batches x {t.micro_batch_size} x {t.seq_length} tokens | "
          f"hidden {recipe.model.hidden_size} layers {recipe.model.num_layers}")
    print(f"plain KD step   {med['plain']:.4f} s  ({tokens / med['plain']:,.0f} tok/s)")
    print(f"elastic step    {med['elastic']:.4f} s  ({tokens / med['elastic']:,.0f} tok/s)")
    print(f"ratio elastic / plain = {med['elastic'] / med['plain']:.3f}")
    parallel.shutdown()


if __name__ == "__main__":
    main()
