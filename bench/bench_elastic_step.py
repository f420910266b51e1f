"""Step time of the elastic step vs a plain KD step of the same model, side by side in one process.

    python bench/bench_elastic_step.py                                  # tiny recipe, stage1 shapes
    python bench/bench_elastic_step.py --dtype bf16 model.hidden_size=1024 ...   # any recipe override
    python bench/bench_elastic_step.py --recipe recipes/proxy_1b.yaml --dtype bf16 --qad   # + the QAD step

Both steps run megatron's forward-backward schedule over the same micro-batches with the same frozen
teacher and the same KD loss; the elastic step adds what stage 1 adds: budget sampling, the router
(Gumbel-softmax), the nested masks (hard), the budget loss. The plain step is the same student built
without elastic submodules. Weights are random (the cost does not depend on them). Prints the median
seconds of each over ``--repeats`` alternating runs (after a warm-up of each) and their ratio.

``--qad`` adds the nested QAD step (``pipeline.quant.task.QADTask``: the budget's fixed subnet on student and BF16
teacher, the student NVFP4 fake-quantised, weights and activations, scales calibrated on the same batches) and
the same step with the quantiser off; both use megatron's own linears (the fake-quant hooks' backend), so
"qad / elastic" includes any TE-vs-local difference and "qad / qad-bf16" is the quantiser's own cost.
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
    ap.add_argument("--qad", action="store_true", help="also time the nested NVFP4 QAD step (docs/qad.md)")
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
    task.recompute = False  # what ElasticTask.attach sets without activation recompute (the bench runs none)
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

    steps = {"plain": (kd_step, plain), "elastic": (task.forward_step, elastic)}
    if args.qad:
        from pipeline.elastic.storage import budgets_from_axes
        from pipeline.quant.calib import calibrate
        from pipeline.quant.task import QADTask, build_quant_model

        qad = QADTask(recipe, budgets=budgets_from_axes(recipe))
        qad_student = wrap(qad.build_model(dtype))
        qad.attach(qad_student, wrap(build_quant_model(recipe, dtype)).requires_grad_(False).eval())
        calibrate(qad_student, qad.fq, qad.masks, qad.budgets, batches, t.seq_length)

        def quant(fmt):
            def step(data_iterator, model):
                qad.fq.set_format(fmt)
                return qad.forward_step(data_iterator, model)
            return step

        steps["qad-bf16"] = (quant(None), qad_student)
        steps["qad"] = (quant(recipe.qad.format), qad_student)
    for fn, model in steps.values():  # warm-up (kernels, autotuning)
        run(fn, model)
    times = {k: [] for k in steps}
    for _ in range(args.repeats):
        for k, (fn, model) in steps.items():
            times[k].append(run(fn, model))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = len(batches) * t.micro_batch_size * t.seq_length
    print(f"device {device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) | "
          f"{args.dtype} | {len(batches)} micro-batches x {t.micro_batch_size} x {t.seq_length} tokens | "
          f"hidden {recipe.model.hidden_size} layers {recipe.model.num_layers}")
    print(f"plain KD step   {med['plain']:.4f} s  ({tokens / med['plain']:,.0f} tok/s)")
    print(f"elastic step    {med['elastic']:.4f} s  ({tokens / med['elastic']:,.0f} tok/s)")
    print(f"ratio elastic / plain = {med['elastic'] / med['plain']:.3f}")
    if args.qad:
        print(f"qad step (bf16)  {med['qad-bf16']:.4f} s  ({tokens / med['qad-bf16']:,.0f} tok/s)  local linears, "
              f"quantiser off")
        print(f"qad step ({recipe.qad.format}) {med['qad']:.4f} s  ({tokens / med['qad']:,.0f} tok/s)")
        print(f"ratio qad / elastic = {med['qad'] / med['elastic']:.3f} | qad / qad-bf16 = "
              f"{med['qad'] / med['qad-bf16']:.3f}")
    parallel.shutdown()


if __name__ == "__main__":
    main()
