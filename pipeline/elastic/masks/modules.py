"""Elastic submodules of the hybrid stack spec (``spec.elastic_stack_spec``).

Each one carries the mask it applies as a plain attribute, ``None`` meaning the parent's computation
(bit-exact, the same code path); none adds a parameter, buffer or state-dict entry, so a parent checkpoint
loads unchanged. ``ElasticMasks`` sets the attributes. Masks are channel weights in [0, 1]: {0, s} for a
hard choice (s = 1 exactly, see ``router.Choice``), a mixture of prefix masks for a soft one.
"""

from __future__ import annotations

import functools
import math

import torch

import pipeline.model  # noqa: F401  first: registers the mamba-ssm stub before megatron's Mamba mixer imports it
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_layer import MambaLayer
from megatron.core.ssm.mamba_mixer import MambaMixer
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer
from megatron.core.utils import get_pg_rank, get_pg_size

from pipeline.elastic.masks.saving import masked_input, scaled
from pipeline.model.norm import RMSNorm


def local_shard(full: torch.Tensor, group) -> torch.Tensor:
    """This rank's contiguous shard of a mask over a dimension partitioned across ``group`` (None: unsharded)."""
    size = get_pg_size(group) if group is not None else 1
    return full.view(size, -1)[get_pg_rank(group)] if size > 1 else full


def masked_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, mask: torch.Tensor,
                    count: torch.Tensor = None) -> torch.Tensor:
    """RMSNorm of a residual stream that is zero where ``mask`` is: the mean square is taken over the active
    channels (sum / sum(mask)), so it equals the RMSNorm of the sliced k-channel vector. Equivalently
    rms_full(x; eps * k/d) * sqrt(d/k) (the form ``EpsScaledNorm`` uses for kernels that take eps as a number)."""
    xf = x.float()
    count = mask.float().sum() if count is None else count
    y = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / count + eps)
    return (y * weight.float()).to(x.dtype)


class ElasticRMSNorm(RMSNorm):
    """The local backend's residual-stream RMSNorm (pre-norms, final norm); ``elastic_mask`` = hidden channel
    weights. The statistic is taken over the active channels exactly (the router's gradient included)."""

    elastic_mask = None
    elastic_count = None  # sum(mask) as a tensor, computed once for every norm of the model (ElasticMasks)

    def set_hidden_mask(self, mask, active: float = 0.0, count=None) -> None:
        self.elastic_mask, self.elastic_count = mask, count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.elastic_mask is None:
            return super().forward(x)
        return masked_rms_norm(x, self.weight, self.eps, self.elastic_mask, self.elastic_count)


class EpsScaledNorm:
    """A hidden mask folded into a norm kernel that takes eps as a number: Transformer Engine's RMSNorm and its
    fused norm + linear (``TELayerNormColumnParallelLinear``), which stay fused. With the stream zero beyond
    k = ``active`` of d channels, RMSNorm_k(x) = sqrt(k/d) * RMSNorm_d(x; eps * k/d), and the linear after the
    norm commutes with the scalar, so the module runs unchanged at eps * k/d and its output is scaled by
    sqrt(sum(mask)/d). The router's gradient reaches the mask through that scale (the eps term's share,
    eps / mean(x^2) ~ 1e-5, is not differentiated: eps is a host number in the kernel)."""

    elastic_mask = None
    elastic_active = 0.0
    elastic_count = None  # sum(mask) as a tensor, computed once for every norm of the model (ElasticMasks)

    def set_hidden_mask(self, mask, active: float = 0.0, count=None) -> None:
        self.elastic_mask, self.elastic_active, self.elastic_count = mask, float(active), count

    def forward(self, x, *args, **kwargs):
        mask = self.elastic_mask
        if mask is None:
            return super().forward(x, *args, **kwargs)
        d = mask.numel()
        eps = self.eps
        self.eps = eps * self.elastic_active / d
        try:
            out = super().forward(x, *args, **kwargs)
        finally:
            self.eps = eps
        scale = torch.sqrt((mask.float().sum() if self.elastic_count is None else self.elastic_count) / d)
        if isinstance(out, tuple):  # megatron's linears return (output, bias)
            y, bias = out
            return scaled(y, scale), None if bias is None else bias * scale.to(bias.dtype)
        return scaled(out, scale)


