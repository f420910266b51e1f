"""The budget (router) loss: push the router's expected subnet to a fraction of the parent's size.

Expected config = probs . choice values per axis (``Choice.expected_subnet_dims``), depth as each layer's
probability of being kept; its size goes through the exact parameter counter (``pipeline.model.params``),
which is plain arithmetic and therefore differentiable in the expected sizes. Targets:

- ``active``: active parameters per token (routed experts count top-k only) -- the papers' target;
- ``params``: total parameters;
- ``memory``: params x bytes/param + the KV cache of the attention layers + the Mamba conv and SSM state for
  one sequence of ``memory_seq_length`` tokens (+ an optional MoE dispatch buffer), in bytes.

L = |P(cfg) / (b * P_full) - 1|, zero while inside +-dead_zone; for b = 1 add
``full_budget_penalty * (1 - P(cfg) / P_full)`` (>= 0, no dead zone) so the full budget is the parent itself.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from pipeline.config.schema import ElasticConfig, ModelConfig
from pipeline.model.params import Dims, layer_params

TARGETS = ("active", "params", "memory")


def _embedding(d: Dims):
    return d.vocab * d.hidden * (1 if d.tie_embeddings else 2) + d.hidden


def _params(d: Dims, pattern: str, keep: Sequence, active: bool):
    return _embedding(d) + sum(k * layer_params(sym, d.at_layer(i), active=active)
                               for i, (sym, k) in enumerate(zip(pattern, keep)))


def cache_elements(sym: str, d: Dims, seq_length: int):
    """Inference state of one layer for one sequence: K and V of every KV group (attention heads are
    elastic per group, the KV groups are not), or the Mamba conv window and SSM state."""
    if sym == "*":
        return 2 * seq_length * d.query_groups * d.attention_head_dim
    if sym == "M":
        d_inner = d.mamba_heads * d.mamba_head_dim
        conv = (d_inner + 2 * d.mamba_groups * d.mamba_state) * (d.mamba_conv - 1)
        return conv + d_inner * d.mamba_state
    return 0


def memory_bytes(dims: Dims, pattern: str, seq_length: int, dtype_bytes: float, cache_bytes: Optional[float] = None,
                 keep: Optional[Sequence] = None, dispatch_tokens: int = 0):
    """Bytes to serve the model: all parameters x ``dtype_bytes`` + per-sequence KV cache and SSM state x
    ``cache_bytes`` (default ``dtype_bytes``) + a dispatch buffer of ``dispatch_tokens`` x top-k hidden
    vectors when the model has MoE layers. ``keep``: per-layer weights (depth; default all 1)."""
    keep = [1.0] * len(pattern) if keep is None else keep
    cache_bytes = dtype_bytes if cache_bytes is None else cache_bytes
    cache = sum(k * cache_elements(sym, dims.at_layer(i), seq_length)
                for i, (sym, k) in enumerate(zip(pattern, keep)))
    dispatch = dispatch_tokens * dims.topk * dims.hidden if "E" in pattern else 0
    return _params(dims, pattern, keep, active=False) * dtype_bytes + (cache + dispatch) * cache_bytes


def target_size(dims: Dims, m: ModelConfig, elastic: ElasticConfig, keep: Optional[Sequence] = None):
    """The size a budget fraction is a fraction of (``elastic.target``), for dims and per-layer keep weights."""
    keep = [1.0] * m.num_layers if keep is None else keep
    if elastic.target == "memory":
        return memory_bytes(dims, m.pattern, elastic.memory_seq_length, elastic.memory_param_bytes,
                            elastic.memory_cache_bytes, keep, elastic.memory_dispatch_tokens)
    if elastic.target not in TARGETS:
        raise ValueError(f"elastic.target = {elastic.target!r}, expected one of {', '.join(TARGETS)}")
    return _params(dims, m.pattern, keep, active=elastic.target == "active")


def budget_loss(choice, model_cfg: ModelConfig, fraction: float, elastic: ElasticConfig,
                removal_order: Sequence[int] = ()) -> Tuple[torch.Tensor, float]:
    """(loss, expected size) of the router's ``choice`` for a budget of ``fraction`` of the parent."""
    dims = choice.expected_subnet_dims(model_cfg)
    expected = target_size(dims, model_cfg, elastic, choice.expected_keep(model_cfg, removal_order))
    full = float(target_size(Dims.from_model(model_cfg), model_cfg, elastic))
    expected = torch.as_tensor(expected, dtype=torch.float32)
    miss = (expected / (fraction * full) - 1.0).abs()
    loss = torch.where(miss > elastic.dead_zone, miss, torch.zeros_like(miss))
    if fraction >= 1.0:
        loss = loss + elastic.full_budget_penalty * (1.0 - expected / full)
    return loss, float(expected.detach())


def smallest_fraction(model_cfg: ModelConfig, elastic: ElasticConfig) -> float:
    """The smallest fraction of the parent the axes can reach: every routed axis at its smallest choice and,
    for depth, the largest layers removed (a bound: the importance ranking decides which layers go)."""
    from pipeline.elastic.router import routed_axes

    axes = routed_axes(elastic, model_cfg)
    small = Dims.from_model(model_cfg)
    for axis, choices in axes.items():
        if axis != "depth":
            setattr(small, axis, min(choices))
    n = model_cfg.num_layers
    size = lambda keep: float(target_size(small, model_cfg, elastic, keep))  # noqa: E731
    keep = [1.0] * n
    if "depth" in axes:
        gain = [size(keep) - size([float(j != i) for j in range(n)]) for i in range(n)]
        for i in sorted(range(n), key=lambda i: -gain[i])[:n - min(axes["depth"])]:
            keep[i] = 0.0
    return size(keep) / float(target_size(Dims.from_model(model_cfg), model_cfg, elastic))
