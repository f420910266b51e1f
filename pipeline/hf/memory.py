"""HF NemotronH tensors <-> a live megatron-core model, in memory (single process: TP = PP = EP = 1).

The same ``mapping.links`` as the streaming importer / exporter, without files: for tests, for comparing
an elastic (masked) model with a sliced one, and for small models. The model's own
``sharded_state_dict()`` names the checkpoint keys (its Mamba in_proj / conv1d factories split into
z/x/B/C/dt pieces; each routed expert is its own ShardedTensor on the stacked key, told apart by the
offset on the leading expert axis); loading runs megatron's factory merges, as ``dist_checkpointing.load``.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from pipeline.config.schema import ModelConfig
from pipeline.hf.mapping import links

Key = Tuple[str, Optional[int]]  # (checkpoint key, expert index or None)


def _check_single_layout() -> None:
    from megatron.core import parallel_state as ps

    sizes = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
             "ep": ps.get_expert_model_parallel_world_size()}
    if any(v != 1 for v in sizes.values()):
        raise ValueError(f"in-memory HF conversion needs a single-process layout, got {sizes}")


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):  # DDP / Float16Module wrappers
        model = model.module
    return model


def _expert(sh) -> Optional[int]:
    return int(sh.global_offset[0]) if sh.prepend_axis_num else None


def hf_state_from_model(model: torch.nn.Module, m: ModelConfig) -> Dict[str, torch.Tensor]:
    """Every HF tensor of the model (detached copies), in HF file order."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    _check_single_layout()
    sd = _bare(model).sharded_state_dict()
    apply_factories(sd)
    values: Dict[Key, torch.Tensor] = {}
    for sh in nested_values(sd):
        if isinstance(sh, ShardedTensor):
            values[(sh.key, _expert(sh))] = sh.data.detach().reshape(sh.local_shape)
    out = {}
    for link in links(m):
        missing = [k for k in link.mcore if (k, link.expert) not in values]
        if missing:
            raise ValueError(f"the model has no tensor {missing[0]} (expert {link.expert}); is it built from {m}?")
        hf = link.to_hf([values[(k, link.expert)] for k in link.mcore])
        out.update({name: t.clone(memory_format=torch.contiguous_format) for name, t in zip(link.hf, hf)})
    return out


def load_hf_state(model: torch.nn.Module, m: ModelConfig, hf_tensors: Dict[str, torch.Tensor]) -> None:
    """Copy HF tensors into the model (cast to each parameter's dtype); ValueError on a missing, extra or
    mis-shaped tensor."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, extract_matching_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    _check_single_layout()
    model_links = links(m)
    wanted = [n for link in model_links for n in link.hf]
    missing, extra = [n for n in wanted if n not in hf_tensors], sorted(set(hf_tensors) - set(wanted))
    if missing or extra:
        raise ValueError(f"HF tensors do not fit the model: missing {missing[:3]}, extra {extra[:3]}")
    values: Dict[Key, torch.Tensor] = {}
    for link in model_links:
        for key, t in zip(link.mcore, link.to_mcore([hf_tensors[n] for n in link.hf])):
            values[(key, link.expert)] = t

    bare = _bare(model)
    sd, _, factories = load_preprocess(bare.sharded_state_dict())
    sd, _ = extract_matching_values(sd, lambda x: isinstance(x, ShardedTensor))  # drop _extra_state objects

    def fill(sh):
        t = values.get((sh.key, _expert(sh)))
        if t is None:
            raise ValueError(f"no HF tensor maps to {sh.key} (expert {_expert(sh)})")
        full = tuple(sh.global_shape[sh.prepend_axis_num:])
        if tuple(t.shape) != full:
            raise ValueError(f"{sh.key}: HF tensors give shape {list(t.shape)}, the model needs {list(full)}")
        dims = sh.global_offset[sh.prepend_axis_num:]
        piece = t[tuple(slice(o, o + s) for o, s in zip(dims, sh.local_shape))]
        return piece.to(sh.data.dtype).reshape(sh.data.shape)

    dict_list_map_inplace(fill, sd)
    state = apply_factory_merges(sd, factories)
    missing_keys, unexpected = bare.load_state_dict(state, strict=False)
    missing_keys = [k for k in missing_keys if not k.endswith("_extra_state")]
    if missing_keys or unexpected:
        raise ValueError(f"model keys not loaded: {missing_keys[:3]}, unexpected: {unexpected[:3]}")
