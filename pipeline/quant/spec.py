"""Which linears are quantised, by their Hugging Face NemotronH names, and how a live megatron chunk maps to them.

One name space for calibration, fake quantisation, export and slicing: the HF module name (``backbone.layers.3.
mixer.in_proj``). ``qad.exclude`` patterns (fnmatch) and ``qad.keep_mamba_before_attention`` decide what stays
BF16. megatron's fused qkv holds three HF linears: they share one weight amax (the max of the three, as vLLM
uses when it fuses them). The routed experts of one layer share one input amax (vLLM's fused MoE takes one
activation scale per layer), stored under ``...mixer.experts.*.up_proj``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import List, Optional

QAD_FORMATS = ("nvfp4", "fp8")
CALIBRATION_DATA = ("blend", "synthetic")
KV_CACHE = ("none", "fp8")
BLOCK = 16

_EXPERT = re.compile(r"(.*\.mixer\.experts\.)\d+(\..*)")


def input_key(hf_name: str) -> str:
    """Key of a linear's calibrated input amax (routed experts of one layer share one; k / v use q's)."""
    e = _EXPERT.fullmatch(hf_name)
    if e:
        return f"{e.group(1)}*{e.group(2)}"
    if hf_name.endswith((".k_proj", ".v_proj")):  # q / k / v read one input (megatron's fused linear_qkv)
        return hf_name[:-len("k_proj")] + "q_proj"
    return hf_name


def mamba_before_attention(pattern: str) -> List[int]:
    """Layers whose Mamba mixer feeds an attention layer (the nearest Mamba layer before each '*')."""
    out = []
    for i, sym in enumerate(pattern):
        if sym == "*":
            j = next((j for j in range(i - 1, -1, -1) if pattern[j] == "M"), None)
            if j is not None and j not in out:
                out.append(j)
    return out


def hf_linears(m) -> List[str]:
    """Every linear of the HF NemotronH model (module names, without ``.weight``), in file order."""
    out = []
    for i, sym in enumerate(m.pattern):
        p = f"backbone.layers.{i}.mixer."
        if sym == "M":
            out += [p + "in_proj", p + "out_proj"]
        elif sym == "*":
            out += [p + f"{x}_proj" for x in "qkvo"]
        elif sym == "-":
            out += [p + "up_proj", p + "down_proj"]
        elif sym == "E":
            out.append(p + "gate")
            for e in range(m.num_experts):
                out += [p + f"experts.{e}.up_proj", p + f"experts.{e}.down_proj"]
            if m.moe_shared_expert_ffn_hidden_size:
                out += [p + "shared_experts.up_proj", p + "shared_experts.down_proj"]
    if not m.tie_embeddings:
        out.append("lm_head")
    return out


def is_quantized(hf_name: str, m, q) -> bool:
    """Whether the HF linear ``hf_name`` is quantised under recipe section ``q`` (QadConfig)."""
    if hf_name.endswith(".mixer.gate") or any(fnmatch(hf_name, pat) for pat in q.exclude):
        return False
    layer = re.match(r"backbone\.layers\.(\d+)\.mixer\.(in_proj|out_proj)$", hf_name)
    return not (layer and q.keep_mamba_before_attention and int(layer.group(1)) in mamba_before_attention(m.pattern))


def excluded_linears(m, q) -> List[str]:
    return [n for n in hf_linears(m) if not is_quantized(n, m, q)]


@dataclass
class Target:
    """One quantised megatron linear of a live chunk and the HF linears it holds."""

    module: object
    hf: List[str]  # HF linear names (q, k, v for the fused qkv)
    input_key: str  # calibrated input amax key
    expert: bool  # a routed expert (its weight is sharded over expert-TP)


def _hf_of(name: str, layer_number: int, sym: str, m, expert_offset: int) -> Optional[List[str]]:
    """HF linears of the megatron module ``name`` (relative to its layer) in global layer ``layer_number - 1``."""
    p = f"backbone.layers.{layer_number - 1}.mixer."
    fixed = {"mixer.in_proj": ["in_proj"], "mixer.out_proj": ["out_proj"],
             "self_attention.linear_qkv": ["q_proj", "k_proj", "v_proj"], "self_attention.linear_proj": ["o_proj"],
             "mlp.linear_fc1": ["up_proj"], "mlp.linear_fc2": ["down_proj"],
             "mlp.shared_experts.linear_fc1": ["shared_experts.up_proj"],
             "mlp.shared_experts.linear_fc2": ["shared_experts.down_proj"]}
    if name in fixed:
        return [p + x for x in fixed[name]]
    e = re.fullmatch(r"mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])", name)
    if e:
        return [p + f"experts.{expert_offset + int(e.group(1))}.{'up_proj' if e.group(2) == '1' else 'down_proj'}"]
    return None


def chunk_targets(chunk, m, q) -> List[Target]:
    """The quantised linears of one (unwrapped) megatron model chunk built with the local backend."""
    from megatron.core import parallel_state as ps

    offset = ps.get_expert_model_parallel_rank() * (m.num_experts // ps.get_expert_model_parallel_world_size())
    out = []
    decoder = chunk.decoder
    for sym, layer in zip(decoder.layer_type_list, decoder.layers):
        for name, module in layer.named_modules():
            if getattr(module, "weight", None) is None and hasattr(module, "weight0"):
                raise ValueError(f"layer {layer.layer_number}: {name} is a grouped GEMM; QAD builds the "
                                 "local backend (model.backend: local)")
            hf = _hf_of(name, layer.layer_number, sym, m, offset)
            if hf and all(is_quantized(n, m, q) for n in hf):
                out.append(Target(module, hf, input_key(hf[0]), ".local_experts." in name))
    if getattr(chunk, "output_layer", None) is not None and chunk.post_process and not m.tie_embeddings \
            and is_quantized("lm_head", m, q):
        out.append(Target(chunk.output_layer, ["lm_head"], "lm_head", False))
    return out


def validate_qad(recipe, fail) -> None:
    """The ``qad`` section (called from pipeline.config.validate)."""
    q, m, e = recipe.qad, recipe.model, recipe.elastic
    for key, allowed in (("format", QAD_FORMATS), ("calibration_data", CALIBRATION_DATA), ("kv_cache", KV_CACHE)):
        if getattr(q, key) not in allowed:
            fail(f"qad.{key} = {getattr(q, key)!r}, expected one of {', '.join(allowed)}")
    if q.calibration_samples < 1 or q.calibration_seq_length < 0:
        fail("qad.calibration_samples must be >= 1 and qad.calibration_seq_length >= 0 (0 = training.seq_length)")
    for key in ("teacher", "budgets_from"):
        if not getattr(q, key):
            fail(f"qad.{key} is empty: name a stage (stage2) or a checkpoint path")
    w = q.budget_weights
    if w and (len(w) != len(e.budgets) or min(w) < 0 or sum(w) <= 0):
        fail(f"qad.budget_weights = {w} needs one non-negative weight per elastic budget ({len(e.budgets)}) "
             f"with a positive sum ([] = stage2.budget_weights)")
    if e.budgets and e.size_multiple % BLOCK:
        fail(f"elastic.size_multiple = {e.size_multiple} must be a multiple of {BLOCK} for NVFP4: a nested slice "
             f"must keep whole blocks of {BLOCK} inputs")
    # every quantised linear's input dim (and the nested prefixes of it) must hold whole NVFP4 blocks
    inputs = {"hidden_size": m.hidden_size, "mamba_head_dim": m.mamba_head_dim,
              "attention_head_dim": m.attention_head_dim}
    for name, v in inputs.items():
        if v % BLOCK and (name == "hidden_size" or m.pattern.count("M" if "mamba" in name else "*")):
            fail(f"model.{name} = {v} is not a multiple of {BLOCK}: NVFP4 blocks of {BLOCK} inputs would straddle "
                 f"{'heads' if 'head' in name else 'the hidden dim'}")
