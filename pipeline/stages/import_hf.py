"""``import`` stage: a Hugging Face NemotronH directory -> ``<run>/import/checkpoints/iter_0000000``.

    python -m pipeline import --recipe R.yaml --hf /models/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16
    torchrun --nproc-per-node 8 -m pipeline import --recipe R.yaml --hf DIR     # shards at the recipe layout

Later stages start from it with ``training.init_from: import``. Conversion runs on CPU (gloo); a single
process writes the checkpoint at TP=PP=EP=1, which megatron reshards to any layout on load.
"""

from __future__ import annotations

import dataclasses
import os

from pipeline.config.domain import nonempty_str

DTYPES = {"auto": None, "bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def add_arguments(parser) -> None:
    parser.add_argument("--hf", required=True, metavar="DIR", type=nonempty_str,
                        help="HF model directory (config.json + safetensors)")
    parser.add_argument("--derive-model", action="store_true",
                        help="take the model section from config.json instead of checking the recipe's against it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing import of this run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                        help="checkpoint dtype (auto: as the HF tensors are stored)")


def _layout(recipe):
    """A single process writes at TP=PP=EP=CP=1 (dist checkpoints reshard on load)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = recipe.parallelism
    if world == 1 and (p.tp, p.pp, p.ep, p.cp) != (1, 1, 1, 1):
        print(f"import: one process, writing the checkpoint at tp=pp=ep=cp=1 (recipe layout tp={p.tp} pp={p.pp} "
              f"ep={p.ep} cp={p.cp} loads it by resharding)")
        p = dataclasses.replace(p, tp=1, pp=1, ep=1, cp=1, pp_layers=[])
    return dataclasses.replace(recipe, parallelism=p, run=dataclasses.replace(recipe.run, device="cpu"))


def dry_run(recipe, args) -> None:
    import yaml

    from pipeline.config.load import recipe_to_dict
    from pipeline.hf.importer import check_import

    checked, files = check_import(recipe, args.hf, args.derive_model)
    if args.derive_model:
        print("# model section derived from config.json (paste it into the recipe):")
        print(yaml.safe_dump({"model": recipe_to_dict(checked)["model"]}, sort_keys=False), end="")
    print(f"# {args.hf}: config.json and all {len(files.tensors)} tensors match the model section")


def main(recipe, args) -> None:
    import torch

    from pipeline.hf.importer import check_import, import_hf
    from pipeline.hf.malloc import pin_mmap_threshold

    pin_mmap_threshold()
    recipe, _ = check_import(recipe, args.hf, args.derive_model)  # fail fast, before megatron loads
    recipe = _layout(recipe)
    from pipeline import parallel

    parallel.initialize(recipe)
    try:
        dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
        out = import_hf(recipe, args.hf, os.path.join(recipe.run.root, recipe.run.name, "import"),
                        overwrite=args.overwrite, dtype=dtype)
        if torch.distributed.get_rank() == 0:
            print(f"imported {args.hf} -> {out}")
    finally:
        parallel.shutdown()
