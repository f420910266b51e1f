"""``export`` stage: a pipeline checkpoint -> a Hugging Face NemotronH directory (safetensors + config.json).

    python -m pipeline export --recipe R.yaml --out exported/ [--checkpoint STAGE_OR_PATH]

The checkpoint is a stage name (its latest checkpoint), a checkpoint path, or by default the run's most
recently written stage checkpoint. config.json is written from the recipe's model section over the
imported parent's config (token ids, time-step settings and other keys we do not own carry through);
tokenizer files come from ``data.tokenizer`` (or the demo tokenizer) and else from the imported parent.
The result loads with transformers (``NemotronHForCausalLM``), vLLM and SGLang.
"""

from __future__ import annotations

import dataclasses
import json
import os

from pipeline.errors import UserError

DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (HF format)")
    parser.add_argument("--checkpoint", metavar="STAGE_OR_PATH", default="",
                        help="stage name or checkpoint path (default: the run's newest stage checkpoint)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="weight dtype (auto: as stored; fp32 extras such as A_log stay fp32)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


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


def resolve_checkpoint(recipe, spec: str) -> str:
    from pipeline.training import checkpoint

    if not spec:
        return newest_checkpoint(recipe)
    if os.path.exists(spec):
        return checkpoint.resolve(spec)
    stage = os.path.join(recipe.run.root, recipe.run.name, spec, "checkpoints")
    if not os.path.isdir(stage):
        raise UserError(f"--checkpoint {spec}: neither a path nor a stage of this run ({stage} missing)")
    return checkpoint.resolve(stage)


def dry_run(recipe, args) -> None:
    from pipeline.hf import config as hf_config

    hf_config.hf_config_from_model(recipe.model)
    print(f"# export {resolve_checkpoint(recipe, args.checkpoint)} -> {args.out}")


def main(recipe, args) -> None:
    import torch

    from data_prep.layout import tokenizer_dir
    from pipeline import parallel
    from pipeline.hf.exporter import export_hf
    from pipeline.hf.importer import HF_FILES
    from pipeline.hf.malloc import pin_mmap_threshold

    pin_mmap_threshold()
    ckpt = resolve_checkpoint(recipe, args.checkpoint)
    parent = os.path.join(recipe.run.root, recipe.run.name, "import", HF_FILES)
    base = None
    if os.path.isfile(os.path.join(parent, "config.json")):
        with open(os.path.join(parent, "config.json")) as f:
            base = json.load(f)
    single = dataclasses.replace(recipe.parallelism, tp=1, pp=1, ep=1, cp=1, pp_layers=[])
    parallel.initialize(dataclasses.replace(recipe, parallelism=single,
                                            run=dataclasses.replace(recipe.run, device="cpu")))
    try:
        if torch.distributed.get_rank() == 0:
            dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
            out = export_hf(recipe.model, ckpt, args.out, dtype=dtype, base_config=base,
                            files_from=(tokenizer_dir(recipe), parent), overwrite=args.overwrite,
                            max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
            print(f"exported {ckpt} -> {out}")
        torch.distributed.barrier()
    finally:
        parallel.shutdown()
