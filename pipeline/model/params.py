"""Exact parameter counts of the hybrid model, total and active, per layer kind.

Written as plain arithmetic over the dimensions so that the same formulas take nested (sliced) sizes and,
in the elastic router's budget loss, differentiable expected sizes (torch tensors). A test checks the
totals against ``sum(p.numel())`` of the built megatron-core model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from pipeline.config.schema import ModelConfig

KIND_NAMES = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}


@dataclass
class Dims:
    """The sizes that determine the parameter count; any field may be a float or a tensor."""

    hidden: Any
    vocab: int
    attention_heads: Any
    query_groups: int
    attention_head_dim: int
    mamba_heads: Any
    mamba_head_dim: int
    mamba_groups: int
    mamba_state: int
    mamba_conv: int
    ffn: Any
    moe_ffn: Any
    shared_expert_ffn: Any
    experts: Any
    topk: int
    tie_embeddings: bool = False
    # per-layer overrides (heterogeneous nested models): layer index -> {field: value}
    per_layer: Dict[int, Dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_model(cls, m: ModelConfig) -> "Dims":
        return cls(
            hidden=m.hidden_size, vocab=m.vocab_size, attention_heads=m.num_attention_heads,
            query_groups=m.num_query_groups, attention_head_dim=m.attention_head_dim,
            mamba_heads=m.mamba_num_heads, mamba_head_dim=m.mamba_head_dim, mamba_groups=m.mamba_num_groups,
            mamba_state=m.mamba_state_dim, mamba_conv=m.mamba_conv_kernel, ffn=m.ffn_hidden_size,
            moe_ffn=m.moe_ffn_hidden_size, shared_expert_ffn=m.moe_shared_expert_ffn_hidden_size,
            experts=m.num_experts, topk=m.moe_topk, tie_embeddings=m.tie_embeddings,
        )

    def at_layer(self, i: int) -> "Dims":
        over = self.per_layer.get(i)
        return dataclasses.replace(self, per_layer={}, **over) if over else self


def layer_params(kind: str, d: Dims, active: bool = False):
    """Parameters of one layer (its pre-norm included)."""
    h = d.hidden
    if kind == "M":
        d_inner = d.mamba_heads * d.mamba_head_dim
        bc = 2 * d.mamba_groups * d.mamba_state
        in_proj = h * (2 * d_inner + bc + d.mamba_heads)
        conv = (d_inner + bc) * (d.mamba_conv + 1)
        per_head = 3 * d.mamba_heads  # dt_bias, A_log, D
        return h + in_proj + conv + per_head + d_inner + d_inner * h  # + gated norm + out_proj
    if kind == "*":
        hd = d.attention_head_dim
        qkv = h * (d.attention_heads + 2 * d.query_groups) * hd
        return h + qkv + d.attention_heads * hd * h
    if kind == "E":
        routed = _at_most(d.experts, d.topk) if active else d.experts
        return h + h * d.experts + routed * 2 * h * d.moe_ffn + 2 * h * d.shared_expert_ffn
    if kind == "-":
        return h + 2 * h * d.ffn
    raise ValueError(f"unknown layer symbol {kind!r}")


def _at_most(x, cap):
    """min(x, cap) elementwise, without reading a tensor on the host (no sync)."""
    if not hasattr(x, "dim"):
        return min(cap, x)
    return x.where(x < cap, x.new_full(x.shape, float(cap)))


@dataclass
class ParamCount:
    by_kind: Dict[str, Any]  # kind name -> total
    active_by_kind: Dict[str, Any]
    embedding: Any  # input embedding + output layer + final norm

    @property
    def total(self):
        return sum(self.by_kind.values()) + self.embedding

    @property
    def active(self):
        return sum(self.active_by_kind.values()) + self.embedding


def count_parameters(pattern: str, d: Dims, skip: Sequence[int] = ()) -> ParamCount:
    """Count a model with layer symbols ``pattern``; layers in ``skip`` (depth elasticity) are dropped."""
    by_kind: Dict[str, Any] = {}
    active: Dict[str, Any] = {}
    skipped = set(skip)
    for i, sym in enumerate(pattern):
        if i in skipped:
            continue
        name = KIND_NAMES[sym]
        di = d.at_layer(i)
        by_kind[name] = by_kind.get(name, 0) + layer_params(sym, di)
        active[name] = active.get(name, 0) + layer_params(sym, di, active=True)
    embedding = d.vocab * d.hidden * (1 if d.tie_embeddings else 2) + d.hidden
    return ParamCount(by_kind, active, embedding)


def count_model(m: ModelConfig, dims: Optional[Dims] = None) -> ParamCount:
    return count_parameters(m.pattern, dims or Dims.from_model(m))


def format_count(m: ModelConfig, c: ParamCount) -> str:
    rows = [("layer kind", "layers", "total", "active")]
    for sym, name in KIND_NAMES.items():
        n = m.pattern.count(sym)
        if n:
            rows.append((name, str(n), _human(c.by_kind[name]), _human(c.active_by_kind[name])))
    rows.append(("embedding+head", "", _human(c.embedding), _human(c.embedding)))
    rows.append(("all", str(len(m.pattern)), _human(c.total), _human(c.active)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.append(f"total {int(c.total):,} parameters, active {int(c.active):,} per token")
    return "\n".join(lines)


def _human(n) -> str:
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
