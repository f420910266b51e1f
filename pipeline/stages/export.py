"""``export`` stage: a pipeline checkpoint -> a Hugging Face NemotronH directory (safetensors + config.json).

    python -m pipeline export --recipe R.yaml [--out DIR] [--checkpoint STAGE_OR_PATH]

The checkpoint is a stage name (its latest checkpoint), a checkpoint path, or by default the newest of
stage2 > stage1 > pretrain that has one (else the run's most recently written stage checkpoint).
config.json is written from the recipe's model section over the imported parent's config (token ids,
time-step settings and other keys we do not own carry through); tokenizer files come from
``data.tokenizer`` (or the demo tokenizer) and else from the imported parent. The result loads with
transformers (``NemotronHForCausalLM``), vLLM and SGLang.

When the checkpoint's stage wrote ``elastic_budgets.json`` beside its ``checkpoints/`` (stage 2), the
output is the elastic checkpoint (default ``<root>/<name>/elastic``): the HF model of the permuted full
weights, ``elastic.json`` (every budget's resolved sizes, the model section, the source checkpoint and a
storage report), the tokenizer, and a copy of the megatron checkpoint under ``megatron/`` for further
training. ``python -m pipeline slice`` cuts one budget out of it (docs/elastic_export.md).
"""

from __future__ import annotations

import dataclasses
import os

from pipeline.config.domain import nonempty_str, positive_float
from pipeline.errors import UserError

DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def add_arguments(parser) -> None:
    parser.add_argument("--out", metavar="DIR", default=None, type=nonempty_str,
                        help="output directory (default: <root>/<name>/elastic for an elastic checkpoint, "
                             "<root>/<name>/hf otherwise)")
    parser.add_argument("--checkpoint", metavar="STAGE_OR_PATH", default=None, type=nonempty_str,
                        help="stage name or checkpoint path (default: stage2 > stage1 > pretrain, else the "
                             "run's newest stage checkpoint)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="weight dtype (auto: as stored; fp32 extras such as A_log stay fp32)")
    parser.add_argument("--max-shard-gb", type=positive_float, default=5.0, help="safetensors shard size limit")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--budgets", metavar="STAGE_OR_FILE", default=None, type=nonempty_str,
                        help="export as an elastic checkpoint with these resolved budgets (a stage of this run or an "
                             "elastic_budgets.json), e.g. the untrained permuted parent with stage 2's subnets")
    parser.add_argument("--quant", choices=("fp8", "nvfp4"), default=None,
                        help="a quantised elastic checkpoint (ModelOpt HF layout, docs/qad.md): fp8 = PTQ of stage 2, "
                             "nvfp4 = the qad stage; default out <root>/<name>/elastic-<quant>")


def newest_checkpoint(recipe) -> str:
    """The run's stage whose latest checkpoint was written last."""
    from pipeline.training import checkpoint

    run = os.path.join(recipe.run.root, recipe.run.name)
    found = []
    for stage in sorted(os.listdir(run)) if os.path.isdir(run) else []:
        marker = os.path.join(run, stage, "checkpoints", checkpoint.LATEST)
        if os.path.isfile(marker):
            found.append((os.path.getmtime(marker), os.path.join(run, stage, "checkpoints")))
    if not found:
        raise UserError(f"no stage checkpoint under {run}; run a stage first or pass --checkpoint")
    return checkpoint.resolve(max(found)[1])


DEFAULT_STAGES = ("stage2", "stage1", "pretrain")  # what a user most likely wants exported, in order


def default_checkpoint(recipe) -> str:
    from pipeline.training import checkpoint

    for stage in DEFAULT_STAGES:
        root = os.path.join(recipe.run.root, recipe.run.name, stage, "checkpoints")
        if os.path.isfile(os.path.join(root, checkpoint.LATEST)):
            return checkpoint.resolve(root)
    return newest_checkpoint(recipe)


def resolve_checkpoint(recipe, spec: str) -> str:
    from pipeline.training import checkpoint

    if not spec:
        return default_checkpoint(recipe)
    if os.path.exists(spec):
        return checkpoint.resolve(spec)
    stage = os.path.join(recipe.run.root, recipe.run.name, spec, "checkpoints")
    if not os.path.isdir(stage):
        raise UserError(f"--checkpoint {spec}: neither a path nor a stage of this run ({stage} missing)")
    return checkpoint.resolve(stage)


