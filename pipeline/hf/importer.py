"""HF NemotronH directory -> megatron-core dist checkpoint of the recipe's model, streaming.

Everything that can be checked without reading weights is checked first (config vs recipe, the full
tensor inventory with shapes), so a bad input fails before anything is written. The checkpoint is then
written into a hidden ``.partial`` directory beside its final place and renamed when complete; the
stage's ``latest_checkpointed_iteration.txt`` is written last. Memory: one link's tensors at a time (a
Mamba in_proj, one expert, the embedding), whatever the number of layers.
"""

from __future__ import annotations

import os
import shutil
from typing import Dict, Optional, Tuple

import torch

from pipeline.config.schema import Recipe
from pipeline.errors import UserError
from pipeline.hf import config as hf_config
from pipeline.hf.mapping import Link, hf_shapes, links
from pipeline.hf.safetensors_io import SafetensorsDir

ITERATION = 0
HF_FILES = "hf"  # the parent's non-weight files (config, tokenizer, generation config, remote code)


def check_inventory(files: SafetensorsDir, expected: Dict[str, Tuple[int, ...]], where: str) -> None:
    """Every expected tensor present with its shape, nothing else."""
    missing = [n for n in expected if n not in files.tensors]
    if missing:
        raise UserError(f"{where}: tensor {missing[0]} is missing ({len(missing)} missing in all); the recipe's "
                        f"model needs shape {list(expected[missing[0]])}")
    extra = [n for n in files.tensors if n not in expected]
    if extra:
        raise UserError(f"{where}: tensor {extra[0]} has no place in the recipe's model ({len(extra)} extra "
                        "tensors in all)")
    for name, shape in expected.items():
        got = files.tensors[name].shape
        if tuple(got) != tuple(shape):
            raise UserError(f"{where}: tensor {name} has shape {list(got)} but the recipe's model needs {list(shape)}")


def check_import(recipe: Recipe, hf_dir: str, derive: bool = False) -> Tuple[Recipe, SafetensorsDir]:
    """All checks that need no weights (and no megatron): the recipe (model section checked or derived)
    and the HF tensor index."""
    where = os.path.join(hf_dir, "config.json")
    recipe = resolve_model(recipe, hf_config.read_hf_config(hf_dir), derive, where)
    files = SafetensorsDir(hf_dir)
    check_inventory(files, hf_shapes(recipe.model), hf_dir)
    return recipe, files


def resolve_model(recipe: Recipe, cfg: dict, derive: bool, where: str) -> Recipe:
    """The recipe with its model section checked against config.json (or taken from it)."""
    if not derive:
        hf_config.check_model(cfg, recipe.model, where)
        return recipe
    import dataclasses

    from pipeline.config.validate import validate

    derived = dataclasses.replace(recipe, model=hf_config.model_from_hf(cfg, recipe.model, where))
    validate(derived, source=f"recipe with the model section of {where}")
    return derived


class _Materializer:
    """Produces one checkpoint shard from the HF tensors of its link; keeps the last link's tensors."""

    def __init__(self, files: SafetensorsDir, model_links):
        self.files = files
        self.by_key: Dict[Tuple[str, Optional[int]], Link] = {}
        for link in model_links:
            for key in link.mcore:
                self.by_key[(key, link.expert)] = link
        self._cached: Tuple[Optional[Link], Dict[str, torch.Tensor]] = (None, {})

    def link_of(self, sh) -> Link:
        expert = sh.global_offset[0] if sh.prepend_axis_num else None
        link = self.by_key.get((sh.key, expert))
        if link is None:
            raise UserError(f"megatron checkpoint key {sh.key} has no HF NemotronH source (model spec "
                            "holds a tensor the HF format does not)")
        return link

    def __call__(self, sh) -> torch.Tensor:
        link = self.link_of(sh)
        if self._cached[0] is not link:
            self._cached = (None, {})  # drop the previous link's tensors before reading the next
            values = link.to_mcore([self.files.read(n) for n in link.hf])
            self._cached = (link, dict(zip(link.mcore, values)))
        full = self._cached[1][sh.key]
        dims = sh.global_offset[sh.prepend_axis_num:]
        piece = full[tuple(slice(o, o + s) for o, s in zip(dims, sh.local_shape))]
        # the stored chunk keeps prepended (expert) axes as leading 1s, as megatron stores them
        return piece.to(sh.data.dtype).reshape((1,) * sh.prepend_axis_num + tuple(sh.local_shape)).contiguous()


def import_hf(recipe: Recipe, hf_dir: str, stage_dir: str, derive: bool = False, overwrite: bool = False,
              dtype: Optional[torch.dtype] = None, progress: bool = True) -> str:
    """Collective over the initialised process group; returns the written checkpoint directory.

    ``recipe`` must be the one ``pipeline.parallel.initialize`` was called with (its layout is the
    layout of the shards written)."""
    import torch.distributed as dist
    from tqdm import tqdm

    from pipeline.hf.dist_writer import local_bytes, meta_model, save_lazy, sharded_entries
    from pipeline.training import checkpoint

    recipe, files = check_import(recipe, hf_dir, derive)
    dtype = dtype or files.tensors["backbone.embeddings.weight"].dtype

    root = os.path.join(stage_dir, "checkpoints")
    final = checkpoint.iter_dir(root, ITERATION)
    if checkpoint.latest_iteration(root) is not None and not overwrite:
        raise UserError(f"{stage_dir} already holds an imported checkpoint; pass --overwrite to replace it")
    tmp = os.path.join(root, f".{os.path.basename(final)}.partial")
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()

    model_links = links(recipe.model)
    tensors, objects = sharded_entries(meta_model(recipe, dtype))
    materialize = _Materializer(files, model_links)
    for sh in tensors:  # every shard must have a source before any byte is written
        materialize.link_of(sh)
    bar = tqdm(total=local_bytes(tensors), unit="B", unit_scale=True, desc=f"import {os.path.basename(hf_dir)}",
               disable=not progress or rank != 0)
    common = {"state": {"iteration": ITERATION, "source": "hf", "hf_dir": os.path.abspath(hf_dir)}}
    try:
        save_lazy(tmp, tensors, objects, common, materialize, on_write=bar.update)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if rank == 0:
        _finish(recipe, hf_dir, stage_dir, root, tmp, final)
    dist.barrier()
    return final


def _finish(recipe: Recipe, hf_dir: str, stage_dir: str, root: str, tmp: str, final: str) -> None:
    import yaml

    from pipeline.config.load import recipe_to_dict
    from pipeline.training import checkpoint

    files_tmp = os.path.join(stage_dir, f".{HF_FILES}.partial")
    shutil.rmtree(files_tmp, ignore_errors=True)
    os.makedirs(files_tmp)
    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        if os.path.isfile(src) and not name.endswith(".safetensors") and not name.endswith(".safetensors.index.json"):
            shutil.copy2(src, os.path.join(files_tmp, name))
    for old in (final, os.path.join(stage_dir, HF_FILES)):
        shutil.rmtree(old, ignore_errors=True)  # --overwrite: the previous import goes only now
    os.replace(files_tmp, os.path.join(stage_dir, HF_FILES))
    os.replace(tmp, final)
    with open(os.path.join(stage_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(recipe_to_dict(recipe), f, sort_keys=False)
    latest_tmp = os.path.join(root, checkpoint.LATEST + ".tmp")
    with open(latest_tmp, "w") as f:
        f.write(str(ITERATION))
    os.replace(latest_tmp, os.path.join(root, checkpoint.LATEST))
