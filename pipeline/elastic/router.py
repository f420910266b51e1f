"""The elastic router: budget -> a choice per elastic axis (Gumbel-softmax over the axis' choices).

One small MLP per axis with more than one choice, input = the budget as a one-hot vector (or an
interpolation of neighbouring one-hots for an unseen fraction): ``Linear(n_budgets -> router_hidden) ->
LeakyReLU(0.1) -> Linear(-> n_choices)``, or ``n_choices x n_layers_of_that_type`` in heterogeneous mode for
the layer axes. The logits are multiplied by a scaler ramped 1 -> 10 over training, perturbed by Gumbel noise
from the caller's generator (none: deterministic, for evaluation and export) and softmaxed at temperature
tau = tau0 * decay^step. The router has no model-parallel state: every rank holds an identical copy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config.schema import ElasticConfig, ModelConfig
from pipeline.elastic.subnet import AXES, LAYER_AXES, Subnet
from pipeline.model.params import Dims

# The layer symbol each per-layer axis lives in.
AXIS_KIND = {"attention_heads": "*", "mamba_heads": "M", "ffn": "-", "moe_ffn": "E", "shared_expert_ffn": "E",
             "experts": "E"}


def routed_axes(elastic: ElasticConfig, m: ModelConfig) -> Dict[str, List[int]]:
    """Axis -> its choices, for the axes the router decides (> 1 choice, and the layer kind exists)."""
    out = {}
    for axis in AXES:
        choices = list(getattr(elastic.axes, axis))
        if len(choices) > 1 and (axis not in AXIS_KIND or AXIS_KIND[axis] in m.pattern):
            out[axis] = choices
    return out


def kind_layers(m: ModelConfig, axis: str) -> List[int]:
    """Global indices of the layers an axis applies to (every layer for hidden and depth)."""
    return [i for i, s in enumerate(m.pattern) if axis not in AXIS_KIND or s == AXIS_KIND[axis]]


def budget_vector(fraction: float, elastic: ElasticConfig) -> torch.Tensor:
    """Router input for any fraction: the one-hot of a known budget, else a linear interpolation of the two
    neighbouring budgets' one-hots (clamped at the ends)."""
    fr = [b.fraction for b in elastic.budgets]
    v = torch.zeros(len(fr))
    order = sorted(range(len(fr)), key=lambda i: fr[i])
    if fraction <= fr[order[0]] or fraction >= fr[order[-1]]:
        v[order[0] if fraction <= fr[order[0]] else order[-1]] = 1.0
        return v
    for lo, hi in zip(order, order[1:]):
        if fr[lo] <= fraction <= fr[hi]:
            w = (fraction - fr[lo]) / (fr[hi] - fr[lo])
            v[lo], v[hi] = 1.0 - w, w
            return v
    raise AssertionError("unreachable")


_CONSTANTS: Dict[tuple, torch.Tensor] = {}


