"""A quantised HF NemotronH checkpoint (FP8 / NVFP4, ModelOpt layout) dequantised into transformers' model.

For evaluation here (no FP4 GEMM on CPU or Hopper): every quantised linear gets its dequantised weight
(``quant_torch``: what vLLM's kernels compute from the same tensors) and, when the checkpoint has input scales,
a forward pre-hook that quantises its input with the static scale exactly as the fake-quant training did.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch

from pipeline.hf.safetensors_io import SafetensorsDir
from pipeline.quant.export import SCALE_SUFFIXES, read_quant_dir
from pipeline.quant.spec import hf_linears
from te_kernels import quant_torch as ref


def _quant_input(fmt: str, scale: torch.Tensor):
    def pre(module, args):
        x = args[0]
        if fmt == "fp8":
            y = ref.fp8_dequantize(ref.fp8_quantize(x, scale), scale, x.dtype)
        else:
            codes, blocks = ref.nvfp4_quantize(x, scale)
            y = ref.nvfp4_dequantize(codes, blocks, scale, x.dtype)
        return (y,) + tuple(args[1:])

    return pre


def dequantized_state(hf_dir: str, dtype: torch.dtype = torch.float32) -> Tuple[Dict[str, torch.Tensor],
                                                                                   Dict[str, torch.Tensor], str]:
    """(HF tensors with dequantised weights, input scale per quantised module, format)."""
    from pipeline.hf.config import model_from_hf, read_hf_config

    found = read_quant_dir(hf_dir)
    if found is None:
        raise ValueError(f"{hf_dir}: no hf_quant_config.json (not a quantised checkpoint)")
    fmt, excluded = found
    m = model_from_hf(read_hf_config(hf_dir))
    quantized = set(hf_linears(m)) - set(excluded)
    files = SafetensorsDir(hf_dir)
    state, scales = {}, {}
    for name in files.tensors:
        if name.endswith(SCALE_SUFFIXES):
            continue
        t = files.read(name)
        module = name[:-len(".weight")]
        if name.endswith(".weight") and module in quantized:
            parts = {"weight": t, "weight_scale": files.read(module + ".weight_scale")}
            if fmt == "nvfp4":
                parts["weight_scale_2"] = files.read(module + ".weight_scale_2")
            t = ref.fp8_dequantize(t, parts["weight_scale"], dtype) if fmt == "fp8" else ref.nvfp4_dequantize(
                ref.unpack_fp4(t), parts["weight_scale"], parts["weight_scale_2"], dtype)
            if module + ".input_scale" in files.tensors:
                scales[module] = files.read(module + ".input_scale")
        state[name] = t
    return state, scales, fmt


def load_dequantized(hf_dir: str, dtype: torch.dtype = torch.float32):
    """transformers' ``NemotronHForCausalLM`` with the checkpoint's dequantised weights and input quantisers."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    state, scales, fmt = dequantized_state(hf_dir, dtype)
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = {k: v for k, v in json.load(f).items() if k != "quantization_config"}  # weights are dequantised
    config = NemotronHConfig(**cfg)
    model = NemotronHForCausalLM(config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ValueError(f"{hf_dir}: tensors do not fit NemotronH: missing {missing[:3]}, extra {unexpected[:3]}")
    modules = dict(model.named_modules())
    for name, scale in scales.items():
        modules[name].register_forward_pre_hook(_quant_input(fmt, scale))
    return model.eval()
