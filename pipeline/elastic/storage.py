"""Storage of one elastic checkpoint vs the nested models stored separately, computed from tensor shapes.

The elastic checkpoint stores the permuted full model once (every budget is a prefix of it); stored
separately, each budget is its own sliced model. Sizes are the HF safetensors' tensor bytes (the
headers add a few KB per file), exact for a checkpoint written by ``export``: pass ``element_bytes`` (HF
name -> bytes per element, read from its safetensors headers) for tensors kept in another dtype than
``dtype_bytes`` (fp32 A_log / D / expert bias in a bf16 export).
"""

from __future__ import annotations

from math import prod
from typing import Any, Dict, List, Optional, Tuple

import torch

from pipeline.config.schema import ModelConfig, Recipe
from pipeline.elastic.slicing import name_map, slice_tensor
from pipeline.elastic.subnet import AXES, ResolvedBudget, Subnet
from pipeline.hf.mapping import hf_shapes


def sliced_shapes(model: ModelConfig, subnet: Subnet) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Sliced name -> (shape, parent name), per-layer sizes included (slicing meta tensors)."""
    subnet.check(model)
    shapes = hf_shapes(model)
    out = {}
    for old, new in name_map(shapes, model, subnet):
        t = slice_tensor(old, torch.empty(shapes[old], device="meta"), model, subnet)
        out[new] = (tuple(t.shape), old)
    return out


def storage_report(model: ModelConfig, budgets: List[ResolvedBudget], dtype_bytes: int = 2,
                   element_bytes: Optional[Dict[str, int]] = None, size=None) -> Dict[str, Any]:
    """Bytes of the elastic checkpoint (the full model once) and of each budget's standalone model.
    ``size(name, shape)``: the bytes one tensor takes (default: elements x its dtype's bytes; quant/storage.py
    passes the quantised sizes)."""
    element_bytes = element_bytes or {}
    if size is None:
        size = lambda name, shape: prod(shape) * element_bytes.get(name, dtype_bytes)  # noqa: E731
    full = hf_shapes(model)
    rows = []
    for b in budgets:
        shapes = sliced_shapes(model, b.subnet)
        rows.append({"name": b.name, "subnet": b.subnet.to_json(),
                     "elements": sum(prod(s) for s, _ in shapes.values()),
                     "bytes": sum(size(parent, s) for s, parent in shapes.values())})
    separate = sum(r["bytes"] for r in rows)
    elastic = sum(size(n, s) for n, s in full.items())
    return {"dtype_bytes": dtype_bytes, "elastic_elements": sum(prod(s) for s in full.values()),
            "elastic_bytes": elastic, "budgets": rows, "separate_bytes": separate,
            "saved_fraction": 1.0 - elastic / separate if separate else 0.0}


def budgets_from_axes(recipe: Recipe) -> List[ResolvedBudget]:
    """Budget j of the recipe takes choice j of every elastic axis (the last choice when an axis has
    fewer, the full size when it has none): the nested family as the recipe lists it, before a trained
    router resolves it (stage 2 writes the resolved ``elastic_budgets.json``)."""
    m, axes = recipe.model, recipe.elastic.axes
    if axes.depth:
        raise ValueError("elastic.axes.depth needs the importance stage's layer ranking to say which layers "
                         "are skipped; report from a stage's elastic_budgets.json instead")
    full = Subnet.full(m)
    out = []
    for j, b in enumerate(recipe.elastic.budgets):
        sizes = {}
        for axis in AXES[:-1]:
            choices = getattr(axes, axis)
            sizes[axis] = choices[min(j, len(choices) - 1)] if choices else getattr(full, axis)
        subnet = Subnet(**sizes)
        subnet.check(m)
        out.append(ResolvedBudget(b.name, b.fraction, subnet))
    return out


def _scaled(n: float, base: int, units) -> str:
    i = 0
    while n >= base and i < len(units) - 1:
        n, i = n / base, i + 1
    return f"{n:.2f} {units[i]}"


def format_report(report: Dict[str, Any]) -> str:
    """The report as a table: elements, decimal and binary size per budget, separate total, elastic."""
    def line(name, elements, nbytes, extra=""):
        count = _scaled(elements, 1000, ["", "K", "M", "B"])
        decimal = _scaled(nbytes, 1000, ["B", "KB", "MB", "GB", "TB"])
        binary = _scaled(nbytes, 1024, ["B", "KiB", "MiB", "GiB", "TiB"])
        return f"{name:<24}{count:>10}  {decimal:>10}  {binary:>11}  {extra}"

    def sizes(s):
        text = ", ".join(f"{a}={s[a]}" for a in s if a not in ("skip_layers", "per_layer"))
        return text + (f", skip_layers={s['skip_layers']}" if s["skip_layers"] else "") + (
            f", per_layer={s['per_layer']}" if s["per_layer"] else "")

    rows = [f"{'model':<24}{'elements':>10}  {'size':>10}  {'':>11}",
            *[line(r["name"], r["elements"], r["bytes"], sizes(r["subnet"])) for r in report["budgets"]],
            line("separate (sum)", sum(r["elements"] for r in report["budgets"]), report["separate_bytes"]),
            line("one elastic checkpoint", report["elastic_elements"], report["elastic_bytes"],
                 f"saves {100 * report['saved_fraction']:.1f}%")]
    return "\n".join(rows)