def device_constant(key: tuple, build: Callable[[], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A small constant tensor (choice sizes, prefix and keep tables) built once per device and dtype: a fresh
    host-to-device copy from pageable memory in every micro-batch would synchronise the stream."""
    k = (key, like.device, like.dtype)
    if k not in _CONSTANTS:
        _CONSTANTS[k] = build().to(device=like.device, dtype=like.dtype)
    return _CONSTANTS[k]


@dataclass
class AxisChoice:
    sizes: List[int]  # the axis' choices, largest first (depth: layers kept)
    probs: torch.Tensor  # [n_choices], or [n_layers_of_type, n_choices] in heterogeneous mode
    # host copies (numpy) of the detached probs and their argmax, for what must be a host number (a kernel's
    # eps, which layers to skip, logs); filled in one transfer per step by ``fetch_to_host``, else on demand
    host_probs: Optional[np.ndarray] = None
    host_argmax: Optional[np.ndarray] = None

    def sizes_tensor(self) -> torch.Tensor:
        return device_constant(("sizes", tuple(self.sizes)), lambda: torch.tensor(self.sizes), self.probs)

    def host(self):
        """(probs, argmax) as numpy arrays; copies from the device (a sync) unless already fetched."""
        if self.host_probs is None:
            fetch_to_host([self])
        return self.host_probs, self.host_argmax


def fetch_to_host(axes: Sequence[AxisChoice]) -> None:
    """Copy every axis' probabilities and argmax to the host in ONE device-to-host transfer (one sync)."""
    axes = [a for a in axes if a.host_probs is None]
    if not axes:
        return
    parts = []
    for a in axes:
        p = a.probs.detach().float()
        parts += [p.reshape(-1), p.argmax(-1).float().reshape(-1)]
    flat = torch.cat([x.to(parts[0].device) for x in parts]).cpu().double().numpy()
    at = 0
    for a in axes:
        n, rows = a.probs.numel(), a.probs.numel() // a.probs.shape[-1]
        a.host_probs = flat[at:at + n].reshape(tuple(a.probs.shape))
        a.host_argmax = flat[at + n:at + n + rows].astype(np.int64).reshape(tuple(a.probs.shape[:-1]))
        at += n + rows


class Choice:
    """The router's decision for one budget: per axis the choice probabilities, and whether masks are hard.

    Hard: the argmax choice, its mask multiplied by p_max / p_max.detach() -- exactly 1 in value (so masked
    equals sliced bit for bit up to the masked model's own rounding) while its gradient reaches the router.
    Soft: channel i weighted by sum of p_c over the choices c that keep i."""

    def __init__(self, axes: Dict[str, AxisChoice], hard: bool):
        self.axes = axes
        self.hard = hard

    def weights(self, axis: str) -> torch.Tensor:
        """Per-choice weights the masks are built from: the probabilities (soft) or the straight-through
        one-hot of the argmax (hard)."""
        p = self.axes[axis].probs
        if not self.hard:
            return p
        top = p.argmax(-1, keepdim=True)
        p_max = p.gather(-1, top)
        return torch.zeros_like(p).scatter(-1, top, 1.0) * (p_max / p_max.detach())

    def expected_sizes(self) -> Dict[str, torch.Tensor]:
        """Each routed width axis' expected size sum_c p_c k_c: a scalar, or one per layer of the axis' kind in
        heterogeneous mode (differentiable, on the router's device)."""
        return {axis: a.probs @ a.sizes_tensor() for axis, a in self.axes.items() if axis != "depth"}

    def expected_subnet_dims(self, model_cfg: ModelConfig) -> Dims:
        """Dims with each routed width axis at its expected size sum_c p_c k_c (tensors, differentiable);
        per-layer expectations in ``Dims.per_layer`` in heterogeneous mode."""
        d = Dims.from_model(model_cfg)
        for axis, expected in self.expected_sizes().items():
            if expected.dim() == 0:
                d = dataclasses.replace(d, **{axis: expected})
            else:
                for row, layer in enumerate(kind_layers(model_cfg, axis)):
                    d.per_layer.setdefault(layer, {})[axis] = expected[row]
        return d

    def expected_keep(self, model_cfg: ModelConfig, removal_order: Sequence[int]) -> List:
        """Per layer, the probability that it is kept (1.0 without a depth axis)."""
        keep = self.expected_keep_vector(model_cfg, removal_order)
        return [1.0] * model_cfg.num_layers if keep is None else list(keep)

    def expected_keep_vector(self, model_cfg: ModelConfig, removal_order: Sequence[int]) -> Optional[torch.Tensor]:
        """[num_layers] probabilities that each layer is kept; None without a depth axis."""
        if "depth" not in self.axes:
            return None
        a = self.axes["depth"]
        return a.probs @ keep_table_on(model_cfg.num_layers, a.sizes, removal_order, a.probs)

    def fetch_to_host(self) -> None:
        fetch_to_host(list(self.axes.values()))

    def argmax_subnet(self, model_cfg: ModelConfig, removal_order: Sequence[int] = ()) -> Subnet:
        subnet = Subnet.full(model_cfg)
        for axis, size in self.sizes().items():
            if axis == "depth":
                subnet.skip_layers = sorted(removed_layers(model_cfg.num_layers, size, removal_order))
            elif isinstance(size, list) and len(set(size)) > 1:
                for layer, k in zip(kind_layers(model_cfg, axis), size):
                    subnet.per_layer.setdefault(layer, {})[axis] = k
            else:
                setattr(subnet, axis, size[0] if isinstance(size, list) else size)
        return subnet

    def sizes(self) -> Dict[str, Union[int, List[int]]]:
        """The argmax size per axis (a list over the axis' layers in heterogeneous mode), for logs."""
        out = {}
        for axis, a in self.axes.items():
            idx = a.host()[1].tolist()
            out[axis] = [a.sizes[i] for i in idx] if isinstance(idx, list) else a.sizes[idx]
        return out


def removed_layers(num_layers: int, kept: int, removal_order: Sequence[int]) -> List[int]:
    """The layers a depth choice of ``kept`` layers removes: the first num_layers - kept of removal_order."""
    drop = num_layers - kept
    if drop > len(removal_order):
        raise ValueError(f"depth choice {kept} of {num_layers} layers needs a removal order of >= {drop} layers "
                         f"(the importance stage's depth ranking), got {len(removal_order)}")
    return list(removal_order[:drop])


def keep_table(num_layers: int, choices: Sequence[int], removal_order: Sequence[int]) -> torch.Tensor:
    """[n_choices, num_layers]: 1 where choice c keeps the layer."""
    table = torch.ones(len(choices), num_layers)
    for c, kept in enumerate(choices):
        table[c, removed_layers(num_layers, kept, removal_order)] = 0.0
    return table


def keep_table_on(num_layers: int, choices: Sequence[int], removal_order: Sequence[int], like: torch.Tensor):
    """``keep_table`` as a cached constant on ``like``'s device and dtype."""
    key = ("keep", num_layers, tuple(choices), tuple(removal_order))
    return device_constant(key, lambda: keep_table(num_layers, choices, removal_order), like)


class ElasticRouter(nn.Module):
    def __init__(self, elastic: ElasticConfig, model_cfg: ModelConfig):
        super().__init__()
        if not elastic.budgets:
            raise ValueError("the elastic router needs elastic.budgets")
        self.n_budgets = len(elastic.budgets)
        self.choices = routed_axes(elastic, model_cfg)
        self.rows = {a: len(kind_layers(model_cfg, a)) if elastic.heterogeneous and a in LAYER_AXES else 1
                     for a in self.choices}
        self.mlps = nn.ModuleDict({
            axis: nn.Sequential(nn.Linear(self.n_budgets, elastic.router_hidden), nn.LeakyReLU(0.1),
                                nn.Linear(elastic.router_hidden, len(c) * self.rows[axis]))
            for axis, c in self.choices.items()})

    def forward(self, budget: Union[int, torch.Tensor], tau: float, logit_scale: float, hard: bool,
                generator: Optional[torch.Generator] = None) -> Choice:
        """``budget``: an index into elastic.budgets, or a [n_budgets] vector (``budget_vector``)."""
        first = next(self.parameters())
        if isinstance(budget, int):  # built on the device: no host-to-device copy
            x = torch.zeros(self.n_budgets, device=first.device)
            x[budget] = 1.0
        else:
            x = budget.to(device=first.device, dtype=torch.float32)
        axes = {}
        for axis, net in self.mlps.items():
            n = len(self.choices[axis])
            logits = (_mlp_fp32(net, x) * logit_scale).view(self.rows[axis], n)
            if generator is not None:  # Gumbel(0, 1) noise, drawn on the generator's device (the model's: no copy)
                u = torch.rand(logits.shape, generator=generator, device=generator.device, dtype=torch.float64)
                gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-12)))
                logits = logits + gumbel.to(logits)
            probs = torch.softmax(logits / tau, dim=-1)
            axes[axis] = AxisChoice(self.choices[axis], probs[0] if self.rows[axis] == 1 else probs)
        return Choice(axes, hard)


def _mlp_fp32(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The router MLP in fp32 whatever its parameters' dtype (bf16 under megatron's Float16Module, whose
    fp32 master weights live in the optimizer): choice probabilities and the budget loss stay precise."""
    for layer in net:
        x = F.linear(x, layer.weight.float(), layer.bias.float()) if isinstance(layer, nn.Linear) else layer(x)
    return x


def tau_at(step: int, elastic: ElasticConfig) -> float:
    return elastic.tau0 * elastic.tau_decay ** step


def logit_scale_at(step: int, total_steps: int, elastic: ElasticConfig) -> float:
    ramp = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return elastic.logit_scale_start + (elastic.logit_scale_end - elastic.logit_scale_start) * ramp
