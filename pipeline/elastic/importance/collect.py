"""Hooks on megatron-core modules (forward hooks / pre-hooks, nothing edited inside megatron) that accumulate
the importance statistics of every elastic axis during a forward pass over calibration data.

Per layer of this pipeline stage (statistics are means over tokens):

- hidden channel i: |RMSNorm(x)_i| at every residual-stream norm (Mamba ``norm``, attention
  ``input_layernorm``, MLP / MoE ``pre_mlp_layernorm``, the final norm); aggregated as the mean over all norms
  of the model (all pipeline stages);
- attention head h: ||o_h||_2, o_h = the head's slice of ``linear_proj``'s input;
- Mamba head h: ||x_h||_2 and per channel |x_{h,p}|, x = the x part of ``in_proj``'s output (the SSM input);
- dense / shared-expert FFN channel i: |act(fc1(x))_i| (the up-projection channel's activation);
- routed experts: REAP and per-expert FFN channels (``reap.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model

from pipeline.elastic.importance.layers import stack_layers
from pipeline.elastic.importance.reap import expert_stats
from pipeline.elastic.importance.stats import RESIDUAL, TP_SHARDED, Stat

FINAL = "final"  # key of the final norm among the per-norm hidden scores


@dataclass
class Scores:
    """Importance per axis, global unit shapes. ``layers`` holds this pipeline stage's layers only;
    ``hidden`` is the model-wide aggregate (identical on every rank)."""

    hidden: torch.Tensor  # [hidden]
    norms: Dict[str, torch.Tensor] = field(default_factory=dict)  # str(layer) | "final" -> [hidden]
    layers: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> axis -> scores


def _norm_hook(stat: Stat):
    def hook(module, inputs, output):
        y = output.detach()
        y = y.reshape(-1, y.shape[-1])
        stat.add(y.abs().sum(0, dtype=torch.float32), y.shape[0])

    return hook


def _head_input_hook(stat: Stat, heads: int):
    def hook(module, inputs):
        o = inputs[0].detach()
        o = o.reshape(-1, heads, o.shape[-1] // heads)
        stat.add(torch.linalg.vector_norm(o, dim=-1, dtype=torch.float32).sum(0), o.shape[0])

    return hook


def _mamba_hook(heads: Stat, channels: Stat, mixer):
    d, p = mixer.d_inner_local_tp, mixer.headdim

    def hook(module, inputs, output):
        x = output[0].detach()[..., d:2 * d]  # in_proj rows: [z, x, B, C, dt]
        x = x.reshape(-1, d // p, p)
        heads.add(torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).sum(0), x.shape[0])
        channels.add(x.abs().sum(0, dtype=torch.float32), x.shape[0])

    return hook


def _fc1_hook(stat: Stat, activation):
    def hook(module, inputs, output):
        act = activation(output[0].detach())
        act = act.reshape(-1, act.shape[-1])
        stat.add(act.abs().sum(0, dtype=torch.float32), act.shape[0])

    return hook


class Collector:
    """Attach to one model chunk; run forward passes; ``finish()`` reduces and returns ``Scores``.
    ``close()`` removes every hook (also done by ``finish``)."""

    def __init__(self, model: torch.nn.Module, pattern: str):
        self.model, self.handles = model, []
        self.norms: Dict[str, Stat] = {}
        self.units: Dict[int, Dict[str, Stat]] = {}
        for layer in stack_layers(model, pattern):
            self._attach(layer.index, layer.kind, layer.module)
        decoder = unwrap_model(model).decoder
        if getattr(decoder, "final_norm", None) is not None and decoder.post_process:
            self._norm(FINAL, decoder.final_norm)

    def _norm(self, key: str, norm: torch.nn.Module) -> None:
        stat = Stat(RESIDUAL, (norm.weight.shape[0],), norm.weight.device)
        self.norms[key] = stat
        self.handles.append(norm.register_forward_hook(_norm_hook(stat)))

    def _sharded(self, layer: int, axis: str, shape, device, gather_dim: int = 0) -> Stat:
        stat = Stat(TP_SHARDED, shape, device, gather_dim=gather_dim)
        self.units.setdefault(layer, {})[axis] = stat
        return stat

    def _attach(self, i: int, kind: str, layer: torch.nn.Module) -> None:
        h = self.handles
        if kind == "M":
            self._norm(str(i), layer.norm)
            mixer = layer.mixer
            dev = mixer.in_proj.weight.device
            heads = self._sharded(i, "mamba_heads", (mixer.nheads_local_tp,), dev)
            channels = self._sharded(i, "mamba_head_channels", (mixer.nheads_local_tp, mixer.headdim), dev)
            h.append(mixer.in_proj.register_forward_hook(_mamba_hook(heads, channels, mixer)))
        elif kind == "*":
            self._norm(str(i), layer.input_layernorm)
            attn = layer.self_attention
            proj = attn.linear_proj
            stat = self._sharded(i, "attention_heads", (attn.num_attention_heads_per_partition,), proj.weight.device)
            h.append(proj.register_forward_pre_hook(_head_input_hook(stat, attn.num_attention_heads_per_partition)))
        elif kind in "-E":
            self._norm(str(i), layer.pre_mlp_layernorm)
            mlp = layer.mlp
            if kind == "-":
                self._fc1(i, "ffn", mlp)
            else:
                if getattr(mlp, "shared_experts", None) is not None:
                    if getattr(mlp.shared_experts, "gate_weight", None) is not None:
                        raise ValueError("a gated shared expert is not supported by the importance stage")
                    self._fc1(i, "shared_expert_ffn", mlp.shared_experts)
                self.units.setdefault(i, {}).update(expert_stats(mlp, h))
        else:
            raise ValueError(f"layer {i}: unknown layer symbol {kind!r}")

    def _fc1(self, i: int, axis: str, mlp) -> None:
        if mlp.config.gated_linear_unit:
            raise ValueError("FFN channel scores assume non-gated MLPs (Nemotron-H squared ReLU)")
        fc1 = mlp.linear_fc1
        stat = self._sharded(i, axis, (fc1.weight.shape[0],), fc1.weight.device)
        self.handles.append(fc1.register_forward_hook(_fc1_hook(stat, mlp.activation_func)))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def finish(self) -> Scores:
        """Collective on every rank: reduce over DP/TP/EP, aggregate hidden over all norms (PP included)."""
        self.close()
        norms = {k: s.finish()[0] for k, s in self.norms.items()}
        hidden_size = unwrap_model(self.model).config.hidden_size
        device = next(self.model.parameters()).device
        agg = torch.zeros(hidden_size + 1, dtype=torch.float64, device=device)
        for v in norms.values():
            agg[:-1] += v.double()
            agg[-1] += 1
        pp = ps.get_pipeline_model_parallel_group()
        if dist.get_world_size(pp) > 1:
            dist.all_reduce(agg, group=pp)
        scores = Scores(hidden=(agg[:-1] / agg[-1].clamp(min=1)).float(), norms=norms)
        for i, stats in self.units.items():
            out = scores.layers.setdefault(i, {})
            for axis, stat in stats.items():
                mean, tokens = stat.finish()
                out[_RENAME.get(axis, axis)] = mean
                if axis == "reap":
                    out["expert_tokens"] = tokens.float()
        return scores


# expert statistics as they appear in Scores: REAP is the experts axis' score
_RENAME = {"reap": "experts", "gate": "expert_gate"}
