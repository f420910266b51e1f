"""The elastic checkpoint directory (one per trained family) and slicing a budget out of it.

    <root>/<name>/elastic/
      config.json, model*.safetensors   # the permuted full model as HF NemotronH (loads as the full budget)
      tokenizer files                   # from the data stage / the imported parent
      elastic.json                      # budgets (resolved subnets), model section, source, storage report
      megatron/iter_<iteration>/        # the chosen stage checkpoint, for further training
      megatron/latest_checkpointed_iteration.txt

A budget is sliced from the safetensors tensor by tensor (``slicing.slice_tensor``) into sharded output
written header first (``ShardWriter``); a megatron checkpoint of the sliced model goes through the
importer's streaming path. Every output is written beside its final place and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch

from pipeline.config.schema import ElasticConfig, ModelConfig, Recipe
from pipeline.elastic.slicing import name_map, slice_tensor, sliced_hf_config
from pipeline.elastic.subnet import ResolvedBudget, budgets_from_json
from pipeline.errors import UserError
from pipeline.hf.exporter import CARRIED_FILES
from pipeline.hf.mapping import hf_shapes, links
from pipeline.hf.safetensors_io import SafetensorsDir, tensor_bytes, write_model_files

ELASTIC_JSON = "elastic.json"
MEGATRON_DIR = "megatron"


def read_budgets(path: str, model: ModelConfig) -> List[ResolvedBudget]:
    """The budgets of an ``elastic_budgets.json`` / ``elastic.json``, each checked against ``model``."""
    from pipeline.hf.files import read_json

    data = read_json(path, "budgets file")  # missing / malformed: one line naming the file
    try:
        budgets = budgets_from_json(data, path)
        for b in budgets:
            try:
                b.subnet.check(model)
            except ValueError as e:
                raise ValueError(f"{path}: budget {b.name!r}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(first if first.startswith(path) else f"{path}: malformed ({first})") from None
    if not budgets:
        raise UserError(f"{path}: no budgets")
    return budgets


def read_elastic(ckpt_dir: str) -> Tuple[Dict[str, Any], ModelConfig, List[ResolvedBudget]]:
    """elastic.json of an elastic checkpoint directory: (its data, the model section, the budgets)."""
    path = os.path.join(ckpt_dir, ELASTIC_JSON)
    if not os.path.isfile(path):
        raise UserError(f"{ckpt_dir}: no {ELASTIC_JSON} (not an elastic checkpoint; write one with "
                        "`python -m pipeline export` from a stage-2 run)")
    try:
        with open(path) as f:
            data = json.load(f)
        model = ModelConfig(**data["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: malformed ({str(e).splitlines()[0]})") from None
    from pipeline.config.domain import check_domains

    def fail(msg):
        raise UserError(f"{path}: {msg}")

    check_domains(model, "model", fail)  # sizes a hand-edited elastic.json could break
    return data, model, read_budgets(path, model)


def find_budget(budgets: List[ResolvedBudget], name: str, where: str) -> ResolvedBudget:
    for b in budgets:
        if b.name == name:
            return b
    raise UserError(f"{where}: no budget {name!r} (budgets: {', '.join(b.name for b in budgets)})")


def prepare_out(out_dir: str, overwrite: bool) -> str:
    """The temporary directory beside ``out_dir`` (fresh); refuses a non-empty ``out_dir``."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def finish_out(tmp: str, out_dir: str) -> str:
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    elif os.path.exists(out_dir):
        os.remove(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def copy_megatron_checkpoint(ckpt: str, dest_root: str) -> str:
    """``ckpt`` (an iter_* dir) -> ``dest_root/<same name>`` + the latest marker (``checkpoint.resolve``-able)."""
    from pipeline.training import checkpoint

    os.makedirs(dest_root, exist_ok=True)
    name = os.path.basename(ckpt.rstrip("/"))
    shutil.copytree(ckpt, os.path.join(dest_root, name))
    iteration = name[len("iter_"):] if name.startswith("iter_") else "0"
    with open(os.path.join(dest_root, checkpoint.LATEST), "w") as f:
        f.write(str(int(iteration)) if iteration.isdigit() else "0")
    config = os.path.join(os.path.dirname(os.path.dirname(ckpt.rstrip("/"))), "config.yaml")
    if os.path.isfile(config):  # the stage's resolved recipe, beside the checkpoints as in a run dir
        shutil.copy2(config, os.path.join(dest_root, "config.yaml"))
    return os.path.join(dest_root, name)


def element_bytes(hf_dir: str) -> Dict[str, int]:
    """HF name -> bytes per element, from a directory's safetensors headers."""
    return {n: torch.empty(0, dtype=t.dtype).element_size() for n, t in SafetensorsDir(hf_dir).tensors.items()}


def write_elastic_json(out_dir: str, model: ModelConfig, budgets: List[ResolvedBudget], extra: Dict[str, Any]) -> None:
    from pipeline.elastic.subnet import budgets_to_json

    data = budgets_to_json(model, budgets)
    data.update(model=dataclasses.asdict(model), **extra)
    with open(os.path.join(out_dir, ELASTIC_JSON), "w") as f:
        json.dump(data, f, indent=2)


def copy_carried_files(src_dir: str, out_dir: str) -> None:
    """Tokenizer / generation config / remote code of ``src_dir`` (config.json is rewritten, not copied)."""
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if os.path.isfile(src) and (name in CARRIED_FILES or name.endswith(".py")):
            shutil.copy2(src, os.path.join(out_dir, name))


def export_elastic(model: ModelConfig, ckpt: str, out_dir: str, budgets: List[ResolvedBudget], budgets_path: str,
                   dtype: Optional[torch.dtype] = None, base_config: Optional[dict] = None,
                   files_from: Tuple[str, ...] = (), overwrite: bool = False, max_shard_bytes: int = 5 << 30,
                   progress: bool = True) -> Tuple[str, Dict[str, Any]]:
    """Write the elastic checkpoint directory of ``ckpt``; returns (its path, the storage report).
    Single process (``pipeline.parallel.initialize`` must have run)."""
    from pipeline.elastic.storage import storage_report
    from pipeline.hf.exporter import export_hf

    tmp = prepare_out(out_dir, overwrite)
    try:
        export_hf(model, ckpt, tmp, dtype=dtype, base_config=base_config, files_from=files_from, overwrite=True,
                  max_shard_bytes=max_shard_bytes, progress=progress)
        copy_megatron_checkpoint(ckpt, os.path.join(tmp, MEGATRON_DIR))
        stored = element_bytes(tmp)
        report = storage_report(model, budgets, dtype_bytes=stored["backbone.embeddings.weight"], element_bytes=stored)
        write_elastic_json(tmp, model, budgets, {
            "source_checkpoint": os.path.abspath(ckpt), "budgets_file": os.path.abspath(budgets_path),
            "megatron_checkpoint": MEGATRON_DIR, "storage": report})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_out(tmp, out_dir), report


def slice_to_hf(src_dir: str, out_dir: str, model: ModelConfig, budget: ResolvedBudget,
                dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 << 30, overwrite: bool = False,
                progress: bool = True) -> str:
    """Write budget ``budget`` of the elastic HF directory ``src_dir`` as a standalone HF NemotronH model."""
    from tqdm import tqdm

    from pipeline.hf import config as hf_config
    from pipeline.hf.files import has_tokenizer, special_token_ids
    from pipeline.hf.importer import check_inventory

    where = os.path.join(src_dir, ELASTIC_JSON)
    base = hf_config.read_hf_config(src_dir)
    try:
        cfg_dtype = hf_config.hf_dtype_name(dtype) if dtype is not None else None
        cfg = sliced_hf_config(base, model, budget.subnet, cfg_dtype)
    except ValueError as e:
        raise UserError(f"{where}: budget {budget.name!r}: {e}") from None
    if has_tokenizer(src_dir):  # the sliced model generates with the parent's tokenizer
        cfg.update(special_token_ids(src_dir))
    from pipeline.quant.export import read_quant_dir

    if read_quant_dir(src_dir) is not None:  # FP8 / NVFP4 (docs/qad.md): packed weights and block scales by prefix
        if dtype is not None:
            raise UserError(f"{src_dir} is quantised: --dtype does not apply")
        return _slice_quantized(src_dir, out_dir, model, budget, cfg, max_shard_bytes, overwrite, progress)
    files = SafetensorsDir(src_dir)
    check_inventory(files, hf_shapes(model), src_dir)
    small = budget.subnet.model_config(model)
    parent_of = {new: old for old, new in name_map(hf_shapes(model), model, budget.subnet)}
    shapes = hf_shapes(small)
    main_dtype = files.tensors["backbone.embeddings.weight"].dtype
    out_dtype = {}
    for new, old in parent_of.items():  # --dtype recasts the main dtype; fp32 extras stay fp32, as in export
        src = files.tensors[old].dtype
        out_dtype[new] = dtype if dtype is not None and src == main_dtype else src
    order = [(n, out_dtype[n], shapes[n]) for link in links(small) for n in link.hf]
    tmp = prepare_out(out_dir, overwrite)
    os.makedirs(tmp)
    sliced = ((name, slice_tensor(parent_of[name], files.read(parent_of[name]), model, budget.subnet).to(want))
              for name, want, _ in order)
    bar = tqdm(total=tensor_bytes(order), unit="B", unit_scale=True, desc=f"slice {budget.name}",
               disable=not progress)
    try:
        write_model_files(tmp, order, sliced, max_shard_bytes, bar)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        copy_carried_files(src_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return finish_out(tmp, out_dir)


def _slice_quantized(src_dir: str, out_dir: str, model: ModelConfig, budget: ResolvedBudget, cfg: dict,
                     max_shard_bytes: int, overwrite: bool, progress: bool) -> str:
    from tqdm import tqdm

    from pipeline.quant.export import read_quant_dir, slice_quantized_dir

    fmt, excluded = read_quant_dir(src_dir)
    tmp = prepare_out(out_dir, overwrite)
    os.makedirs(tmp)
    bar = tqdm(unit="B", unit_scale=True, desc=f"slice {budget.name} ({fmt})", disable=not progress)
    try:
        slice_quantized_dir(src_dir, tmp, model, budget, fmt, excluded, cfg, max_shard_bytes, bar)
        copy_carried_files(src_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return finish_out(tmp, out_dir)


def slice_to_megatron(recipe: Recipe, src_dir: str, out_dir: str, model: ModelConfig, budget: ResolvedBudget,
                      dtype: Optional[torch.dtype] = None, overwrite: bool = False, progress: bool = True) -> str:
    """Budget ``budget`` as a megatron dist checkpoint, laid out as a stage directory
    (``out_dir/checkpoints/iter_0000000``, ``config.yaml``, ``hf/``) that ``training.init_from`` can name.

    Single process; ``pipeline.parallel.initialize`` must have run at TP = PP = EP = 1."""
    from pipeline.hf.importer import import_hf

    tmp = prepare_out(out_dir, overwrite)
    sliced_hf = tmp + "-hf"
    try:
        slice_to_hf(src_dir, sliced_hf, model, budget, dtype, overwrite=True, progress=progress)
        small = dataclasses.replace(recipe, model=budget.subnet.model_config(model), elastic=ElasticConfig())
        import_hf(small, sliced_hf, tmp, dtype=dtype, progress=progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(sliced_hf, ignore_errors=True)
    return finish_out(tmp, out_dir)
