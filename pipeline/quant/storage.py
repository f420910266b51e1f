"""Storage of the quantised elastic checkpoint vs the quantised nested models stored separately (from shapes).

Bytes of one quantised linear with n weights: FP8 n + 4 (weight_scale) + 4 (input_scale); NVFP4 n / 2 (packed
E2M1) + n / 16 (E4M3 block scales) + 4 (weight_scale_2) + 4 (input_scale). Every other tensor keeps
``dtype_bytes`` per element (or its ``element_bytes`` entry). Same report layout as
``pipeline.elastic.storage.storage_report`` (``format_report`` prints both).
"""

from __future__ import annotations

from math import prod
from typing import Dict, List, Optional

from pipeline.elastic.storage import storage_report
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
    linears = set(hf_linears(model))

    def size(name, shape):
        return tensor_size(name, shape, model, fmt, q, dtype_bytes, element_bytes, linears)

    return {"format": fmt or "bf16", **storage_report(model, budgets, dtype_bytes, element_bytes, size=size)}
