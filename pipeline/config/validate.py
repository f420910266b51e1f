"""Checks that run before anything heavy: each failure is one ``UserError`` line naming the key."""

from __future__ import annotations

import os

from pipeline.config.schema import TRAIN_STAGES, Recipe
from pipeline.errors import UserError

LAYER_SYMBOLS = {"M": "Mamba-2", "*": "attention", "E": "MoE", "-": "dense MLP"}
CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "model.activation": ("squared_relu", "gelu", "silu"),
    "model.moe_score_function": ("sigmoid", "softmax"),
    "parallelism.recompute": ("none", "full"),
    "parallelism.moe_token_dispatcher": ("alltoall", "allgather"),
}
TRAINING_CHOICES = {
    "data": ("synthetic", "blend"),
    "precision": ("auto", "bf16", "fp32"),
    "lr_decay_style": ("cosine", "linear", "constant"),
}


def validate(recipe: Recipe, source: str = "<recipe>") -> None:
    def fail(msg: str):
        raise UserError(f"{source}: {msg}")

    def get(path: str):
        obj = recipe
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    for path, allowed in CHOICES.items():
        if get(path) not in allowed:
            fail(f"{path} = {get(path)!r}, expected one of {', '.join(allowed)}")

    m, p = recipe.model, recipe.parallelism
    bad = sorted({s for s in m.pattern if s not in LAYER_SYMBOLS})
    if bad:
        fail(f"model.pattern has unknown layer symbol(s) {''.join(bad)!r}; "
             f"use {', '.join(f'{k} ({v})' for k, v in LAYER_SYMBOLS.items())}; "
             "pipeline stages come from parallelism.pp_layers, not '|'")
    if len(m.pattern) != m.num_layers:
        fail(f"model.pattern has {len(m.pattern)} layers but model.num_layers = {m.num_layers}")
    for name in ("hidden_size", "vocab_size", "num_layers"):
        if getattr(m, name) <= 0:
            fail(f"model.{name} must be positive")
    if "*" in m.pattern:
        _divides(fail, m.num_query_groups, m.num_attention_heads,
                 "model.num_query_groups", "model.num_attention_heads")
    if "M" in m.pattern:
        _divides(fail, m.mamba_num_groups, m.mamba_num_heads, "model.mamba_num_groups", "model.mamba_num_heads")
    if "E" in m.pattern:
        if not 1 <= m.moe_topk <= m.num_experts:
            fail(f"model.moe_topk = {m.moe_topk} must be in [1, model.num_experts = {m.num_experts}]")

    for name in ("tp", "pp", "ep", "cp"):
        if getattr(p, name) < 1:
            fail(f"parallelism.{name} must be >= 1")
    if p.tp > 1:
        if "*" in m.pattern:
            _divides(fail, p.tp, m.num_attention_heads, "parallelism.tp", "model.num_attention_heads")
            _divides(fail, p.tp, m.num_query_groups, "parallelism.tp", "model.num_query_groups")
        if "M" in m.pattern:
            _divides(fail, p.tp, m.mamba_num_heads, "parallelism.tp", "model.mamba_num_heads")
            _divides(fail, p.tp, m.mamba_num_groups, "parallelism.tp", "model.mamba_num_groups")
        if "-" in m.pattern:
            _divides(fail, p.tp, m.ffn_hidden_size, "parallelism.tp", "model.ffn_hidden_size")
        _divides(fail, p.tp, m.vocab_size, "parallelism.tp", "model.vocab_size")
    if p.ep > 1:
        if "E" not in m.pattern:
            fail("parallelism.ep > 1 but model.pattern has no MoE layer ('E')")
        _divides(fail, p.ep, m.num_experts, "parallelism.ep", "model.num_experts")
    if p.pp > m.num_layers:
        fail(f"parallelism.pp = {p.pp} exceeds model.num_layers = {m.num_layers}")
    if p.pp_layers:
        if len(p.pp_layers) != p.pp or sum(p.pp_layers) != m.num_layers or min(p.pp_layers) < 1:
            fail(f"parallelism.pp_layers = {p.pp_layers} must have pp = {p.pp} positive entries "
                 f"summing to model.num_layers = {m.num_layers}")

    for stage in TRAIN_STAGES:
        t = getattr(recipe, stage).training
        for key, allowed in TRAINING_CHOICES.items():
            if getattr(t, key) not in allowed:
                fail(f"{stage}.training.{key} = {getattr(t, key)!r}, expected one of {', '.join(allowed)}")
        if t.global_batch_size % t.micro_batch_size:
            fail(f"{stage}.training.global_batch_size = {t.global_batch_size} is not a multiple of "
                 f"micro_batch_size = {t.micro_batch_size}")
        if t.seq_length > m.max_sequence_length:
            fail(f"{stage}.training.seq_length = {t.seq_length} exceeds "
                 f"model.max_sequence_length = {m.max_sequence_length}")
        if p.cp > 1 and t.seq_length % (2 * p.cp):
            fail(f"{stage}.training.seq_length must be a multiple of 2 * parallelism.cp")

    if recipe.data.tokenizer and not os.path.isdir(recipe.data.tokenizer):
        fail(f"data.tokenizer: directory not found: {recipe.data.tokenizer}")
    for i, src in enumerate(recipe.data.sources):
        if not os.path.exists(src.path):
            fail(f"data.sources[{i}].path: file not found: {src.path!r}")

    _validate_elastic(recipe, fail)


