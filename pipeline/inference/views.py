"""Nested models as views: every budget's transformers NemotronH model built on the tensors of ONE full model.

A budget keeps a prefix of every axis (``slicing.tensor_cut``). Prefixes are strided views (``narrow``) of the
full model's parameters: the budget model's ``weight`` *is* the full tensor's storage, nothing is copied. Where
a budget keeps the first k/G heads of each of G groups (attention q/o, Mamba z/x/dt/conv/norm/out_proj with
more than one group) the kept rows are not one prefix, and a 2-D ``nn.Linear`` weight cannot be a strided view
of them; those tensors are ``torch.nn.utils.parametrize`` parametrizations whose ``original`` is the full
model's own Parameter and which gather the kept rows when the module runs (a transient tensor, freed after
the op; no persistent copy). Inside ``torch.nn.utils.parametrize.cached()`` (control.py wraps every
``generate`` call in it) each such tensor is gathered once per call instead of once per forward: the running
budget's gathered rows live for that call only. ``parameter_bytes`` measures what is held: the bytes of the
distinct storages behind every parameter and buffer of the given models.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.config.schema import ModelConfig
from pipeline.elastic.slicing import Cut, apply_cut, sliced_hf_config, tensor_cut
from pipeline.elastic.subnet import Subnet

_LIVE_LAYER = re.compile(r"(?:model|backbone)\.layers\.(\d+)\.(.+)")
_LIVE_EXPERTS = re.compile(r"mixer\.experts\.(up_proj|down_proj)")


class Gather(nn.Module):
    """Parametrization: the kept part of the full tensor, gathered when the module reads its weight."""

    def __init__(self, cut: Cut):
        super().__init__()
        self.cut = cut

    def forward(self, full: torch.Tensor) -> torch.Tensor:
        return apply_cut(full, self.cut)


def _simplify(cut: Cut, shape: Tuple[int, ...]) -> Cut:
    """Index sets that are a prefix 0..n-1 become the int n (a view instead of a gather)."""
    out = []
    for keep, size in zip(cut, shape):
        if isinstance(keep, torch.Tensor) and torch.equal(keep, torch.arange(len(keep))):
            keep = len(keep)
        out.append(None if isinstance(keep, int) and keep == size else keep)
    return tuple(out)


def _parent_tensor_and_cut(name: str, parent: Dict[str, torch.Tensor], model: ModelConfig, subnet: Subnet,
                           kept: list) -> Tuple[str, Cut]:
    """(the parent's live name, the cut) of the budget model's live tensor ``name`` (layers renumbered)."""
    layer = _LIVE_LAYER.fullmatch(name)
    if not layer:
        hf = name.replace("model.", "backbone.", 1) if name.startswith("model.") else name
        return name, tensor_cut(hf, model, subnet)
    i, rest = kept[int(layer.group(1))], layer.group(2)
    prefix = name[: name.index(".layers.")]
    live = f"{prefix}.layers.{i}.{rest}"
    experts = _LIVE_EXPERTS.fullmatch(rest)
    if experts:  # transformers holds routed experts as one 3-D tensor; the file holds one 2-D tensor each
        per_expert = tensor_cut(f"backbone.layers.{i}.mixer.experts.0.{experts.group(1)}.weight", model, subnet)
        return live, (subnet.size("experts", i),) + per_expert
    return live, tensor_cut(f"backbone.layers.{i}.{rest}", model, subnet)


def _set(model: nn.Module, name: str, value: torch.Tensor, buffer: bool) -> nn.Module:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if buffer:
        owner._buffers[leaf] = value
    else:
        owner._parameters[leaf] = value
    return owner


def _decode_floats(v):
    """transformers writes inf as {"__float__": "Infinity"} in config.json and decodes it on load; so do we."""
    if isinstance(v, dict):
        return float(v["__float__"]) if set(v) == {"__float__"} else {k: _decode_floats(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode_floats(x) for x in v]
    return v


def budget_config(base_cfg: dict, model: ModelConfig, subnet: Subnet, like):
    """The budget's transformers config: the sliced config.json, with ``like``'s kernel choices."""
    from transformers import NemotronHConfig

    sliced = sliced_hf_config(base_cfg, model, subnet, str(like.dtype).replace("torch.", ""))
    cfg = NemotronHConfig.from_dict(_decode_floats(sliced))
    for attr in ("_attn_implementation", "_experts_implementation"):
        if hasattr(like, attr):
            setattr(cfg, attr, getattr(like, attr))
    return cfg


def view_model(full: nn.Module, base_cfg: dict, model: ModelConfig, subnet: Subnet, copy: bool = False):
    """A ``NemotronHForCausalLM`` of ``subnet`` whose every parameter and buffer lives in ``full``'s storage.

    ``full`` is the loaded full (permuted) model of the elastic checkpoint; ``base_cfg`` its config.json;
    ``model`` the recipe model section of elastic.json. ValueError for a subnet with per-layer sizes.
    ``copy``: contiguous copies instead (the model ``slice`` would write, in memory: no gathers, more memory)."""
    from transformers import NemotronHForCausalLM

    subnet.check(model)
    cfg = budget_config(base_cfg, model, subnet, full.config)
    with torch.device("meta"):
        small = NemotronHForCausalLM(cfg)
    small.generation_config = full.generation_config
    parent = dict(full.named_parameters())
    parent_buffers = dict(full.named_buffers())
    kept = subnet.kept_layers(model)
    for name, is_buffer in [(n, False) for n, _ in small.named_parameters()] + \
                           [(n, True) for n, _ in small.named_buffers()]:
        live, cut = _parent_tensor_and_cut(name, parent, model, subnet, kept)
        src = parent_buffers[live] if is_buffer else parent[live]
        cut = _simplify(cut, tuple(src.shape))
        if copy:
            t = apply_cut(src, cut).clone(memory_format=torch.contiguous_format)
            _set(small, name, t if is_buffer else nn.Parameter(t, requires_grad=False), is_buffer)
        elif all(not isinstance(k, torch.Tensor) for k in cut):
            view = apply_cut(src, cut)
            _set(small, name, view if is_buffer else nn.Parameter(view, requires_grad=False), is_buffer)
        elif is_buffer:
            raise ValueError(f"{name}: a buffer with a non-prefix cut")
        else:
            owner = _set(small, name, src, False)
            device_cut = tuple(k.to(src.device) if isinstance(k, torch.Tensor) else k for k in cut)
            parametrize.register_parametrization(owner, name.rpartition(".")[2], Gather(device_cut), unsafe=True)
    left = [n for n, t in list(small.named_parameters()) + list(small.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"budget model tensors not mapped to the full model: {left[:3]}")
    return small.eval()


def storages(models: Iterable[nn.Module]) -> Dict[int, int]:
    """data_ptr -> bytes of every distinct storage behind the models' parameters and buffers."""
    out: Dict[int, int] = {}
    for m in models:
        for t in list(m.parameters()) + list(m.buffers()):
            s = t.untyped_storage()
            out[s.data_ptr()] = s.nbytes()
    return out


def parameter_bytes(models: Iterable[nn.Module]) -> int:
    """Bytes held by the models' parameters and buffers together (shared storage counted once)."""
    return sum(storages(models).values())


def gathered_bytes(model: nn.Module) -> int:
    """Bytes a forward gathers transiently (the non-prefix parametrized tensors, one at a time)."""
    total = 0
    for m in model.modules():
        if parametrize.is_parametrized(m):
            for name in m.parametrizations:
                t = getattr(m, name)
                total += t.numel() * t.element_size()
    return total


def same_storage(a: nn.Module, b: nn.Module) -> Optional[str]:
    """The first parameter of ``a`` whose storage is not among ``b``'s, or None."""
    held = storages([b])
    for name, t in list(a.named_parameters()) + list(a.named_buffers()):
        if t.untyped_storage().data_ptr() not in held:
            return name
    return None


def effective_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Name -> the tensor the model computes with (a parametrized weight as its gathered value), as a plain
    model's ``state_dict`` would name it."""
    out: Dict[str, torch.Tensor] = {}
    for prefix, m in model.named_modules():
        if ".parametrizations." in f".{prefix}." or prefix.endswith("parametrizations"):
            continue
        names = list(m._parameters) + list(m._buffers)
        if parametrize.is_parametrized(m):
            names += list(m.parametrizations)
        for leaf in names:
            t = getattr(m, leaf)
            if t is not None:
                out[f"{prefix}.{leaf}" if prefix else leaf] = t
    return out
