import json
import os

import pytest

# Exactness tests compare fp32 models whose GEMMs run in different kernels or shapes. Transformer Engine runs fp32
# GEMMs in TF32 (10-bit mantissa) unless this is 0, which alone moved the tiny model's logits by 8e-4 relative
# (local vs TE, masked vs sliced on TE) — and by 9e-7 / 2e-6 with it (tests/gpu/probe_te_layers.py, RESULTS.md).
# Read by cuBLAS when it loads, so set before any GEMM runs; training runs in bf16 and is not affected.
os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")


@pytest.fixture
def record(request):
    """Append a named figure to $GPU_RESULTS (a jsonl file) so a run's numbers can be committed."""
    path = os.environ.get("GPU_RESULTS")

    def write(name, values):
        print(f"[gpu-result] {request.node.name} | {name} | {values}")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"test": request.node.name, "what": name, "values": values}) + "\n")

    return write
