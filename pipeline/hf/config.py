"""HF ``config.json`` (``model_type: nemotron_h``) <-> the recipe's ``model`` section.

``KEYS`` is the one-to-one table between the two; ``SEMANTICS`` lists the HF keys whose value our
megatron-core model hard-wires (a checkpoint with another value computes something else, so import
refuses it). The layer pattern has three HF spellings: ``hybrid_override_pattern`` (a string, what
Nano v3, vLLM, SGLang, llama.cpp and NVIDIA's remote code read), ``layers_block_type`` with legacy names
(``mamba``/``attention``) or with transformers >= 5 names (``linear_attention``/``full_attention``).
Megatron patterns may carry ``|`` (pipeline-stage boundaries, not layers: dropped) and ``/`` (multi-token
prediction blocks: refused); symbols with no NemotronH block (G, D, +) are refused by position.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Optional

from pipeline.config.schema import ModelConfig
from pipeline.errors import UserError

# recipe model field -> HF config key (every architecture field has exactly one HF key)
KEYS = {
    "hidden_size": "hidden_size",
    "vocab_size": "vocab_size",
    "norm_eps": "layer_norm_epsilon",
    "tie_embeddings": "tie_word_embeddings",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "attention_head_dim": "head_dim",
    "mamba_num_heads": "mamba_num_heads",
    "mamba_head_dim": "mamba_head_dim",
    "mamba_state_dim": "ssm_state_size",
    "mamba_num_groups": "n_groups",
    "mamba_conv_kernel": "conv_kernel",
    "mamba_chunk_size": "chunk_size",
    "ffn_hidden_size": "intermediate_size",
    "activation": "mlp_hidden_act",
    "num_experts": "n_routed_experts",
    "moe_ffn_hidden_size": "moe_intermediate_size",
    "moe_shared_expert_ffn_hidden_size": "moe_shared_expert_intermediate_size",
    "moe_topk": "num_experts_per_tok",
    "moe_topk_scaling_factor": "routed_scaling_factor",
}
# recipe fields that only describe training or initialisation (carried, never a disagreement)
SOFT_KEYS = {"max_sequence_length": "max_position_embeddings", "init_std": "initializer_range"}
# which layer kinds make a key matter (others are compared only when such layers exist)
KEY_NEEDS = {
    "num_attention_heads": "*", "num_query_groups": "*", "attention_head_dim": "*",
    "mamba_num_heads": "M", "mamba_head_dim": "M", "mamba_state_dim": "M", "mamba_num_groups": "M",
    "mamba_conv_kernel": "M", "mamba_chunk_size": "M", "ffn_hidden_size": "-", "num_experts": "E",
    "moe_ffn_hidden_size": "E", "moe_shared_expert_ffn_hidden_size": "E", "moe_topk": "E",
    "moe_topk_scaling_factor": "E",
}
ACTIVATIONS = {"squared_relu": "relu2", "gelu": "gelu", "silu": "silu"}
# HF key -> the value our model computes with (HF default when the key is absent)
SEMANTICS = {
    "mamba_hidden_act": "silu", "use_conv_bias": True, "mamba_proj_bias": False, "use_bias": False,
    "mlp_bias": False, "attention_bias": False, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
    "moe_latent_size": None, "num_nextn_predict_layers": 0, "n_shared_experts": 1,
}
HF_DEFAULTS = {"n_shared_experts": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
               "num_nextn_predict_layers": 0, "moe_latent_size": None, "mamba_hidden_act": "silu",
               "use_conv_bias": True, "mamba_proj_bias": False, "use_bias": False, "mlp_bias": False,
               "attention_bias": False}
MAMBA_GATED_NORM_EPS = 1e-5  # megatron-core 0.19 hard-wires the Mamba gated RMSNorm epsilon

TO_HF_BLOCK = {"M": "mamba", "*": "attention", "E": "moe", "-": "mlp"}
FROM_HF_BLOCK = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                 "moe": "E", "mlp": "-"}
NO_NEMOTRON_H = {"G": "gated delta net", "D": "DeepSeek sparse attention", "+": "multi-latent attention"}


def read_hf_config(hf_dir: str) -> Dict[str, Any]:
    from pipeline.hf.files import read_json

    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    cfg = read_json(path, "config.json")
    if cfg.get("model_type") != "nemotron_h":
        raise UserError(f"{path}: model_type = {cfg.get('model_type')!r}, expected 'nemotron_h'")
    return cfg


def pattern_from_hf(cfg: Dict[str, Any], where: str = "config.json") -> str:
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    if types:
        bad = [(i, t) for i, t in enumerate(types) if t not in FROM_HF_BLOCK]
        if bad:
            i, t = bad[0]
            raise UserError(f"{where}: layers_block_type[{i}] = {t!r} is not a NemotronH block "
                            f"({', '.join(sorted(FROM_HF_BLOCK))})")
        pattern = "".join(FROM_HF_BLOCK[t] for t in types)
    elif cfg.get("hybrid_override_pattern"):
        pattern = megatron_pattern_layers(cfg["hybrid_override_pattern"], f"{where}: hybrid_override_pattern")
    else:
        raise UserError(f"{where}: neither layers_block_type nor hybrid_override_pattern is set")
    n = cfg.get("num_hidden_layers")
    if n is not None and n != len(pattern):
        raise UserError(f"{where}: num_hidden_layers = {n} but the layer pattern has {len(pattern)} layers")
    return pattern


def megatron_pattern_layers(pattern: str, where: str) -> str:
    """The layer symbols of a megatron hybrid pattern: '|' dropped, '/', G, D, + refused by position."""
    if "/" in pattern:
        raise UserError(f"{where} = {pattern!r}: multi-token-prediction blocks ('/' at position "
                        f"{pattern.index('/')}) have no NemotronH export; drop them from the pattern")
    layers = pattern.replace("|", "")
    for i, s in enumerate(layers):
        if s not in TO_HF_BLOCK:
            what = NO_NEMOTRON_H.get(s, "unknown symbol")
            raise UserError(f"{where}: layer {i} is {s!r} ({what}), which has no NemotronH block "
                            f"(M, *, E, - only)")
    return layers


def check_semantics(cfg: Dict[str, Any], pattern: str, where: str = "config.json") -> None:
    """Refuse HF settings our megatron-core model does not compute."""
    for key, ours in SEMANTICS.items():
        if key == "n_shared_experts" and "E" not in pattern:
            continue
        value = cfg.get(key, HF_DEFAULTS[key])
        if value != ours:
            raise UserError(f"{where}: {key} = {value!r}, but this pipeline's model computes {key} = {ours!r}")
    if "E" in pattern and cfg.get("num_experts_per_tok") == 1:
        raise UserError(f"{where}: num_experts_per_tok = 1 with norm_topk_prob: megatron-core does not "
                        "normalise a single top-k weight")
    limit = cfg.get("time_step_limit")
    if limit is not None and "M" in pattern and (_num(limit[0]) != 0.0 or not math.isinf(_num(limit[1]))):
        raise UserError(f"{where}: time_step_limit = {limit!r}; megatron-core's Mamba scan has no dt clamp "
                        "(it computes time_step_limit = [0, inf])")
    if "M" in pattern and cfg.get("layer_norm_epsilon", 1e-5) != MAMBA_GATED_NORM_EPS:
        raise UserError(f"{where}: layer_norm_epsilon = {cfg['layer_norm_epsilon']} but megatron-core's Mamba "
                        f"gated norm uses {MAMBA_GATED_NORM_EPS}")
    if cfg.get("mlp_hidden_act", "relu2") not in ACTIVATIONS.values():
        raise UserError(f"{where}: mlp_hidden_act = {cfg['mlp_hidden_act']!r}, expected one of "
                        f"{', '.join(ACTIVATIONS.values())}")


def model_from_hf(cfg: Dict[str, Any], base: Optional[ModelConfig] = None, where: str = "config.json") -> ModelConfig:
    """The recipe model section described by an HF config (fields HF does not carry come from ``base``)."""
    pattern = pattern_from_hf(cfg, where)
    check_semantics(cfg, pattern, where)
    values = {}
    for ours, theirs in {**KEYS, **SOFT_KEYS}.items():
        if theirs in cfg:
            values[ours] = cfg[theirs]
    if "activation" in values:
        values["activation"] = {v: k for k, v in ACTIVATIONS.items()}[values["activation"]]
    if "E" in pattern:
        values.update(moe_score_function="sigmoid", moe_expert_bias=True)
    return dataclasses.replace(base or ModelConfig(), pattern=pattern, num_layers=len(pattern), **values)


def check_model(cfg: Dict[str, Any], model: ModelConfig, where: str = "config.json") -> None:
    """Raise naming the first architecture key where config.json and the recipe's model section differ."""
    theirs = model_from_hf(cfg, model, where)
    if theirs.pattern != model.pattern:
        raise UserError(f"{where}: layer pattern {theirs.pattern!r} but recipe model.pattern = {model.pattern!r}")
    for field, key in KEYS.items():
        need = KEY_NEEDS.get(field)
        if need and need not in model.pattern:
            continue
        a, b = getattr(theirs, field), getattr(model, field)
        if a != b:
            shown = ACTIVATIONS.get(a, a) if field == "activation" else a
            raise UserError(f"{where}: {key} = {shown!r} but recipe model.{field} = {b!r}")
    if "E" in model.pattern and (model.moe_score_function != "sigmoid" or not model.moe_expert_bias):
        raise UserError(f"{where}: NemotronH routes with sigmoid scores + expert bias but recipe has "
                        f"model.moe_score_function = {model.moe_score_function!r}, "
                        f"model.moe_expert_bias = {model.moe_expert_bias}")


