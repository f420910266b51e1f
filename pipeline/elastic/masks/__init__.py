"""Nested masks on one model chunk: the elastic model computes any subnet of the parent, hard or soft.

``ElasticMasks(chunk, model_cfg, axes, removal_order)`` attaches to one pipeline stage's HybridModel built
with ``build_elastic_model`` (``spec.py``; either backend) and sets the mask attributes of its elastic submodules
(``modules.py``); it owns no parameters. Layers are addressed by their own global ``layer_number``, so each
pipeline stage applies exactly its layers' part of the subnet. Where each axis is masked (docs/elastic.md):

- hidden: embedding output (forward hook: megatron has no seam there), every layer's output delta (its
  residual add), the norms' statistics over the active channels (pre-norms and the final norm);
- attention heads: per KV group prefix, on linear_proj's input; Mamba heads: per group prefix, in the
  gated norm (input masked, statistics over the kept heads' channels);
- FFN widths (dense, routed experts -- one prefix for all --, shared expert): fc2's input;
- experts: excluded from top-k selection in the router, combine weight times the mask;
- depth: skipped layers return their input; with soft choices each layer's delta is weighted instead.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model

from pipeline.config.schema import ElasticAxes, ModelConfig
from pipeline.elastic.masks.modules import InputMasked, SkippableLayer
from pipeline.elastic.router import AxisChoice, Choice, device_constant, keep_table_on, kind_layers, removed_layers
from pipeline.elastic.subnet import LAYER_AXES, Subnet

Plan = Dict[str, Dict[int, Optional[torch.Tensor]]]  # axis -> layer (-1: model-wide) -> unit weights

# where each layer kind's pre-norm is: a separate norm (local backend) or fused into the first linear (TE)
PRE_NORMS = {"M": ("norm", "mixer.in_proj"), "*": ("input_layernorm", "self_attention.linear_qkv"),
             "-": ("pre_mlp_layernorm", "mlp.linear_fc1"), "E": ("pre_mlp_layernorm",)}


def pre_norm(layer, sym: str):
    """The module of ``layer`` that normalises the residual stream (it carries the hidden mask)."""
    for path in PRE_NORMS[sym]:
        module = attrgetter(path)(layer)
        if hasattr(module, "set_hidden_mask"):
            return module
    raise ValueError(f"layer {layer.layer_number} ({sym}) has no elastic pre-norm: build it with build_elastic_model")


def _host_weights(a: AxisChoice, hard: bool) -> np.ndarray:
    """``Choice.weights`` on the host: the one-hot of the argmax (hard; its value is exactly 1) or the probs."""
    probs, top = a.host()
    if not hard:
        return probs
    return (np.arange(probs.shape[-1]) == np.expand_dims(top, -1)).astype(np.float64)


def _mask_output(module, inputs, output):
    mask = getattr(module, "elastic_mask", None)
    return output if mask is None else output * mask.to(output.dtype)


class ElasticMasks:
    def __init__(self, model_chunk: torch.nn.Module, model_cfg: ModelConfig, axes: ElasticAxes,
                 removal_order: Sequence[int] = ()):
        model = unwrap_model(model_chunk)
        decoder = model.decoder
        self.m, self.axes, self.removal_order = model_cfg, axes, list(removal_order)
        self.layers = [(layer.layer_number - 1, sym, layer)
                       for sym, layer in zip(decoder.layer_type_list, decoder.layers)]
        if not all(isinstance(layer, SkippableLayer) for _, _, layer in self.layers):
            raise ValueError("ElasticMasks needs a model built with pipeline.elastic.masks.spec.build_elastic_model")
        self.pre_norms = {index: pre_norm(layer, sym) for index, sym, layer in self.layers}
        self.device = next(model.parameters()).device
        self.embedding = model.embedding if model.pre_process else None
        self.final_norm = decoder.final_norm if model.post_process and decoder.post_layer_norm else None
        if self.embedding is not None:
            self.embedding.elastic_mask = None
            self._hook = self.embedding.register_forward_hook(_mask_output)

    # ---- public API
    def clear(self) -> None:
        """No masks anywhere: the parent's function, through the parent's code path."""
        self._apply({}, {}, set(), None, float(self.m.hidden_size))

    def set_subnet(self, subnet: Subnet) -> None:
        """Exact hard masks (weights 0/1) of a fixed subnet."""
        subnet.check(self.m)
        plan: Plan = {}
        share: Dict[int, float] = {}
        active = float(subnet.size("hidden", -1))
        for axis in ("hidden",) + LAYER_AXES:
            n, groups = self._units(axis)
            layers = [-1] if axis == "hidden" else kind_layers(self.m, axis)
            sizes = {layer: subnet.size(axis, layer) // groups for layer in layers}
            plan[axis] = {layer: None if k == n else (torch.arange(n, device=self.device) < k).float()
                          for layer, k in sizes.items()}
            if axis == "mamba_heads":
                share = {layer: k / n for layer, k in sizes.items()}
        self._apply(plan, share, set(subnet.skip_layers), None, active)

    def set_choice(self, choice: Choice) -> None:
        """Masks of the router's choice: hard (argmax, straight-through) or soft (mixture of prefixes).

        The masks are built on the device; the few host numbers (a fused kernel's eps, the skipped layers) come
        from the choice's host copy (``Choice.fetch_to_host``: one transfer per step in the elastic task)."""
        plan: Plan = {}
        share: Dict[int, float] = {}
        active = float(self.m.hidden_size)
        for axis, a in choice.axes.items():
            if list(a.sizes) != list(getattr(self.axes, axis)):
                raise ValueError(f"choice sizes {a.sizes} for {axis} are not elastic.axes.{axis} = "
                                 f"{getattr(self.axes, axis)}")
            if axis == "depth":
                continue
            n, groups = self._units(axis)
            q = choice.weights(axis).to(self.device)
            unit = q @ self._prefix_table(axis, a.sizes, n, groups, q)
            layers = [-1] if axis == "hidden" else kind_layers(self.m, axis)
            plan[axis] = {layer: unit if unit.dim() == 1 else unit[row] for row, layer in enumerate(layers)}
            if axis in ("mamba_heads", "hidden"):  # host numbers: kernels take eps as a number
                kept = _host_weights(a, choice.hard) @ np.array([k // groups for k in a.sizes], dtype=np.float64)
                if axis == "hidden":  # active channels
                    active = float(kept)
                else:  # the kept share of each Mamba group
                    s = kept / n
                    share = {layer: float(s if s.ndim == 0 else s[row]) for row, layer in enumerate(layers)}
        skip, layer_weights = set(), None
        if "depth" in choice.axes:
            a = choice.axes["depth"]
            q = choice.weights("depth").to(self.device)
            layer_weights = q @ keep_table_on(self.m.num_layers, a.sizes, self.removal_order, q)
            if choice.hard:
                kept = a.sizes[int(a.host()[1])]
                skip = set(removed_layers(self.m.num_layers, kept, self.removal_order))
        self._apply(plan, share, skip, layer_weights, active)

    @staticmethod
    def _prefix_table(axis: str, sizes, n: int, groups: int, like: torch.Tensor) -> torch.Tensor:
        """[n_choices, n units]: 1 where choice c keeps unit u (a prefix of k // groups units)."""
        key = ("prefix", axis, tuple(sizes), n, groups)
        build = lambda: (torch.arange(n)[None, :] < torch.tensor([k // groups for k in sizes])[:, None])  # noqa: E731
        return device_constant(key, build, like)

    # ---- internals
    def _units(self, axis: str):
        """(units the axis masks a prefix of, number of groups the prefix is taken in)."""
        m = self.m
        return {"hidden": (m.hidden_size, 1),
                "attention_heads": (m.num_attention_heads // m.num_query_groups, m.num_query_groups),
                "mamba_heads": (m.mamba_num_heads // m.mamba_num_groups, m.mamba_num_groups),
                "ffn": (m.ffn_hidden_size, 1), "moe_ffn": (m.moe_ffn_hidden_size, 1),
                "shared_expert_ffn": (m.moe_shared_expert_ffn_hidden_size, 1),
                "experts": (m.num_experts, 1)}[axis]

    def _heads(self, unit: Optional[torch.Tensor], groups: int, head_dim: int) -> Optional[torch.Tensor]:
        """Per-group head weights -> channel weights over all heads (group-major head order)."""
        if unit is None:
            return None
        # expand + reshape rather than repeat_interleave, whose CUDA form may read its output size on the host
        return unit.repeat(groups)[:, None].expand(-1, head_dim).reshape(-1)

    def _apply(self, plan: Plan, share: Dict[int, float], skip: set, layer_weights, active: float) -> None:
        m = self.m
        get = lambda axis, layer: plan.get(axis, {}).get(layer)  # noqa: E731
        # shard groups from megatron's parallel state (TE nulls some modules' own tp_group)
        tp, etp = ps.get_tensor_model_parallel_group(), ps.get_expert_tensor_parallel_group()
        hidden = get("hidden", -1)
        count = None if hidden is None else hidden.float().sum()  # once, not once per norm
        if self.embedding is not None:
            self.embedding.elastic_mask = hidden
        if self.final_norm is not None:
            self.final_norm.set_hidden_mask(hidden, active, count)
        for index, sym, layer in self.layers:
            layer.elastic_skip = index in skip
            delta = hidden
            if layer_weights is not None:
                delta = layer_weights[index] if hidden is None else hidden * layer_weights[index]
            self.pre_norms[index].set_hidden_mask(hidden, active, count)
            if sym == "M":
                layer.mamba_bda.elastic_mask = delta
                heads = self._heads(get("mamba_heads", index), m.mamba_num_groups, m.mamba_head_dim)
                layer.mixer.norm.set_elastic_mask(heads, share.get(index, 1.0), group=tp)
            elif sym == "*":
                layer.self_attn_bda.elastic_mask = delta
                heads = self._heads(get("attention_heads", index), m.num_query_groups, m.attention_head_dim)
                layer.self_attention.linear_proj.set_elastic_mask(heads, group=tp)
            else:
                layer.mlp_bda.elastic_mask = delta
                if sym == "-":
                    layer.mlp.linear_fc2.set_elastic_mask(get("ffn", index), group=tp)
                else:
                    self._apply_moe(layer.mlp, get("experts", index), get("moe_ffn", index),
                                    get("shared_expert_ffn", index), tp, etp)

    @staticmethod
    def _apply_moe(moe, experts, moe_ffn, shared_ffn, tp, etp) -> None:
        moe.router.elastic_mask = experts
        for linear in moe.experts.modules():  # every local expert's fc2 (or the grouped fc2): expert-TP shards
            if isinstance(linear, InputMasked):
                linear.set_elastic_mask(moe_ffn, group=etp)
        if moe.shared_experts is not None:  # the shared expert is a dense MLP: TP shards
            moe.shared_experts.linear_fc2.set_elastic_mask(shared_ffn, group=tp)
