"""Zero-shot slicing: one budget's standalone model out of the elastic (permuted, full-size) weights.

The one slicer of the project, on Hugging Face NemotronH tensor names (unsharded tensors, as the
exported elastic checkpoint stores them). After the importance stage every axis is sorted
most-important-first, so a budget (a ``Subnet``) keeps a prefix of each axis it touches:

- hidden: embedding and LM-head columns, every norm, the input columns of in_proj / q / k / v / up /
  router, the output rows of out_proj / o_proj / down, the final norm;
- attention heads: the first k/G query heads of each of the G KV groups (q rows, o_proj columns);
  k / v keep every group;
- Mamba heads: the first k/G heads of each of the G B/C groups (z, x and dt rows of in_proj, conv1d x
  channels, A_log, D, dt_bias, the gated norm, out_proj columns); B / C are shared per group and untouched;
- FFN widths: up rows / down columns (dense MLP ``ffn``, routed experts ``moe_ffn``, ``shared_expert_ffn``);
- experts: experts [:k] with the router's rows and expert bias [:k];
- depth: skipped layers are dropped and the kept ones renumbered 0..n-1.

Sizes of the layer axes come from ``Subnet.size(axis, layer)`` (per-layer overrides honoured; ``layer`` is
the parent's index). Heterogeneous subnets slice fine but have no single HF config (``sliced_hf_config``).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from pipeline.config.schema import ModelConfig
from pipeline.elastic.subnet import Subnet
from pipeline.hf import config as hf_config

_LAYER = re.compile(r"backbone\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mixer\.experts\.(\d+)\.(up_proj|down_proj)\.weight")


def grouped_head_channels(num_heads: int, num_groups: int, keep: int, head_dim: int) -> torch.Tensor:
    """Channel indices of the first ``keep / num_groups`` heads of every group (heads are group-major)."""
    per_group, keep_per_group = num_heads // num_groups, keep // num_groups
    heads = torch.arange(num_heads).view(num_groups, per_group)[:, :keep_per_group].reshape(-1)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


# A cut says, per dimension of a tensor, what a subnet keeps: None (everything), an int n (the prefix [:n]) or
# a LongTensor of indices (the kept heads of every group: not a prefix when there are several groups).
Cut = Tuple[Union[None, int, torch.Tensor], ...]


def _mamba_in_proj_rows(m: ModelConfig, heads: int) -> torch.Tensor:
    """Kept rows of in_proj = [z, x, B, C, dt]: the kept heads' z / x / dt rows, B and C whole."""
    H, P = m.mamba_num_heads, m.mamba_head_dim
    d_inner, bc = H * P, m.mamba_num_groups * m.mamba_state_dim
    ch = grouped_head_channels(H, m.mamba_num_groups, heads, P)
    hd = grouped_head_channels(H, m.mamba_num_groups, heads, 1)
    return torch.cat([ch, d_inner + ch, 2 * d_inner + torch.arange(2 * bc), 2 * d_inner + 2 * bc + hd])


def _mamba_conv_rows(m: ModelConfig, heads: int) -> torch.Tensor:
    """Kept conv1d channels = [x, B, C]: the kept heads' x channels, B and C whole."""
    d_inner, bc = m.mamba_num_heads * m.mamba_head_dim, m.mamba_num_groups * m.mamba_state_dim
    ch = grouped_head_channels(m.mamba_num_heads, m.mamba_num_groups, heads, m.mamba_head_dim)
    return torch.cat([ch, d_inner + torch.arange(2 * bc)])


def _layer_cut(i: int, rest: str, m: ModelConfig, s: Subnet) -> Cut:
    kind, h = m.pattern[i], s.hidden
    size = lambda axis: s.size(axis, i)  # noqa: E731
    if rest == "norm.weight":
        return (h,)
    if kind == "M":
        heads = size("mamba_heads")
        if rest == "mixer.in_proj.weight":
            return (_mamba_in_proj_rows(m, heads), h)
        if rest == "mixer.conv1d.weight":
            return (_mamba_conv_rows(m, heads), None, None)
        if rest == "mixer.conv1d.bias":
            return (_mamba_conv_rows(m, heads),)
        if rest in ("mixer.A_log", "mixer.D", "mixer.dt_bias"):
            return (grouped_head_channels(m.mamba_num_heads, m.mamba_num_groups, heads, 1),)
        ch = grouped_head_channels(m.mamba_num_heads, m.mamba_num_groups, heads, m.mamba_head_dim)
        if rest == "mixer.norm.weight":
            return (ch,)
        if rest == "mixer.out_proj.weight":
            return (h, ch)
    elif kind == "*":
        q = grouped_head_channels(m.num_attention_heads, m.num_query_groups, size("attention_heads"),
                                  m.attention_head_dim)
        if rest == "mixer.q_proj.weight":
            return (q, h)
        if rest in ("mixer.k_proj.weight", "mixer.v_proj.weight"):
            return (None, h)
        if rest == "mixer.o_proj.weight":
            return (h, q)
    elif kind == "E":
        k, f, sf = size("experts"), size("moe_ffn"), size("shared_expert_ffn")
        if rest == "mixer.gate.weight":
            return (k, h)
        if rest == "mixer.gate.e_score_correction_bias":
            return (k,)
        expert = _EXPERT.fullmatch(rest)
        if expert:
            if int(expert.group(1)) >= k:
                raise ValueError(f"backbone.layers.{i}.{rest}: expert {expert.group(1)} is not kept "
                                 f"(the subnet keeps {k} experts)")
            return (f, h) if expert.group(2) == "up_proj" else (h, f)
        if rest == "mixer.shared_experts.up_proj.weight":
            return (sf, h)
        if rest == "mixer.shared_experts.down_proj.weight":
            return (h, sf)
    elif kind == "-":
        f = size("ffn")
        if rest == "mixer.up_proj.weight":
            return (f, h)
        if rest == "mixer.down_proj.weight":
            return (h, f)
    raise ValueError(f"backbone.layers.{i}.{rest}: not a NemotronH tensor of a {kind!r} layer")


