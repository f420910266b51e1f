"""Scores -> the permutation of every axis (most important first) and how much score each prefix keeps.

An order is a LongTensor ``o`` with ``new[i] = old[o[i]]``. Ties keep the original order (stable sort), so a
model whose units score equally is left as it is. Grouped axes are sorted within each group: attention heads
within their KV group (GQA), Mamba heads within their B/C group; the elastic masks keep the same prefix of
every group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from pipeline.config.schema import ElasticAxes, ModelConfig
from pipeline.elastic.importance.collect import Scores


@dataclass
class Orders:
    hidden: torch.Tensor  # [hidden]
    # layer -> axis -> order. attention_heads / mamba_heads: [heads] (within groups); mamba_head_channels:
    # [heads, head_dim], row = the head's *old* index; moe_ffn: [experts, ffn], row = the expert's *old* index.
    layers: Dict[int, Dict[str, torch.Tensor]] = field(default_factory=dict)


def descending(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores, descending=True, stable=True).indices


def rows_descending(scores: torch.Tensor) -> torch.Tensor:
    """Each row sorted on its own (per expert / per head)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def within_groups(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Sort each of ``groups`` contiguous blocks on its own; indices stay global."""
    per = scores.numel() // groups
    local = rows_descending(scores.reshape(groups, per))
    return (local + torch.arange(groups).unsqueeze(1) * per).reshape(-1)


def orders_from_scores(scores: Scores, m: ModelConfig) -> Orders:
    orders = Orders(hidden=descending(scores.hidden.cpu()))
    for i, axes in scores.layers.items():
        out = orders.layers.setdefault(i, {})
        for axis, s in axes.items():
            s = s.cpu()
            if axis == "attention_heads":
                out[axis] = within_groups(s, m.num_query_groups)
            elif axis == "mamba_heads":
                out[axis] = within_groups(s, m.mamba_num_groups)
            elif axis in ("mamba_head_channels", "moe_ffn"):
                out[axis] = rows_descending(s)
            elif axis in ("ffn", "shared_expert_ffn", "experts"):
                out[axis] = descending(s)
    return orders


# ---- readable summary ---------------------------------------------------------------------------------

GROUPS = {"attention_heads": "num_query_groups", "mamba_heads": "mamba_num_groups"}
SIZE = {"hidden": "hidden_size", "attention_heads": "num_attention_heads", "mamba_heads": "mamba_num_heads",
        "ffn": "ffn_hidden_size", "moe_ffn": "moe_ffn_hidden_size",
        "shared_expert_ffn": "moe_shared_expert_ffn_hidden_size", "experts": "num_experts"}


def prefix_share(scores: torch.Tensor, order: Optional[torch.Tensor], k: int, groups: int = 1) -> float:
    """Share of the total score in the first ``k`` units (k / groups per group) after ``order``
    (None: the unpermuted model). ``scores`` may have leading dims (rows sorted on their own)."""
    s = scores.double()
    if order is not None:
        s = torch.gather(s, -1, order) if s.dim() > 1 else s[order]
    s = s.reshape(*s.shape[:-1], groups, -1)[..., :k // groups]
    total = scores.double().sum()
    return float(s.sum() / total) if total > 0 else 0.0


def _choices(axis: str, m: ModelConfig, axes: ElasticAxes) -> List[int]:
    given = getattr(axes, axis)
    if given:
        return list(given)
    n = getattr(m, SIZE[axis])
    g = getattr(m, GROUPS[axis]) if axis in GROUPS else 1
    return sorted({max(g, n * q // 4 // g * g) for q in (4, 3, 2, 1)}, reverse=True)


def summary(all_scores: Dict[str, Dict[int, torch.Tensor]], all_orders: Dict[str, Dict[int, torch.Tensor]],
            hidden: torch.Tensor, hidden_order: torch.Tensor, m: ModelConfig, axes: ElasticAxes) -> Dict:
    """Per axis: the share of the total score each prefix choice keeps, permuted vs unpermuted (averaged over
    layers; for moe_ffn over layers and experts). Choices come from ``elastic.axes`` (quartiles if empty)."""
    out = {}
    per_axis = {"hidden": ({-1: hidden}, {-1: hidden_order})}
    per_axis.update({a: (all_scores[a], all_orders[a]) for a in SIZE if a in all_scores and a != "hidden"})
    for axis, (scores, orders) in per_axis.items():
        groups = getattr(m, GROUPS[axis]) if axis in GROUPS else 1
        choices = _choices(axis, m, axes)
        share, before = {}, {}
        for k in choices:
            share[str(k)] = _mean([prefix_share(scores[i], orders[i], k, groups) for i in scores])
            before[str(k)] = _mean([prefix_share(scores[i], None, k, groups) for i in scores])
        out[axis] = {"choices": choices, "from": "elastic.axes" if getattr(axes, axis) else "quartiles",
                     "layers": len(scores), "share": share, "share_unpermuted": before}
    return out


def _mean(values: List[float]) -> float:
    return round(sum(values) / len(values), 6) if values else 0.0