def _validate_elastic(recipe: Recipe, fail) -> None:
    m, p, e = recipe.model, recipe.parallelism, recipe.elastic
    full = {
        "hidden": m.hidden_size,
        "attention_heads": m.num_attention_heads,
        "mamba_heads": m.mamba_num_heads,
        "ffn": m.ffn_hidden_size,
        "moe_ffn": m.moe_ffn_hidden_size,
        "shared_expert_ffn": m.moe_shared_expert_ffn_hidden_size,
        "experts": m.num_experts,
        "depth": m.num_layers,
    }
    widths = ("hidden", "ffn", "moe_ffn", "shared_expert_ffn")
    for axis, largest in full.items():
        choices = getattr(e.axes, axis)
        key = f"elastic.axes.{axis}"
        if not choices:
            continue
        if choices != sorted(choices, reverse=True) or len(set(choices)) != len(choices):
            fail(f"{key} = {choices} must be distinct and largest first")
        if choices[0] != largest:
            fail(f"{key}[0] = {choices[0]} must be the full size {largest}")
        for c in choices:
            if c <= 0:
                fail(f"{key} has a non-positive choice {c}")
            if axis in widths and c % e.size_multiple:
                fail(f"{key} choice {c} is not a multiple of elastic.size_multiple = {e.size_multiple}")
            if axis in widths + ("attention_heads", "mamba_heads") and c % p.tp:
                fail(f"{key} choice {c} is not a multiple of parallelism.tp = {p.tp}")
            if axis == "attention_heads" and c % m.num_query_groups:
                fail(f"{key} choice {c} is not a multiple of model.num_query_groups = {m.num_query_groups}")
            if axis == "mamba_heads" and c % m.mamba_num_groups:
                fail(f"{key} choice {c} is not a multiple of model.mamba_num_groups = {m.mamba_num_groups}")
            if axis == "experts" and (c < m.moe_topk or c % p.ep):
                fail(f"{key} choice {c} must be >= model.moe_topk and a multiple of parallelism.ep")
    names = [b.name for b in e.budgets]
    if len(set(names)) != len(names) or any(not n for n in names):
        fail("elastic.budgets need distinct, non-empty names")
    for i, b in enumerate(e.budgets):
        if not 0 < b.fraction <= 1:
            fail(f"elastic.budgets[{i}].fraction = {b.fraction} must be in (0, 1]")


def _divides(fail, d: int, n: int, dname: str, nname: str) -> None:
    if d <= 0 or n % d:
        fail(f"{dname} = {d} does not divide {nname} = {n}")
