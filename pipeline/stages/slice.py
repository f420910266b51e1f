"""``slice`` stage: one budget of an elastic checkpoint as a standalone model, zero-shot (no training).

    python -m pipeline slice --recipe R.yaml --budget 23B --out nano-23b/            # HF NemotronH
    python -m pipeline slice --recipe R.yaml --budget 23B --out ft-23b/ --format megatron
    python -m pipeline slice --recipe R.yaml --storage-report                         # sizes from the recipe

``--checkpoint`` is the elastic checkpoint directory ``export`` wrote (default ``<root>/<name>/elastic``);
its ``elastic.json`` names the budgets. ``--format megatron`` writes a stage-like directory
(``checkpoints/iter_0000000``, ``config.yaml``, ``hf/``) for fine-tuning the sliced model
(``training.init_from: <that dir>/checkpoints``). ``--storage-report`` prints the elastic-vs-separate
storage table for the recipe's budgets resolved to its ``elastic.axes`` (budget j takes choice j).
"""

from __future__ import annotations

import dataclasses
import os

from pipeline.config.domain import nonempty_str, positive_float, positive_int
from pipeline.errors import UserError

DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", metavar="DIR", default="",
                        help="elastic checkpoint directory (default: <root>/<name>/elastic)")
    parser.add_argument("--budget", metavar="NAME", default=None, type=nonempty_str,
                        help="budget to cut out (a name in elastic.json)")
    parser.add_argument("--out", metavar="DIR", default=None, type=nonempty_str, help="output directory")
    parser.add_argument("--format", choices=("hf", "megatron"), default="hf",
                        help="hf: HF NemotronH safetensors; megatron: a dist checkpoint for further training")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="weight dtype (auto: as stored; fp32 extras such as A_log stay fp32)")
    parser.add_argument("--max-shard-gb", type=positive_float, default=5.0, help="safetensors shard size limit (hf)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--storage-report", action="store_true",
                        help="print the storage of one elastic checkpoint vs separate models for the recipe's "
                             "budgets (no checkpoint needed) and exit")
    parser.add_argument("--dtype-bytes", type=positive_int, default=2, help="bytes per weight for --storage-report")
    parser.add_argument("--quant", choices=("fp8", "nvfp4"), action="append", default=[],
                        help="--storage-report: also the FP8 / NVFP4 checkpoints (qad.exclude stays BF16; repeatable)")


def _checkpoint_dir(recipe, args) -> str:
    return args.checkpoint or os.path.join(recipe.run.root, recipe.run.name, "elastic")


def _plan(recipe, args):
    """(checkpoint dir, model, budget): everything checked before anything is written."""
    from pipeline.elastic.elastic_dir import ELASTIC_JSON, find_budget, read_elastic

    for flag in ("budget", "out"):
        if not getattr(args, flag):
            raise UserError(f"slice: --{flag} is required (or pass --storage-report)")
    ckpt = _checkpoint_dir(recipe, args)
    _, model, budgets = read_elastic(ckpt)
    budget = find_budget(budgets, args.budget, os.path.join(ckpt, ELASTIC_JSON))
    if not budget.subnet.homogeneous:
        layers = sorted(i for i, over in budget.subnet.per_layer.items() if over)
        raise UserError(f"{os.path.join(ckpt, ELASTIC_JSON)}: budget {budget.name!r} has per-layer sizes (layers "
                        f"{layers}); a NemotronH model holds one size per axis, so it cannot be sliced to a "
                        "standalone model")
    if os.path.abspath(args.out) == os.path.abspath(ckpt):
        raise UserError(f"--out {args.out} is the elastic checkpoint itself")
    return ckpt, model, budget


def storage_report(recipe, args) -> None:
    from pipeline.elastic.storage import budgets_from_axes, format_report, storage_report as report

    try:
        budgets = budgets_from_axes(recipe)
    except ValueError as e:
        raise UserError(f"{args.recipe}: {e}") from None
    if not budgets:
        raise UserError(f"{args.recipe}: elastic.budgets is empty")
    print(f"# {args.recipe}: budget j takes choice j of every elastic axis; {args.dtype_bytes} bytes per weight")
    print(format_report(report(recipe.model, budgets, dtype_bytes=args.dtype_bytes)))
    from pipeline.quant.storage import quant_storage_report

    for fmt in args.quant:
        print(f"# {fmt}: quantised linears as exported (docs/qad.md), every other tensor {args.dtype_bytes} bytes")
        print(format_report(quant_storage_report(recipe.model, budgets, fmt, recipe.qad, args.dtype_bytes)))


def dry_run(recipe, args) -> None:
    if args.storage_report:
        storage_report(recipe, args)
        return
    ckpt, model, budget = _plan(recipe, args)
    print(f"# slice {budget.name} ({budget.subnet.to_json()}) of {ckpt} -> {args.out} ({args.format})")


def main(recipe, args) -> None:
    import torch

    from pipeline.elastic.elastic_dir import slice_to_hf, slice_to_megatron
    from pipeline.hf.malloc import pin_mmap_threshold

    if args.storage_report:
        storage_report(recipe, args)
        return
    ckpt, model, budget = _plan(recipe, args)
    pin_mmap_threshold()
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    if args.format == "hf":
        out = slice_to_hf(ckpt, args.out, model, budget, dtype, int(args.max_shard_gb * (1 << 30)), args.overwrite)
    else:
        from pipeline import parallel

        single = dataclasses.replace(recipe.parallelism, tp=1, pp=1, ep=1, cp=1, pp_layers=[])
        recipe = dataclasses.replace(recipe, model=model, parallelism=single,
                                     run=dataclasses.replace(recipe.run, device="cpu"))
        parallel.initialize(recipe)
        try:
            out = slice_to_megatron(recipe, ckpt, args.out, model, budget, dtype, args.overwrite)
        finally:
            parallel.shutdown()
    print(f"sliced budget {budget.name} of {ckpt} -> {out} ({args.format})")