@functools.lru_cache(maxsize=None)
def eps_scaled(cls: type) -> type:
    """``EpsScaledNorm`` over a norm or fused norm + linear class (TE's)."""
    return type(f"Elastic{cls.__name__}", (EpsScaledNorm, cls), {"__module__": __name__})


def elastic_norm(norm_cls):
    """The hidden-masked form of a backend's residual-stream norm. Our RMSNorm has an exact masked form; other
    norms (TENorm, a factory that returns ``te.pytorch.RMSNorm``) get the eps-scaled form by a class swap of the
    built module: same parameters, same state dict."""
    if isinstance(norm_cls, type) and issubclass(norm_cls, RMSNorm):
        return ElasticRMSNorm

    def build(*args, **kwargs):
        module = norm_cls(*args, **kwargs)
        module.__class__ = eps_scaled(type(module))
        return module

    return build


class InputMasked:
    """Row-parallel linear whose input features are weighted: attention heads (linear_proj) and FFN channels
    (fc2 of dense MLPs, routed and shared experts). Masking fc2's input rather than fc1's output is the
    same for a hard mask (act(0) = 0) and keeps a soft mask linear: the FFN output is the p-weighted mix of
    the prefix-width FFNs."""

    elastic_mask = None  # this rank's shard of the input-feature weights

    def set_elastic_mask(self, full, group=None) -> None:
        """``group``: the group the input features are partitioned over, from megatron's parallel state (TP for
        attention / dense / shared-expert linears, expert-TP for routed experts): never the module's own
        ``tp_group``, which TE leaves None for grouped expert linears."""
        self.elastic_mask = None if full is None else local_shard(full, group)

    def forward(self, x, *args, **kwargs):
        if self.elastic_mask is None:
            return super().forward(x, *args, **kwargs)
        with masked_input(x, self.elastic_mask.to(x.dtype)) as masked:  # the linear keeps x, not a masked copy
            return super().forward(masked, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def input_masked(linear_cls: type) -> type:
    """``InputMasked`` over a backend's row-parallel linear (local RowParallelLinear or TE's)."""
    return type(f"Elastic{linear_cls.__name__}", (InputMasked, linear_cls), {"__module__": __name__})


class GroupMaskedGatedNorm:
    """The Mamba mixer's gated, per-group RMSNorm with heads masked by a per-group prefix. Every group keeps
    the same share r of its channels, so the norm over a whole group with eps * r, times sqrt(r), is the
    norm over the kept channels: the kernel (mamba-ssm Triton or te_kernels' PyTorch) is reused as is."""

    elastic_mask = None  # this rank's channel weights over d_inner
    elastic_share = 1.0  # r as a float (host side; the kernel takes eps as a number)

    def set_elastic_mask(self, full, share: float = 1.0, group=None) -> None:
        self.elastic_mask = None if full is None else local_shard(full, group)
        self.elastic_share = share

    def forward(self, x, z=None):
        mask = self.elastic_mask
        if mask is None:
            return super().forward(x, z)
        eps = self.eps
        self.eps = eps * self.elastic_share
        try:
            with masked_input(x, mask.to(x.dtype)) as masked:  # the norm kernel keeps x, not a masked copy
                y = super().forward(masked, z)
        finally:
            self.eps = eps
        share = mask.float().sum() / mask.numel()  # = elastic_share, as a tensor: the router's gradient path
        return scaled(y, torch.sqrt(share))


@functools.lru_cache(maxsize=None)
def _gated_norm_class(norm_cls: type) -> type:
    return type(f"Elastic{norm_cls.__name__}", (GroupMaskedGatedNorm, norm_cls), {"__module__": __name__})


class ElasticMambaMixer(MambaMixer):
    """MambaMixer whose gated norm accepts a head mask. The norm is built inside MambaMixer (no spec seam),
    so its class is swapped for a subclass that only adds the mask: same parameters, same state dict."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.rmsnorm:
            self.norm.__class__ = _gated_norm_class(type(self.norm))


class ElasticBiasDropoutAdd:
    """The layer's residual add with its output delta weighted by ``elastic_mask`` (hidden channel weights
    times the layer's depth weight): the residual stream stays exactly zero beyond the kept width, and a
    soft mask stays one factor on every term of the stream."""

    def __init__(self):
        self.elastic_mask = None

    def __call__(self, training: bool, fused: bool):
        add = get_bias_dropout_add(training, fused)
        mask = self.elastic_mask
        if mask is None:
            return add

        def masked_add(x_with_bias, residual, prob):
            x, bias = x_with_bias
            m = mask.to(x.dtype)
            return add((x * m, None if bias is None else bias * m), residual, prob)

        return masked_add


class ElasticTopKRouter(TopKRouter):
    """TopKRouter with an expert mask. Masked experts (weight 0) are removed from the selection itself
    (their selection score is -inf), not by zeroing their bias: with sigmoid scores and a negative expert
    bias a masked expert with bias 0 could otherwise win a top-k slot. Selected experts' combine weights are
    multiplied by their mask weight (exactly 1 for a hard choice). Same arithmetic as megatron's unfused
    ``topk_routing_with_score_function`` on the kept experts, so it equals the sliced router."""

    elastic_mask = None  # [num_experts] weights; the router is replicated, so global (EP-independent)

    def routing(self, logits: torch.Tensor, padding_mask=None):
        if self.elastic_mask is None:
            return super().routing(logits, padding_mask=padding_mask)
        cfg = self.config
        if self.routing_type not in ("none", "aux_loss") or cfg.moe_expert_capacity_factor is not None \
                or cfg.moe_router_group_topk or (self.training and self.is_aux_loss_enabled()):
            raise ValueError("elastic experts need plain top-k routing without token dropping, group-limited "
                             "top-k or a load-balancing loss (set model.moe_aux_loss_coeff = 0)")
        logits = logits.view(-1, cfg.num_moe_experts)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)
        drop = self.elastic_mask <= 0  # masked_fill with a number: no host-to-device copy of -inf
        if self.score_function == "softmax":
            if cfg.moe_router_pre_softmax:
                scores = torch.softmax(logits.float().masked_fill(drop, -math.inf), dim=-1)
                probs, top = torch.topk(scores, self.topk, dim=1)
            else:
                picked, top = torch.topk(logits.masked_fill(drop, -math.inf), self.topk, dim=1)
                probs = torch.softmax(picked, dim=-1, dtype=torch.float32)
        else:
            scores = torch.sigmoid(logits.float())
            select = scores if self.expert_bias is None else scores + self.expert_bias.float()
            _, top = torch.topk(select.masked_fill(drop, -math.inf), self.topk, dim=1)
            probs = torch.gather(scores, 1, top)
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20) if self.topk > 1 else probs
        if cfg.moe_router_topk_scaling_factor:
            probs = probs * cfg.moe_router_topk_scaling_factor
        probs = (probs * self.elastic_mask.float()[top]).type_as(logits)
        routing_probs = torch.zeros_like(logits).scatter(1, top, probs)
        routing_map = torch.zeros_like(logits, dtype=torch.int).scatter(1, top, 1).bool()
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return routing_probs, routing_map


class SkippableLayer:
    """Depth: a skipped layer returns its input and computes nothing (``elastic_skip`` is set per layer by
    its own global ``layer_number``, so it is right on every pipeline stage)."""

    elastic_skip = False

    def forward(self, *args, **kwargs):
        if self.elastic_skip:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            return (hidden, None) if isinstance(self, TransformerLayer) else hidden
        return super().forward(*args, **kwargs)


class ElasticMambaLayer(SkippableLayer, MambaLayer):
    pass


class ElasticTransformerLayer(SkippableLayer, TransformerLayer):
    pass


class ElasticMLPLayer(SkippableLayer, MLPLayer):
    pass


class ElasticMoETransformerLayer(SkippableLayer, MoETransformerLayer):
    pass