def hf_config_from_model(model: ModelConfig, base: Optional[Dict[str, Any]] = None,
                         dtype: str = "bfloat16") -> Dict[str, Any]:
    """config.json for ``model``; keys of ``base`` (the imported parent's config) that we do not own carry
    through (token ids, time-step init, auto_map, ...)."""
    layers = megatron_pattern_layers(model.pattern, "model.pattern")
    if "E" in layers and model.moe_score_function != "sigmoid":
        raise UserError(f"model.moe_score_function = {model.moe_score_function!r}: NemotronH routes with sigmoid")
    if "E" in layers and model.moe_shared_expert_ffn_hidden_size <= 0:
        raise UserError("model.moe_shared_expert_ffn_hidden_size = 0: NemotronH MoE blocks always have a shared "
                        "expert")
    cfg = {k: v for k, v in (base or {}).items() if k not in ("layers_block_type", "layer_types", "torch_dtype")}
    cfg.update(architectures=["NemotronHForCausalLM"], model_type="nemotron_h", num_hidden_layers=len(layers),
               hybrid_override_pattern=layers, dtype=dtype)
    for field, key in {**KEYS, **SOFT_KEYS}.items():
        cfg[key] = getattr(model, field)
    cfg["mlp_hidden_act"] = ACTIVATIONS[model.activation]
    cfg.update({k: v for k, v in SEMANTICS.items()})
    if base and ("layers_block_type" in base or "layer_types" in base):
        names = base.get("layers_block_type") or base.get("layer_types")
        modern = any(n in ("linear_attention", "full_attention") for n in names)
        to_hf = dict(TO_HF_BLOCK, **({"M": "linear_attention", "*": "full_attention"} if modern else {}))
        cfg["layers_block_type"] = [to_hf[s] for s in layers]  # the spelling the parent used, kept in sync
    return cfg


def hf_dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _num(v) -> float:
    """transformers >= 5 writes inf as {"__float__": "Infinity"}; json.load gives inf for Infinity."""
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)
