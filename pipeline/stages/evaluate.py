"""``evaluate``: validation loss of each nested budget after elastic training vs the same subnet of the
untrained permuted parent vs the parent (a table on stdout, JSON in ``<root>/<name>/evaluate/``)."""

from __future__ import annotations

import json
import os

from pipeline.config.domain import nonempty_str
from pipeline.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--trained", choices=["stage1", "stage2", "distill"], default=None,
                        help="the elastic stage to score (default: stage2 if it has finished, else stage1; "
                             "distill: the prune + distil baseline)")
    parser.add_argument("--valid-as", choices=["stage1", "stage2", "distill"], default=None,
                        help="score on this stage's validation batches (default: the trained stage's), e.g. a distill "
                             "checkpoint on stage 2's, the batches its elastic run was scored on")
    parser.add_argument("--parent", default="importance", type=nonempty_str,
                        help="the untrained reference: a stage name or checkpoint path (default: importance)")


def _stage(recipe, args) -> str:
    if args.trained:
        return args.trained
    root = os.path.join(recipe.run.root, recipe.run.name)
    return "stage2" if os.path.isfile(os.path.join(root, "stage2", "elastic_budgets.json")) else "stage1"


def dry_run(recipe, args) -> None:
    print(f"# evaluate: {_stage(recipe, args)} vs {args.parent} on {recipe.run.root}/{recipe.run.name}")


def main(recipe, args) -> None:
    stage = _stage(recipe, args)
    import torch
    import torch.distributed as dist

    from megatron.core import parallel_state as ps

    from pipeline import parallel
    from pipeline.elastic.elastic_dir import read_budgets
    from pipeline.elastic.evaluate import evaluate_budgets, format_table
    from pipeline.elastic.subnet import BUDGETS_FILE
    from pipeline.training.loop import resolve_init, stage_dir

    path = os.path.join(stage_dir(recipe, stage), BUDGETS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{path} is missing: run {stage} to its end first")
    budgets = read_budgets(path, recipe.model)  # clear errors before any process group work
    trained = resolve_init(recipe, stage)
    try:
        parent = resolve_init(recipe, args.parent)
    except UserError as e:
        raise UserError(f"--parent {args.parent}: {str(e).split(': ', 1)[-1]}") from None
    device = parallel.initialize(recipe)
    t = getattr(recipe, stage).training
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    logger = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
              and ps.get_data_parallel_rank() == 0)
    say = (lambda msg: print(f"[evaluate] {msg}", flush=True)) if logger else (lambda msg: None)
    try:
        dtype = torch.bfloat16 if bf16 else torch.float32
        result = evaluate_budgets(recipe, stage, budgets, trained, parent, dtype, say, args.valid_as or "")
        if logger:
            out_dir = stage_dir(recipe, "evaluate")
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"{stage}.json"), "w") as f:
                json.dump(result, f, indent=2)
            print(format_table(result), flush=True)
        dist.barrier()
        _quantized(recipe, budgets, dtype, logger, say)
    finally:
        parallel.shutdown()


def _quantized(recipe, budgets, dtype, logger: bool, say) -> None:
    """After the qad stage: BF16 / FP8 PTQ / NVFP4 PTQ / NVFP4 QAD per budget (``evaluate/qad.json``)."""
    import torch.distributed as dist

    from pipeline.quant import calib
    from pipeline.quant.evaluate import evaluate_quant, format_table
    from pipeline.training.loop import resolve_init, stage_dir

    scales = os.path.join(stage_dir(recipe, "qad"), calib.SCALES_FILE)
    if not os.path.isfile(os.path.join(stage_dir(recipe, "qad"), "final.json")) or not os.path.isfile(scales):
        return
    ckpts = {"stage2": resolve_init(recipe, recipe.qad.budgets_from), "qad": resolve_init(recipe, "qad")}
    result = evaluate_quant(recipe, budgets, ckpts, calib.read_scales(scales), dtype, say)
    if logger:
        with open(os.path.join(stage_dir(recipe, "evaluate"), "qad.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(format_table(result), flush=True)
    dist.barrier()
