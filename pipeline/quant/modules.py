"""Fake quantisation of a live megatron model chunk through forward hooks (no module or checkpoint changes).

For each quantised linear (``spec.chunk_targets``) a forward pre-hook

- records the input amax while calibrating (the input as the linear sees it: an input-masked linear's elastic
  mask applied first, so dropped channels never count),
- else fake-quantises the input with its calibrated static amax (``qad.activations``) and puts the
  fake-quantised weight in the module's ``weight`` slot for this call (the dynamic per-tensor amax of the
  weight, reduced over its TP / expert-TP shards); a forward hook puts the parameter back.

Gradients reach the parameter through the straight-through fake quant (``numerics.fake_quant``), so megatron's
DDP, optimizer and checkpoints see the usual parameters. The hooks need megatron's own linears (local
backend): TE fuses the pre-norm into the linear, where no hook can reach the normed input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state as ps
from megatron.core.utils import unwrap_model

from pipeline.quant.numerics import FORMATS, fake_quant
from pipeline.quant.spec import chunk_targets


def local_backend(recipe):
    """The recipe with ``model.backend: local`` (the fake-quant hooks' requirement; checkpoints load across)."""
    return dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, backend="local"))


class FakeQuant:
    def __init__(self, model_chunk: torch.nn.Module, model_cfg, qad_cfg):
        self.targets = chunk_targets(unwrap_model(model_chunk), model_cfg, qad_cfg)
        self.activations = qad_cfg.activations
        self.fmt: Optional[str] = None  # None: the BF16 model
        self.calibrating = False
        self.amax: Dict[str, torch.Tensor] = {}  # input key -> fp32 0-d tensor on the model's device
        self.device = next(model_chunk.parameters()).device
        self._handles = []
        for t in self.targets:
            self._handles.append(t.module.register_forward_pre_hook(self._make_pre(t)))
            self._handles.append(t.module.register_forward_hook(_restore_weight))
        if self.activations:  # routed experts: the routing weight after fc2, as deployed (see _probs_after_fc2)
            for name, module in unwrap_model(model_chunk).named_modules():
                if re.search(r"mlp\.experts\.local_experts\.\d+$", name):
                    self._handles.append(module.register_forward_pre_hook(self._hold_probs))
                    self._handles.append(module.register_forward_hook(_probs_after_fc2))

    # ---- public API
    def set_format(self, fmt: Optional[str]) -> None:
        if fmt is not None and fmt not in FORMATS:
            raise ValueError(f"unknown quantisation format {fmt!r}")
        if fmt is not None and self.activations:
            missing = sorted({t.input_key for t in self.targets} - set(self.amax))
            if missing:
                raise ValueError(f"no calibrated input amax for {missing[0]} ({len(missing)} missing): calibrate first")
        self.fmt = fmt

    def set_amax(self, amax: Dict[str, float]) -> None:
        self.amax = {k: torch.tensor(float(v), dtype=torch.float32, device=self.device) for k, v in amax.items()}

    def local_amax(self) -> Dict[str, float]:
        return {k: float(v) for k, v in self.amax.items()}

    @contextlib.contextmanager
    def calibration(self):
        """Record the max |input| of every target (keys this chunk holds are reset first)."""
        fmt, self.fmt, self.calibrating = self.fmt, None, True
        for t in self.targets:
            self.amax[t.input_key] = torch.zeros((), dtype=torch.float32, device=self.device)
        try:
            yield self
        finally:
            self.fmt, self.calibrating = fmt, False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- hooks
    def _hold_probs(self, module, args):
        """megatron scales an expert's fc2 input by the routing weight; vLLM (and transformers) scale fc2's
        output. fc2's quantised input must be the unscaled activation: hold the weight back until fc2 is done."""
        if (not self.calibrating and self.fmt is None) or len(args) < 2 or args[1] is None:
            return None
        module.__dict__["_fq_probs"] = args[1]
        return (args[0],)

    def _make_pre(self, t):
        group = ps.get_expert_tensor_parallel_group if t.expert else ps.get_tensor_model_parallel_group

        def pre(module, args):
            x = args[0]
            if (not self.calibrating and self.fmt is None) or x.numel() == 0:  # off, or an expert without tokens
                return None
            mask = getattr(module, "elastic_mask", None)
            if mask is not None:  # what the linear multiplies in anyway: quantise (or measure) the masked input
                x = x * mask.to(x.dtype)
            if self.calibrating:
                seen = self.amax[t.input_key]
                self.amax[t.input_key] = torch.maximum(seen, x.detach().abs().amax().float())
                return None
            if self.activations:
                x = fake_quant(x, self.amax[t.input_key], self.fmt, clip=True)
            w = module.weight
            amax = w.detach().abs().amax().float()
            g = group()
            if g is not None and dist.get_world_size(g) > 1:
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=g)
            module.__dict__["_fq_weight"] = w  # not setattr: that would register a second parameter
            module._parameters["weight"] = fake_quant(w, amax, self.fmt, clip=False)
            return (x,) + tuple(args[1:])

        return pre


def _probs_after_fc2(module, args, output):
    probs = module.__dict__.pop("_fq_probs", None)
    if probs is None:
        return None
    out, bias = output
    return (out * probs.unsqueeze(-1)).to(out.dtype), bias


def _restore_weight(module, args, output):
    w = module.__dict__.pop("_fq_weight", None)
    if w is not None:
        module._parameters["weight"] = w
    return None
