"""Quantised HF checkpoints in the layout vLLM's ModelOpt loader reads, and slicing them by prefix.

    config.json            quantization_config {quant_method: modelopt, quant_algo, group_size, ignore, ...}
    hf_quant_config.json   {producer: modelopt, quantization: {quant_algo, kv_cache_quant_algo, group_size,
                            exclude_modules}}
    FP8   <linear>.weight float8_e4m3fn, .weight_scale fp32 [], .input_scale fp32 []
    NVFP4 <linear>.weight uint8 [out, in/2] (E2M1 pairs), .weight_scale float8_e4m3fn [out, in/16],
          .weight_scale_2 fp32 [], .input_scale fp32 []

Every other tensor is copied from the BF16 HF directory unchanged. Weight scales come from the weight itself
(q / k / v share the max of the three); input scales from the calibrated amax (``calib.py``). Slicing a budget
cuts packed weights and block scales by the same prefixes as the BF16 slicer (``slicing.slice_tensor`` on the
unpacked codes / the block scales repeated over their 16 inputs) and keeps per-tensor scales, so a slice equals
quantising the BF16 slice with the parent's scales (tests/test_quant_export.py).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch

from pipeline.config.schema import ModelConfig
from pipeline.elastic.slicing import sliced_name, slice_tensor
from pipeline.errors import UserError
from pipeline.hf.safetensors_io import SafetensorsDir, tensor_bytes, write_model_files
from pipeline.quant import numerics
from pipeline.quant.spec import BLOCK, hf_linears, input_key, is_quantized
from te_kernels import quant_torch as ref

HF_QUANT_CONFIG = "hf_quant_config.json"
QUANT_ALGO = {"fp8": "FP8", "nvfp4": "NVFP4"}
MODELOPT_VERSION = "0.47.0"  # the ModelOpt export format these files follow (tests compare with that release)
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale")


def hf_quant_config(fmt: str, exclude: List[str], kv_cache: str) -> dict:
    quant = {"quant_algo": QUANT_ALGO[fmt], "kv_cache_quant_algo": "FP8" if kv_cache == "fp8" else None}
    if fmt == "nvfp4":
        quant["group_size"] = BLOCK
    quant["exclude_modules"] = list(exclude)
    return {"producer": {"name": "modelopt", "version": MODELOPT_VERSION}, "quantization": quant}


def config_quantization(hfq: dict) -> dict:
    """config.json's ``quantization_config`` of an hf_quant_config (modelopt's ``convert_hf_quant_config_format``
    for FP8 / NVFP4: tests/test_quant_export.py compares the two)."""
    q = hfq["quantization"]
    if q["quant_algo"] == "FP8":
        group = {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                 "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}
    else:
        gs = q.get("group_size", BLOCK)
        group = {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs},
                 "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": gs},
                 "targets": ["Linear"]}
    out = {"config_groups": {"group_0": group}, "ignore": list(q.get("exclude_modules") or []),
           "quant_algo": q["quant_algo"]}
    if q.get("kv_cache_quant_algo") == "FP8":
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    out["producer"] = hfq["producer"]
    out["quant_method"] = "modelopt"
    return out


def read_quant_dir(hf_dir: str) -> Optional[Tuple[str, List[str]]]:
    """(format, excluded module names) of a quantised HF directory, or None for a BF16 one."""
    path = os.path.join(hf_dir, HF_QUANT_CONFIG)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            q = json.load(f)["quantization"]
        fmt = {v: k for k, v in QUANT_ALGO.items()}[q["quant_algo"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not an FP8 / NVFP4 ModelOpt config ({str(e).splitlines()[0]})") from None
    return fmt, list(q.get("exclude_modules") or [])


def _weight_amax(files: SafetensorsDir, modules: List[str]) -> Dict[str, torch.Tensor]:
    """Per-tensor weight amax; q / k / v of one layer share the max of the three (one fused scale)."""
    out = {}
    for name in modules:
        out[name] = files.read(name + ".weight").float().abs().amax()
    for name in modules:
        if name.endswith(".q_proj"):
            group = [name[:-6] + p for p in ("q_proj", "k_proj", "v_proj") if name[:-6] + p in out]
            shared = torch.stack([out[n] for n in group]).amax()
            out.update({n: shared for n in group})
    return out


def _entries(name: str, dtype: torch.dtype, shape, fmt: str, activations: bool):
    out, fp32 = [], torch.float32
    if fmt == "fp8":
        out += [(name + ".weight", torch.float8_e4m3fn, shape), (name + ".weight_scale", fp32, ())]
    else:
        out += [(name + ".weight", torch.uint8, (*shape[:-1], shape[-1] // 2)),
                (name + ".weight_scale", torch.float8_e4m3fn, (*shape[:-1], shape[-1] // BLOCK)),
                (name + ".weight_scale_2", fp32, ())]
    if activations:
        out.append((name + ".input_scale", fp32, ()))
    return out


def quantize_hf_dir(src_dir: str, out_dir: str, model: ModelConfig, fmt: str, q, input_amax: Dict[str, float],
                    max_shard_bytes: int = 5 << 30, progress: bool = True) -> str:
    """Write the ``fmt`` version of the BF16 HF directory ``src_dir`` (tokenizer, elastic.json copied)."""
    from tqdm import tqdm

    files = SafetensorsDir(src_dir)
    linears = hf_linears(model)
    quantized = [n for n in linears if is_quantized(n, model, q)]
    excluded = [n for n in linears if n not in quantized]
    missing = sorted({input_key(n) for n in quantized} - set(input_amax)) if q.activations else []
    if missing:
        raise UserError(f"no calibrated input amax for {missing[0]} ({len(missing)} missing): re-run qad")
    amax = _weight_amax(files, quantized)
    qset = set(quantized)
    order = []
    for name, info in files.tensors.items():
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        order += (_entries(module, info.dtype, info.shape, fmt, q.activations) if module in qset
                  else [(name, info.dtype, info.shape)])

    def produce() -> Iterator[Tuple[str, torch.Tensor]]:
        for name in files.tensors:
            module = name[:-len(".weight")] if name.endswith(".weight") else None
            if module not in qset:
                yield name, files.read(name)
                continue
            for suffix, t in numerics.quantize_weight(files.read(name), fmt, amax[module]).items():
                yield f"{module}.{suffix}", t
            if q.activations:
                yield module + ".input_scale", numerics.input_scale(input_amax[input_key(module)], fmt)

    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    bar = tqdm(total=tensor_bytes(order), unit="B", unit_scale=True, desc=f"quantise {fmt}", disable=not progress)
    try:
        write_model_files(tmp, order, produce(), max_shard_bytes, bar)
        write_quant_configs(src_dir, tmp, hf_quant_config(fmt, excluded, q.kv_cache))
        for name in os.listdir(src_dir):
            src = os.path.join(src_dir, name)
            if os.path.isfile(src) and not name.endswith(".safetensors") and name not in (
                    "config.json", HF_QUANT_CONFIG, "model.safetensors.index.json"):
                shutil.copy2(src, os.path.join(tmp, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def write_quant_configs(config_from: str, out_dir: str, hfq: dict, config: Optional[dict] = None) -> None:
    """hf_quant_config.json + config.json (``config`` or ``config_from``'s) with its quantization_config."""
    if config is None:
        with open(os.path.join(config_from, "config.json")) as f:
            config = json.load(f)
    config = dict(config, quantization_config=config_quantization(hfq))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, HF_QUANT_CONFIG), "w") as f:
        json.dump(hfq, f, indent=2)


