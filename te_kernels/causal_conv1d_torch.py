"""A PyTorch stand-in for the causal-conv1d package, so megatron's memory-efficient Mamba path runs without it.

megatron's ``use_mamba_mem_eff_path`` runs mamba-ssm's ``mamba_split_conv1d_scan_combined``: conv1d + SSD + gate
in one autograd function that keeps only its input and recomputes the rest in the backward. It calls
``causal_conv1d_cuda.causal_conv1d_fwd / _bwd`` (the causal-conv1d CUDA extension, which does not build on our GPU
machine in its time limit). The same contract in PyTorch (a depthwise ``F.conv1d``, left padding, optional SiLU)
unlocks that path; ``register_causal_conv1d_standin`` installs it under the package's module names where the package
is missing, before mamba-ssm and megatron's mixer import it. Sequence packing (``seq_idx``) and initial / final
conv states are not supported (megatron's training path passes none).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
from typing import Optional

import torch
import torch.nn.functional as F


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    """x [b, d, s], weight [d, w]: out[..., t] = sum_k weight[:, k] x[..., t - (w - 1) + k] (+ bias)."""
    width = weight.shape[-1]
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(y) if silu else y


def _unsupported(seq_idx, initial_states, final_states) -> None:
    if seq_idx is not None or initial_states is not None or final_states is not None:
        raise NotImplementedError("the causal-conv1d stand-in has no seq_idx / initial or final states: install "
                                  "causal-conv1d for packed sequences")


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu_activation):
    """``causal_conv1d_cuda.causal_conv1d_fwd``."""
    _unsupported(seq_idx, initial_states, final_states_out)
    return _conv(x, weight, bias, bool(silu_activation))


def causal_conv1d_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial_states,
                      silu_activation):
    """``causal_conv1d_cuda.causal_conv1d_bwd`` -> (dx, dweight, dbias, dinitial_states); writes dx into the given
    ``dx`` (mamba-ssm passes a view of its input gradient and uses it in place)."""
    _unsupported(seq_idx, initial_states, dfinal_states)
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (x, weight) + ((bias,) if bias is not None else ())]
        y = _conv(inputs[0], inputs[1], inputs[2] if bias is not None else None, bool(silu_activation))
        grads = torch.autograd.grad(y, inputs, dout)
    if dx is None:
        dx = grads[0]
    else:
        dx.copy_(grads[0])
    return dx, grads[1], grads[2] if bias is not None else None, None


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """``causal_conv1d.causal_conv1d_fn`` (differentiable through autograd)."""
    _unsupported(seq_idx, initial_states, final_states_out)
    if return_final_states:
        raise NotImplementedError("the causal-conv1d stand-in returns no final states")
    return _conv(x, weight, bias, activation in ("silu", "swish"))


def causal_conv1d_varlen_states(*args, **kwargs):
    raise NotImplementedError("the causal-conv1d stand-in has no varlen states: install causal-conv1d")


def _module(name: str, package: bool = False) -> types.ModuleType:
    """A module with a spec, as an import would leave it: ``importlib.util.find_spec`` (megatron's, transformers'
    and the memory plan's availability checks) raises ValueError on a registered module without one."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    return module


def register_causal_conv1d_standin() -> bool:
    """Install the stand-in as ``causal_conv1d`` (+ ``.causal_conv1d_varlen``) and ``causal_conv1d_cuda`` where the
    package is missing, on a GPU with mamba-ssm. Returns True when installed. Must run before mamba-ssm's
    ``ssd_combined`` and megatron's Mamba mixer are imported."""
    if "causal_conv1d" in sys.modules or importlib.util.find_spec("causal_conv1d") is not None:
        return False
    if importlib.util.find_spec("mamba_ssm") is None or not torch.cuda.is_available():
        return False
    package = _module("causal_conv1d", package=True)  # ``.causal_conv1d_varlen`` resolves from sys.modules
    package.causal_conv1d_fn = causal_conv1d_fn
    package.STANDIN = True
    package.__version__ = "0.0.0+standin"  # megatron's version check for sequence packing: not supported
    varlen = _module("causal_conv1d.causal_conv1d_varlen")
    varlen.causal_conv1d_varlen_states = causal_conv1d_varlen_states
    package.causal_conv1d_varlen = varlen
    ext = _module("causal_conv1d_cuda")
    ext.causal_conv1d_fwd, ext.causal_conv1d_bwd = causal_conv1d_fwd, causal_conv1d_bwd
    sys.modules.update({"causal_conv1d": package, "causal_conv1d.causal_conv1d_varlen": varlen,
                        "causal_conv1d_cuda": ext})
    return True
