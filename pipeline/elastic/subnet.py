"""A nested model ("subnet") of the elastic parent: a prefix size per axis, skipped layers, per-layer overrides.

The one description of a budget's resolved configuration shared by the elastic masks (stage 1/2), the
parameter counter (budget loss, reports), ``elastic.json`` and slicing. After the importance stage every
axis is sorted most-important-first, so a size k always means "keep the prefix [:k]"; attention and Mamba
heads keep the prefix of each (KV / SSM) group, so ``attention_heads = 8`` with 2 groups keeps heads 0..3
of each group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

from pipeline.config.schema import ModelConfig
from pipeline.model.params import Dims, ParamCount, count_parameters

# Axes whose size may differ per layer (heterogeneous subnets); hidden is the residual stream, one size.
LAYER_AXES = ("attention_heads", "mamba_heads", "ffn", "moe_ffn", "shared_expert_ffn", "experts")
WIDTH_AXES = ("hidden",) + LAYER_AXES
# The recipe's elastic.axes names, in the order they are reported.
AXES = WIDTH_AXES + ("depth",)

_MODEL_FIELD = {
    "hidden": "hidden_size",
    "attention_heads": "num_attention_heads",
    "mamba_heads": "mamba_num_heads",
    "ffn": "ffn_hidden_size",
    "moe_ffn": "moe_ffn_hidden_size",
    "shared_expert_ffn": "moe_shared_expert_ffn_hidden_size",
    "experts": "num_experts",
}


@dataclass
class Subnet:
    hidden: int
    attention_heads: int
    mamba_heads: int
    ffn: int
    moe_ffn: int
    shared_expert_ffn: int
    experts: int
    skip_layers: List[int] = field(default_factory=list)  # 0-based layer indices removed (depth axis)
    per_layer: Dict[int, Dict[str, int]] = field(default_factory=dict)  # layer -> {axis: size} overrides

    @classmethod
    def full(cls, m: ModelConfig) -> "Subnet":
        return cls(**{axis: getattr(m, name) for axis, name in _MODEL_FIELD.items()})

    @property
    def depth(self) -> int:
        """Layers skipped (the number kept depends on the model; see ``kept_layers``)."""
        return len(self.skip_layers)

    def kept_layers(self, m: ModelConfig) -> List[int]:
        return [i for i in range(m.num_layers) if i not in set(self.skip_layers)]

    def size(self, axis: str, layer: int = -1) -> int:
        """The size of ``axis`` at ``layer`` (-1: the homogeneous value)."""
        if layer >= 0 and axis in self.per_layer.get(layer, {}):
            return self.per_layer[layer][axis]
        return getattr(self, axis)

    @property
    def homogeneous(self) -> bool:
        return not any(self.per_layer.values())

    def check(self, m: ModelConfig) -> None:
        """ValueError naming the first size that is not a valid prefix of model ``m``."""
        full = Subnet.full(m)
        for layer in [-1] + sorted(self.per_layer):
            for axis in WIDTH_AXES if layer < 0 else LAYER_AXES:
                k, n = self.size(axis, layer), getattr(full, axis)
                where = f"{axis}" + (f" at layer {layer}" if layer >= 0 else "")
                valid = 0 < k <= n if n else k == 0  # an absent part (n = 0, e.g. no shared expert) stays 0
                if not valid:
                    raise ValueError(f"subnet {where} = {k} is not in (0, {n}]")
            if layer >= 0 and set(self.per_layer[layer]) - set(LAYER_AXES):
                raise ValueError(f"subnet layer {layer} overrides unknown axes {sorted(self.per_layer[layer])}")
            if self.size("attention_heads", layer) % m.num_query_groups:
                raise ValueError(f"subnet attention_heads must be a multiple of {m.num_query_groups} KV groups")
            if self.size("mamba_heads", layer) % m.mamba_num_groups:
                raise ValueError(f"subnet mamba_heads must be a multiple of {m.mamba_num_groups} Mamba groups")
            if "E" in m.pattern and self.size("experts", layer) < m.moe_topk:
                raise ValueError(f"subnet experts must be >= model.moe_topk = {m.moe_topk}")
        bad = [i for i in self.skip_layers if not 0 <= i < m.num_layers]
        if bad or len(set(self.skip_layers)) != len(self.skip_layers) or len(self.skip_layers) >= m.num_layers:
            raise ValueError(f"subnet skip_layers {self.skip_layers} must be distinct layers of {m.num_layers}")

    def model_config(self, m: ModelConfig) -> ModelConfig:
        """The standalone (sliced) model's config; ValueError if per-layer sizes differ (not expressible)."""
        if not self.homogeneous:
            raise ValueError("a subnet with per-layer sizes has no single ModelConfig")
        kept = self.kept_layers(m)
        return dataclasses.replace(
            m, num_layers=len(kept), pattern="".join(m.pattern[i] for i in kept),
            **{name: getattr(self, axis) for axis, name in _MODEL_FIELD.items()},
        )

    def dims(self, m: ModelConfig) -> Dims:
        d = Dims.from_model(m)
        d = dataclasses.replace(d, **{_DIMS_FIELD[a]: getattr(self, a) for a in WIDTH_AXES})
        d.per_layer = {i: {_DIMS_FIELD[a]: v for a, v in over.items()} for i, over in self.per_layer.items() if over}
        return d

    def count(self, m: ModelConfig) -> ParamCount:
        return count_parameters(m.pattern, self.dims(m), skip=self.skip_layers)

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {a: getattr(self, a) for a in WIDTH_AXES}
        out["skip_layers"] = list(self.skip_layers)
        out["per_layer"] = {str(i): dict(v) for i, v in sorted(self.per_layer.items()) if v}
        return out

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "Subnet":
        unknown = set(data) - set(WIDTH_AXES) - {"skip_layers", "per_layer"}
        if unknown:
            raise ValueError(f"unknown subnet keys {sorted(unknown)}")
        missing = [a for a in WIDTH_AXES if a not in data]
        if missing:
            raise ValueError(f"subnet is missing {missing}")
        return cls(
            **{a: int(data[a]) for a in WIDTH_AXES},
            skip_layers=[int(i) for i in data.get("skip_layers", [])],
            per_layer={int(i): {a: int(v) for a, v in over.items()} for i, over in data.get("per_layer", {}).items()},
        )