# ---- slicing a quantised elastic checkpoint
def _split(name: str, quantized: Set[str]) -> Tuple[Optional[str], str]:
    """(quantised module, suffix) of a tensor name, or (None, name)."""
    for suffix in (".weight",) + SCALE_SUFFIXES:
        if name.endswith(suffix) and name[:-len(suffix)] in quantized:
            return name[:-len(suffix)], suffix
    return None, name


def slice_quantized_tensor(module: str, suffix: str, t: torch.Tensor, fmt: str, model: ModelConfig,
                           subnet) -> torch.Tensor:
    """The subnet's part of one tensor of a quantised linear: codes and block scales by the BF16 prefixes."""
    weight = module + ".weight"
    if t.dim() == 0:  # per-tensor scales: one for every nested model
        return t.clone()
    if suffix == ".weight" and fmt == "fp8":
        return slice_tensor(weight, t.view(torch.uint8), model, subnet).view(torch.float8_e4m3fn)
    if suffix == ".weight":
        return ref.pack_fp4(slice_tensor(weight, ref.unpack_fp4(t), model, subnet))
    # NVFP4 block scales: one per 16 inputs, cut as the inputs they scale
    per_input = slice_tensor(weight, t.view(torch.uint8).repeat_interleave(BLOCK, dim=-1), model, subnet)
    blocks = per_input.view(*per_input.shape[:-1], -1, BLOCK)
    if not torch.equal(blocks, blocks[..., :1].expand_as(blocks)):
        raise ValueError(f"{module}: the subnet cuts NVFP4 blocks of {BLOCK} inputs (sizes must be multiples of 16)")
    return blocks[..., 0].contiguous().view(torch.float8_e4m3fn)


