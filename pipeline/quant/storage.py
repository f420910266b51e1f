"""Storage of the quantised elastic checkpoint vs the quantised nested models stored separately (from shapes).

Bytes of one quantised linear with n weights: FP8 n + 4 (weight_scale) + 4 (input_scale); NVFP4 n / 2 (packed
E2M1) + n / 16 (E4M3 block scales) + 4 (weight_scale_2) + 4 (input_scale). Every other tensor keeps
``dtype_bytes`` per element (or its ``element_bytes`` entry). Same report layout as
``pipeline.elastic.storage.storage_report`` (``format_report`` prints both).
"""

from __future__ import annotations

from math import prod
from typing import Dict, List, Optional

from pipeline.elastic.storage import sliced_shapes
from pipeline.hf.mapping import hf_shapes
from pipeline.quant.spec import BLOCK, hf_linears, is_quantized


def tensor_size(name: str, shape, model, fmt: Optional[str], q, dtype_bytes: float,
                element_bytes: Optional[Dict[str, int]] = None, linears=None) -> float:
    """Stored bytes of the BF16 tensor ``name`` (a parent name) of ``shape`` in format ``fmt`` (None: BF16)."""
    n = prod(shape)
    module = name[:-len(".weight")] if name.endswith(".weight") else None
    linears = set(hf_linears(model)) if linears is None else linears
    if fmt is None or module not in linears or not is_quantized(module, model, q):
        return n * (element_bytes or {}).get(name, dtype_bytes)
    scalars = 4 + (4 if q.activations else 0)  # weight_scale (fp8) / weight_scale_2 (nvfp4), input_scale
    return n + scalars if fmt == "fp8" else n // 2 + n // BLOCK + scalars


def quant_storage_report(model, budgets: List, fmt: Optional[str], q, dtype_bytes: float = 2,
                         element_bytes: Optional[Dict[str, int]] = None) -> Dict:
    full = hf_shapes(model)
    linears = set(hf_linears(model))
    def size(name, shape):
        return tensor_size(name, shape, model, fmt, q, dtype_bytes, element_bytes, linears)

    rows = []
    for b in budgets:
        shapes = sliced_shapes(model, b.subnet)
        rows.append({"name": b.name, "subnet": b.subnet.to_json(),
                     "elements": sum(prod(s) for s, _ in shapes.values()),
                     "bytes": sum(size(parent, s) for s, parent in shapes.values())})
    separate = sum(r["bytes"] for r in rows)
    elastic = sum(size(n, s) for n, s in full.items())
    return {"format": fmt or "bf16", "dtype_bytes": dtype_bytes,
            "elastic_elements": sum(prod(s) for s in full.values()),
            "elastic_bytes": elastic, "budgets": rows, "separate_bytes": separate,
            "saved_fraction": 1.0 - elastic / separate if separate else 0.0}