# Subnet axis -> the parameter counter's Dims field.
_DIMS_FIELD = {"hidden": "hidden", "attention_heads": "attention_heads", "mamba_heads": "mamba_heads", "ffn": "ffn",
               "moe_ffn": "moe_ffn", "shared_expert_ffn": "shared_expert_ffn", "experts": "experts"}


# Written by stage 2 next to its checkpoints (and by export into elastic.json): every budget's resolved subnet.
BUDGETS_FILE = "elastic_budgets.json"


@dataclass
class ResolvedBudget:
    name: str
    fraction: float  # the target, as a fraction of the full model's active parameters
    subnet: Subnet


def budgets_to_json(m: ModelConfig, budgets: List[ResolvedBudget]) -> Dict[str, Any]:
    full = Subnet.full(m).count(m)
    rows = []
    for b in budgets:
        c = b.subnet.count(m)
        rows.append({"name": b.name, "fraction": b.fraction, "subnet": b.subnet.to_json(),
                     "params": int(c.total), "active_params": int(c.active),
                     "active_fraction": float(c.active) / float(full.active)})
    return {"format": 1, "full_params": int(full.total), "full_active_params": int(full.active), "budgets": rows}


def budgets_from_json(data: Dict[str, Any], where: str) -> List[ResolvedBudget]:
    """ValueError naming ``where`` for a malformed file."""
    try:
        return [ResolvedBudget(str(b["name"]), float(b["fraction"]), Subnet.from_json(b["subnet"]))
                for b in data["budgets"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: malformed elastic budgets ({e})") from None