def slice_quantized_dir(src_dir: str, tmp: str, model: ModelConfig, budget, fmt: str, excluded: List[str],
                        cfg: dict, max_shard_bytes: int, bar) -> None:
    """Write the budget's quantised standalone model into the (fresh) directory ``tmp``."""
    quantized = {n for n in hf_linears(model) if n not in set(excluded)}
    files = SafetensorsDir(src_dir)
    s = budget.subnet
    order, sources = [], []
    for name in files.tensors:
        module, suffix = _split(name, quantized)
        base = module + ".weight" if module else name
        new_base = sliced_name(base, model, s)
        if new_base is None:
            continue
        new = new_base[:-len(".weight")] + suffix if module else new_base
        t = files.tensors[name]
        if module is None:
            shape = tuple(slice_tensor(name, torch.empty(t.shape, device="meta"), model, s).shape)
        elif len(t.shape) == 0:
            shape = ()
        else:  # from the logical [out, in] weight's slice
            w = files.tensors[base].shape
            full = (*w[:-1], w[-1] * 2) if fmt == "nvfp4" else tuple(w)
            cut = tuple(slice_tensor(base, torch.empty(full, device="meta"), model, s).shape)
            per = 1 if fmt == "fp8" else (2 if suffix == ".weight" else BLOCK)
            shape = (*cut[:-1], cut[-1] // per)
        order.append((new, t.dtype, shape))
        sources.append((name, module, suffix))

    def produce():
        for (new, _, _), (name, module, suffix) in zip(order, sources):
            t = files.read(name)
            yield new, (slice_quantized_tensor(module, suffix, t, fmt, model, s) if module
                        else slice_tensor(name, t, model, s))

    write_model_files(tmp, order, produce(), max_shard_bytes, bar)
    kept = [sliced_name(n + ".weight", model, s) for n in excluded]
    sliced_excluded = [k[:-len(".weight")] for k in kept if k is not None]
    with open(os.path.join(src_dir, HF_QUANT_CONFIG)) as f:
        hfq = json.load(f)
    hfq["quantization"]["exclude_modules"] = sliced_excluded
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    write_quant_configs(src_dir, tmp, hfq, cfg)


def export_quantized_elastic(model: ModelConfig, ckpt: str, out_dir: str, budgets, budgets_path: str, fmt: str, q,
                             input_amax: Dict[str, float], overwrite: bool = False, max_shard_bytes: int = 5 << 30,
                             progress: bool = True, **export_kwargs) -> Tuple[str, dict]:
    """The quantised elastic checkpoint: the BF16 elastic directory of ``ckpt`` (``export_elastic``) quantised
    tensor by tensor; elastic.json gains the format and the storage report of the quantised files. The BF16
    megatron copy is not repeated here (the BF16 elastic directory holds it)."""
    from pipeline.elastic.elastic_dir import ELASTIC_JSON, element_bytes, export_elastic, finish_out, prepare_out
    from pipeline.quant.storage import quant_storage_report

    tmp = prepare_out(out_dir, overwrite)
    bf16 = tmp + "-bf16"
    try:
        export_elastic(model, ckpt, bf16, budgets, budgets_path, overwrite=True, max_shard_bytes=max_shard_bytes,
                       progress=progress, **export_kwargs)
        quantize_hf_dir(bf16, tmp, model, fmt, q, input_amax, max_shard_bytes, progress)
        stored = element_bytes(bf16)  # exact for the written files: unquantised tensors keep their dtype
        report = quant_storage_report(model, budgets, fmt, q, stored["backbone.embeddings.weight"], stored)
        with open(os.path.join(tmp, ELASTIC_JSON)) as f:
            data = json.load(f)
        data.pop("megatron_checkpoint", None)
        data.update(quantization={"format": fmt, "algo": QUANT_ALGO[fmt], "input_amax": input_amax},
                    storage=report)
        with open(os.path.join(tmp, ELASTIC_JSON), "w") as f:
            json.dump(data, f, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(bf16, ignore_errors=True)
    return finish_out(tmp, out_dir), report
