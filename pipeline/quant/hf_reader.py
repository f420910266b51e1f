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


def _quant_output(fmt: str, scale: torch.Tensor):
    quant = _quant_input(fmt, scale)
    return lambda module, args, output: quant(module, (output,))[0]


def load_dequantized(hf_dir: str, dtype: torch.dtype = torch.float32, activations: bool = True):
    """transformers' ``NemotronHForCausalLM`` with the checkpoint's dequantised weights and input quantisers.

    transformers stacks the routed experts into one module whose per-expert linears take no hooks: their inputs
    are quantised at the experts module's input (up_proj: every token, blocks along its own hidden vector, one
    scale per layer -- the same numbers as per expert) and at its activation's output (down_proj's input)."""
    import re
    import tempfile

    from safetensors.torch import save_file
    from transformers import NemotronHForCausalLM

    state, scales, fmt = dequantized_state(hf_dir, dtype)
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = {k: v for k, v in json.load(f).items() if k != "quantization_config"}  # weights are dequantised
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f)
        model = NemotronHForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
    modules = dict(model.named_modules())
    prefix = "model." if "model.layers.0" in modules else "backbone."
    for name, scale in (scales.items() if activations else ()):
        name = prefix + name[len("backbone."):] if name.startswith("backbone.") else name
        expert = re.fullmatch(r"(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)", name)
        if expert is None:
            modules[name].register_forward_pre_hook(_quant_input(fmt, scale))
        elif expert.group(2) == "0":  # one input scale per layer for all experts
            experts = modules[expert.group(1)]
            if expert.group(3) == "up_proj":
                experts.register_forward_pre_hook(_quant_input(fmt, scale))
            else:
                experts.act_fn.register_forward_hook(_quant_output(fmt, scale))
    return model