def budgets_file(ckpt: str) -> str:
    """Where the checkpoint's stage keeps its resolved budgets: ``<stage>/elastic_budgets.json``."""
    from pipeline.elastic.subnet import BUDGETS_FILE

    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), BUDGETS_FILE)


def _plan(recipe, args):
    """(checkpoint, budgets file or "", budgets or None, output dir): everything checked before megatron loads."""
    from pipeline.elastic.elastic_dir import read_budgets

    quant = getattr(args, "quant", None)
    spec = args.checkpoint or ({"fp8": recipe.qad.budgets_from, "nvfp4": "qad"}[quant] if quant else "")
    ckpt = resolve_checkpoint(recipe, spec)
    path = budgets_file(ckpt)
    if getattr(args, "budgets", None):
        from pipeline.elastic.subnet import BUDGETS_FILE

        path = args.budgets if os.path.isfile(args.budgets) else os.path.join(
            recipe.run.root, recipe.run.name, args.budgets, BUDGETS_FILE)
        if not os.path.isfile(path):
            raise UserError(f"--budgets {args.budgets}: neither a budgets file nor a stage with {BUDGETS_FILE}")
    if quant and not os.path.isfile(path):
        raise UserError(f"--quant {quant}: {ckpt} is not an elastic checkpoint ({path} missing)")
    budgets = read_budgets(path, recipe.model) if os.path.isfile(path) else None
    run = os.path.join(recipe.run.root, recipe.run.name)
    out = args.out or os.path.join(run, (f"elastic-{quant}" if quant else "elastic") if budgets else "hf")
    return ckpt, (path if budgets else ""), budgets, out


def dry_run(recipe, args) -> None:
    from pipeline.hf import config as hf_config

    hf_config.hf_config_from_model(recipe.model)
    ckpt, path, budgets, out = _plan(recipe, args)
    what = f"elastic checkpoint, budgets {', '.join(b.name for b in budgets)} from {path}" if budgets else "HF model"
    print(f"# export {ckpt} -> {out} ({what})")


def main(recipe, args) -> None:
    import torch

    from data_prep.layout import tokenizer_dir
    from pipeline import parallel
    from pipeline.elastic.elastic_dir import export_elastic
    from pipeline.elastic.storage import format_report
    from pipeline.hf.exporter import export_hf
    from pipeline.hf.files import read_json
    from pipeline.hf.importer import HF_FILES
    from pipeline.hf.malloc import pin_mmap_threshold

    pin_mmap_threshold()
    ckpt, budgets_path, budgets, out_dir = _plan(recipe, args)
    parent = os.path.join(recipe.run.root, recipe.run.name, "import", HF_FILES)
    base = None
    if os.path.isfile(os.path.join(parent, "config.json")):
        base = read_json(os.path.join(parent, "config.json"), "imported parent's config.json")
    single = dataclasses.replace(recipe.parallelism, tp=1, pp=1, ep=1, cp=1, pp_layers=[])
    parallel.initialize(dataclasses.replace(recipe, parallelism=single,
                                            run=dataclasses.replace(recipe.run, device="cpu")))
    try:
        if torch.distributed.get_rank() == 0:
            dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
            common = dict(dtype=dtype, base_config=base, files_from=(tokenizer_dir(recipe), parent),
                          overwrite=args.overwrite, max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
            if args.quant:
                from pipeline.quant.calib import SCALES_FILE, read_scales
                from pipeline.quant.export import export_quantized_elastic
                from pipeline.training.loop import stage_dir

                amax = read_scales(os.path.join(stage_dir(recipe, "qad"), SCALES_FILE))
                out, report = export_quantized_elastic(recipe.model, ckpt, out_dir, budgets, budgets_path, args.quant,
                                                       recipe.qad, amax, **common)
                print(f"exported {args.quant} elastic checkpoint {ckpt} -> {out} "
                      f"(budgets: {', '.join(b.name for b in budgets)})")
                print(format_report(report))
            elif budgets:
                out, report = export_elastic(recipe.model, ckpt, out_dir, budgets, budgets_path, **common)
                print(f"exported elastic checkpoint {ckpt} -> {out} (budgets: {', '.join(b.name for b in budgets)})")
                print(format_report(report))
            else:
                out = export_hf(recipe.model, ckpt, out_dir, **common)
                print(f"exported {ckpt} -> {out}")
        torch.distributed.barrier()
    finally:
        parallel.shutdown()
