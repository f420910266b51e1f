"""Let mamba-ssm's Triton Mamba-2 kernels import where its CUDA extension was not built.

``import mamba_ssm`` imports the Mamba-1 selective-scan CUDA extension (``selective_scan_cuda``) even though the
Mamba-2 SSD path (``mamba_ssm.ops.triton.*``, what megatron's MambaMixer uses) is pure Triton. Wheels built with
MAMBA_SKIP_CUDA_BUILD (our GPU test machine) lack it; an empty module under that name lets the Triton kernels
import. Must run before ``megatron.core.ssm.mamba_mixer`` is imported; a no-op where the extension exists.
"""

import importlib.util
import sys
import types


def register_selective_scan_stub() -> bool:
    """Returns True when the stub was installed."""
    if "selective_scan_cuda" in sys.modules or importlib.util.find_spec("mamba_ssm") is None:
        return False
    if importlib.util.find_spec("selective_scan_cuda") is not None:
        return False
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    return True
