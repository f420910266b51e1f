"""megatron-core dist checkpoint of the recipe's model -> HF NemotronH safetensors shards + config.json.

The checkpoint's tensor metadata is checked against the mapping first (missing tensors, shape
disagreements). The HF tensor list is then known up front, so shards are planned before any weight
is read and each safetensors file is written header first, tensor by tensor: links are read from the
checkpoint in groups of at most ``max(largest tensor, GROUP_BYTES)`` (routed experts of one layer
share a checkpoint tensor, read in slices). Output goes to ``<out>.partial`` and is renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from pipeline.config.schema import ModelConfig
from pipeline.errors import UserError
from pipeline.hf import config as hf_config
from pipeline.hf.files import has_tokenizer, special_token_ids
from pipeline.hf.mapping import Link, hf_shapes, links, mcore_shapes
from pipeline.hf.safetensors_io import tensor_bytes, write_model_files

GROUP_BYTES = 64 << 20
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
CARRIED_FILES = TOKENIZER_FILES + ("generation_config.json",)


def checkpoint_tensors(ckpt_dir: str) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    except Exception as e:  # a torn or foreign .metadata
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{ckpt_dir}: cannot read the checkpoint's tensor metadata ({first[:200]})") from None
    return {k: (tuple(v.global_shape), v.dtype) for k, v in meta.items()}


def check_checkpoint(stored: Dict[str, Tuple[Tuple[int, ...], torch.dtype]], model: ModelConfig, where: str) -> None:
    expected = mcore_shapes(model)
    missing = [k for k in expected if k not in stored]
    if missing:
        raise UserError(f"{where}: checkpoint lacks tensor {missing[0]} ({len(missing)} missing in all); the "
                        f"recipe's model has it with shape {list(expected[missing[0]])}")
    for key, shape in expected.items():
        if stored[key][0] != tuple(shape):
            raise UserError(f"{where}: tensor {key} has shape {list(stored[key][0])} in the checkpoint but "
                            f"{list(shape)} in the recipe's model")
    extra = [k for k in stored if k.startswith(MODEL_PREFIXES) and k not in expected]
    if extra:
        raise UserError(f"{where}: checkpoint tensor {extra[0]} has no place in the recipe's model "
                        f"({len(extra)} extra in all)")


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty(0, dtype=dtype).element_size()


class _Reader:
    """Reads the megatron tensors of groups of links through ``dist_checkpointing.load``."""

    def __init__(self, ckpt_dir: str, stored, model: ModelConfig):
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

        self.ckpt_dir, self.stored, self.model = ckpt_dir, stored, model
        self.strategy = TorchDistLoadShardedStrategy(cache_metadata=True)

    def link_bytes(self, link: Link) -> int:
        total = 0
        for key in link.mcore:
            shape, dtype = self.stored[key]
            total += _nbytes(shape[1:] if link.expert is not None else shape, dtype)
        return total

    def load(self, group: List[Link]) -> List[List[torch.Tensor]]:
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        request = {}
        for li, link in enumerate(group):
            for key in link.mcore:
                shape, dtype = self.stored[key]
                if link.expert is None:
                    request[f"{li}/{key}"] = ShardedTensor.from_rank_offsets(key, torch.empty(shape, dtype=dtype),
                                                                             replica_id=0)
                else:  # one expert: a [1, ...] slice of the stacked tensor (no prepended axis, so one
                    # load may hold any subset of a key's experts)
                    request[f"{li}/{key}"] = ShardedTensor.from_rank_offsets(
                        key, torch.empty((1,) + shape[1:], dtype=dtype), (0, link.expert, shape[0]), replica_id=0)
        loaded = dist_checkpointing.load(request, self.ckpt_dir, sharded_strategy=self.strategy,
                                         validate_access_integrity=False)
        return [[loaded[f"{li}/{key}"].squeeze(0) if link.expert is not None else loaded[f"{li}/{key}"]
                 for key in link.mcore] for li, link in enumerate(group)]


def _groups(model_links: List[Link], reader: _Reader) -> Iterator[List[Link]]:
    budget = max(GROUP_BYTES, max(reader.link_bytes(link) for link in model_links))
    group, size = [], 0
    for link in model_links:
        b = reader.link_bytes(link)
        if group and size + b > budget:
            yield group
            group, size = [], 0
        group.append(link)
        size += b
    if group:
        yield group


def export_hf(model: ModelConfig, ckpt_dir: str, out_dir: str, dtype: Optional[torch.dtype] = None,
              base_config: Optional[dict] = None, files_from: Tuple[str, ...] = (), overwrite: bool = False,
              max_shard_bytes: int = 5 << 30, progress: bool = True) -> str:
    """Write ``out_dir`` (single process); ``files_from``: directories whose tokenizer / generation-config
    files are copied (first found wins)."""
    from tqdm import tqdm

    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    stored = checkpoint_tensors(ckpt_dir)
    check_checkpoint(stored, model, ckpt_dir)
    model_links, shapes = links(model), hf_shapes(model)
    main_dtype = stored["embedding.word_embeddings.weight"][1]
    out_dtype = {}  # HF name -> dtype: as stored, or --dtype for tensors stored in the model's main dtype
    for link in model_links:
        src = {stored[k][1] for k in link.mcore}
        kept = src.pop() if len(src) == 1 else main_dtype  # fp32 extras (A_log, D, expert bias) stay fp32
        for name in link.hf:
            out_dtype[name] = dtype if dtype is not None and kept == main_dtype else kept
    order = [(n, out_dtype[n], shapes[n]) for link in model_links for n in link.hf]
    config = hf_config.hf_config_from_model(model, base_config, hf_config.hf_dtype_name(dtype or main_dtype))
    tok_dir = next((d for d in files_from if has_tokenizer(d)), None)
    if tok_dir:  # the ids of the tokenizer shipped beside the weights, not transformers' NemotronH defaults
        config.update(special_token_ids(tok_dir))
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    reader = _Reader(ckpt_dir, stored, model)
    bar = tqdm(total=tensor_bytes(order), unit="B", unit_scale=True,
               desc=f"export {os.path.basename(out_dir.rstrip('/'))}", disable=not progress)
    try:
        write_model_files(tmp, order, _produce(model_links, reader, out_dtype), max_shard_bytes, bar)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        _copy_files(files_from, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _produce(model_links: List[Link], reader: _Reader, out_dtype) -> Iterator[Tuple[str, torch.Tensor]]:
    for group in _groups(model_links, reader):
        for link, values in zip(group, reader.load(group)):
            for name, tensor in zip(link.hf, link.to_hf(values)):
                yield name, tensor.to(out_dtype[name]).contiguous()


def _copy_files(dirs: Tuple[str, ...], out: str) -> None:
    for name in CARRIED_FILES:
        for d in dirs:
            src = os.path.join(d, name) if d else ""
            if src and os.path.isfile(src):
                shutil.copy2(src, os.path.join(out, name))
                break
    for d in dirs:  # remote code the carried config's auto_map may name
        if d and os.path.isdir(d):
            for name in os.listdir(d):
                if name.endswith(".py") and not os.path.exists(os.path.join(out, name)):
                    shutil.copy2(os.path.join(d, name), os.path.join(out, name))
