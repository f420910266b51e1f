"""``importance.json``: per axis and layer the scores and the order applied, a readable summary (share of the
total score kept by each elastic prefix choice), the calibration facts, the pass cost and, when scored,
``"depth": {"removal_order": [...]}`` (the elastic stages read that key).

Arrays too large to read as JSON (per-expert FFN channels, per-Mamba-head channels, every norm's hidden
scores) go to ``importance_tensors.pt`` under the key the JSON names. Pipeline stages send their layers to
global rank 0 over rank 0's pipeline group (one rank per stage; everything is already gathered over TP/EP).
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps

from pipeline.config.schema import Recipe
from pipeline.elastic.importance.collect import Scores
from pipeline.elastic.importance.orders import Orders, summary

REPORT, TENSORS = "importance.json", "importance_tensors.pt"
KIND = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
IN_TENSORS = ("mamba_head_channels", "moe_ffn")  # scores and orders in importance_tensors.pt
EXTRAS = ("expert_tokens", "expert_gate")  # scores without an order of their own


def _stage_part(scores: Scores, orders: Orders):
    cpu = lambda d: {k: v.detach().cpu() for k, v in d.items()}
    return ({i: cpu(a) for i, a in scores.layers.items()}, {i: cpu(a) for i, a in orders.layers.items()},
            cpu(scores.norms))


def _gather_stages(part):
    """Rank 0: every pipeline stage's part; others: None."""
    first_of_stage = (ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
                      and ps.get_context_parallel_rank() == 0)
    if not first_of_stage:
        return None
    group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return [part]
    parts = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
    dist.gather_object(part, parts, dst=0, group=group)
    return parts


def write_report(out_dir: str, recipe: Recipe, scores: Scores, orders: Orders, depth: Optional[Dict],
                 costs: Dict, calibration: Dict) -> Dict:
    parts = _gather_stages(_stage_part(scores, orders))
    if dist.get_rank() != 0:
        return {}
    layer_scores, layer_orders, norms = {}, {}, {}
    for s, o, n in parts:
        layer_scores.update(s)
        layer_orders.update(o)
        norms.update(n)
    m = recipe.model
    tensors: Dict[str, torch.Tensor] = {f"hidden.norm.{k}": v for k, v in norms.items()}
    layers = {}
    for i in sorted(layer_scores):
        entry = {"kind": KIND[m.pattern[i]]}
        for axis, s in layer_scores[i].items():
            if axis in EXTRAS:
                entry.setdefault("experts", {})[axis.replace("expert_", "")] = _floats(s)
            elif axis in IN_TENSORS:
                key = f"layers.{i}.{axis}"
                tensors[key + ".scores"], tensors[key + ".order"] = s, layer_orders[i][axis]
                entry[axis] = {"tensors": [key + ".scores", key + ".order"], "shape": list(s.shape)}
            else:
                entry.setdefault(axis, {}).update(scores=_floats(s), order=layer_orders[i][axis].tolist())
        layers[str(i)] = entry
    by_axis = {}
    for i, axes in layer_scores.items():
        for axis, s in axes.items():
            if axis not in EXTRAS and axis != "mamba_head_channels":
                by_axis.setdefault(axis, ({}, {}))
                by_axis[axis][0][i], by_axis[axis][1][i] = s, layer_orders[i][axis]
    report = {
        "format": 1,
        "calibration": calibration,
        "cost": costs,
        "summary": summary({a: v[0] for a, v in by_axis.items()}, {a: v[1] for a, v in by_axis.items()},
                           scores.hidden.cpu(), orders.hidden, m, recipe.elastic.axes),
        "hidden": {"scores": _floats(scores.hidden), "order": orders.hidden.tolist(),
                   "per_norm": {"tensors": sorted(k for k in tensors if k.startswith("hidden.norm."))}},
        "layers": layers,
        "tensors": TENSORS,
    }
    if depth is not None:
        report["depth"] = depth
    torch.save(tensors, os.path.join(out_dir, TENSORS))
    tmp = os.path.join(out_dir, REPORT + ".tmp")
    with open(tmp, "w") as f:
        f.write(_dumps(report))
    os.replace(tmp, os.path.join(out_dir, REPORT))
    return report


def _dumps(obj) -> str:
    """Indented JSON with every list of numbers on one line."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s+([-0-9.eE+,\s]+?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text) + "\n"


def _floats(t: torch.Tensor):
    return [float(f"{v:.6g}") for v in t.double().flatten().tolist()] if t.dim() == 1 else \
        [_floats(r) for r in t]
