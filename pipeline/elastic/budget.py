"""The budget (router) loss: push the router's expected subnet to a fraction of the parent's size.

Expected config = probs . choice values per axis (``Choice.expected_sizes``), depth as each layer's
probability of being kept; its size goes through the exact parameter counter (``pipeline.model.params``),
which is plain arithmetic and therefore differentiable in the expected sizes. In the step it is evaluated once
per layer KIND on vectors of that kind's per-layer sizes and keep probabilities (``choice_size``: a few dozen
kernels, no host sync) rather than layer by layer. Targets:

- ``active``: active parameters per token (routed experts count top-k only) -- the papers' target;
- ``params``: total parameters;
- ``memory``: params x bytes/param + the KV cache of the attention layers + the Mamba conv and SSM state for
  one sequence of ``memory_seq_length`` tokens (+ an optional MoE dispatch buffer), in bytes.

L = |P(cfg) / (b * P_full) - 1|, zero while inside +-dead_zone; for b = 1 add
``full_budget_penalty * (1 - P(cfg) / P_full)`` (>= 0, no dead zone) so the full budget is the parent itself.
"""

from __future__ import annotations

import dataclasses
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


def choice_size(choice, m: ModelConfig, elastic: ElasticConfig, removal_order: Sequence[int] = ()) -> torch.Tensor:
    """``target_size`` of the router's expected subnet, vectorised over the layers of each kind: each kind's
    per-layer formula runs once on [n_layers_of_kind] vectors (or scalars when homogeneous), weighted by the
    layers' keep probabilities. Equal to ``target_size(choice.expected_subnet_dims(m), m, elastic,
    choice.expected_keep(m, removal_order))``."""
    from pipeline.elastic.router import AXIS_KIND, device_constant

    if elastic.target not in TARGETS:
        raise ValueError(f"elastic.target = {elastic.target!r}, expected one of {', '.join(TARGETS)}")
    expected = choice.expected_sizes()
    some = next(a.probs for a in choice.axes.values())
    like = torch.empty((), device=some.device, dtype=torch.float32)
    keep = choice.expected_keep_vector(m, removal_order)
    base = Dims.from_model(m)
    if "hidden" in expected:
        base = dataclasses.replace(base, hidden=expected["hidden"])
    memory = elastic.target == "memory"
    params = _embedding(base)
    cache = 0
    for sym in sorted(set(m.pattern)):
        layers = [i for i, s in enumerate(m.pattern) if s == sym]
        d = dataclasses.replace(base, **{a: v for a, v in expected.items() if AXIS_KIND.get(a) == sym})
        if keep is None:
            weight = float(len(layers))
            weigh = lambda x: x * weight if not torch.is_tensor(x) or x.dim() == 0 else x.sum()  # noqa: E731
        else:
            idx = device_constant(("layers", m.pattern, sym), lambda: torch.tensor(layers), like).long()
            k = keep.index_select(0, idx)
            weigh = lambda x: (x * k).sum()  # noqa: E731
        params = params + weigh(layer_params(sym, d, active=elastic.target == "active"))
        if memory and sym in "*M":
            cache = cache + weigh(cache_elements(sym, d, elastic.memory_seq_length))
    if not memory:
        return torch.as_tensor(params, dtype=torch.float32, device=like.device)
    dispatch = elastic.memory_dispatch_tokens * base.topk * base.hidden if "E" in m.pattern else 0
    cache_bytes = elastic.memory_param_bytes if elastic.memory_cache_bytes is None else elastic.memory_cache_bytes
    total = params * elastic.memory_param_bytes + (cache + dispatch) * cache_bytes
    return torch.as_tensor(total, dtype=torch.float32, device=like.device)


def budget_loss(choice, model_cfg: ModelConfig, fraction: float, elastic: ElasticConfig,
                removal_order: Sequence[int] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, expected size) of the router's ``choice`` for a budget of ``fraction`` of the parent; both
    tensors on the router's device (the size detached), so the step never waits for them."""
    expected = choice_size(choice, model_cfg, elastic, removal_order)
    full = float(target_size(Dims.from_model(model_cfg), model_cfg, elastic))
    miss = (expected / (fraction * full) - 1.0).abs()
    loss = torch.where(miss > elastic.dead_zone, miss, torch.zeros_like(miss))
    if fraction >= 1.0:
        loss = loss + elastic.full_budget_penalty * (1.0 - expected / full)
    return loss, expected.detach()


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