def tensor_cut(name: str, model: ModelConfig, subnet: Subnet) -> Cut:
    """What the subnet keeps of the parent's tensor ``name``, per dimension (see ``Cut``).

    ValueError for a tensor the subnet drops (a skipped layer, an expert beyond k) or an unknown name."""
    h = subnet.hidden
    if name in ("backbone.embeddings.weight", "lm_head.weight"):
        return (None, h)
    if name == "backbone.norm_f.weight":
        return (h,)
    layer = _LAYER.fullmatch(name)
    if not layer:
        raise ValueError(f"{name}: not a NemotronH tensor name")
    i = int(layer.group(1))
    if not 0 <= i < model.num_layers:
        raise ValueError(f"{name}: layer {i} is beyond the model's {model.num_layers} layers")
    if i in subnet.skip_layers:
        raise ValueError(f"{name}: layer {i} is skipped by the subnet")
    return _layer_cut(i, layer.group(2), model, subnet)


def apply_cut(tensor: torch.Tensor, cut: Cut) -> torch.Tensor:
    """``tensor`` cut by ``cut``: prefixes are views (narrow), index sets are gathers (a new tensor)."""
    if len(cut) != tensor.dim():
        raise ValueError(f"a cut of {len(cut)} dims for a tensor of shape {tuple(tensor.shape)}")
    out = tensor
    for dim, keep in enumerate(cut):
        if isinstance(keep, int):
            out = out.narrow(dim, 0, keep)
    for dim, keep in enumerate(cut):
        if isinstance(keep, torch.Tensor):
            out = out.index_select(dim, keep.to(out.device))
    return out


def slice_tensor(name: str, tensor: torch.Tensor, model: ModelConfig, subnet: Subnet) -> torch.Tensor:
    """The subnet's part of the parent's tensor ``name`` (a new contiguous tensor, same dtype).

    ValueError for a tensor the subnet drops (a skipped layer, an expert beyond k) or an unknown name."""
    out = apply_cut(tensor, tensor_cut(name, model, subnet))
    if out.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        return out.clone(memory_format=torch.contiguous_format)  # a view: never alias the parent
    return out.contiguous()


def sliced_name(name: str, model: ModelConfig, subnet: Subnet) -> Optional[str]:
    """The tensor's name in the sliced model (layers renumbered), or None when the subnet drops it."""
    layer = _LAYER.fullmatch(name)
    if not layer:
        return name
    i, rest = int(layer.group(1)), layer.group(2)
    if i in subnet.skip_layers:
        return None
    expert = _EXPERT.fullmatch(rest)
    if expert and int(expert.group(1)) >= subnet.size("experts", i):
        return None
    kept = subnet.kept_layers(model)
    return f"backbone.layers.{kept.index(i)}.{rest}"


def name_map(names: Iterable[str], model: ModelConfig, subnet: Subnet) -> List[Tuple[str, str]]:
    """(parent name, sliced name) of every tensor of ``names`` the subnet keeps, in the given order."""
    pairs = []
    for name in names:
        new = sliced_name(name, model, subnet)
        if new is not None:
            pairs.append((name, new))
    return pairs


def slice_state_dict(hf_tensors: Dict[str, torch.Tensor], model: ModelConfig,
                     subnet: Subnet) -> Dict[str, torch.Tensor]:
    """Every tensor of the sliced model, by its (renumbered) HF name."""
    subnet.check(model)
    return {new: slice_tensor(old, hf_tensors[old], model, subnet)
            for old, new in name_map(hf_tensors, model, subnet)}


def sliced_hf_config(base_cfg: dict, model: ModelConfig, subnet: Subnet, dtype: Optional[str] = None) -> dict:
    """config.json of the sliced model: the parent's config with the subnet's sizes and layer pattern.

    ValueError for a subnet with per-layer sizes (an HF NemotronH config holds one size per axis)."""
    if not subnet.homogeneous:
        layers = sorted(i for i, over in subnet.per_layer.items() if over)
        raise ValueError(f"the subnet has per-layer sizes (layers {layers}); a Hugging Face NemotronH config "
                         "holds one size per axis, so this budget cannot be written as a HF model")
    subnet.check(model)
    base = base_cfg or {}
    dtype = dtype or base.get("dtype") or base.get("torch_dtype") or "bfloat16"
    return hf_config.hf_config_from_model(subnet.model_config(model), base, dtype)
