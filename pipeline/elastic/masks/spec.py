"""The elastic model's spec, derived from the base hybrid stack spec (``pipeline.model.spec``) of either backend.

Same modules, same parameters and checkpoint keys; each module that applies a mask is swapped for an elastic
subclass (``modules.py``): layers (depth skipping), residual adds (hidden mask on the output delta), the
residual-stream norms (hidden mask in the statistics; with TE the fused norm + linear stays fused, with the mask
folded into its eps and output scale), linear_proj / fc2 (heads and FFN channels on their input), the Mamba
gated norm (heads per group) and the MoE router (experts). Nothing in ``pipeline.model`` knows about elastic.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from pipeline.elastic.masks import modules
from pipeline.model.build import build_model


def _replace(spec: ModuleSpec, module=None, **submodules) -> ModuleSpec:
    subs = dataclasses.replace(spec.submodules, **submodules) if submodules else spec.submodules
    return dataclasses.replace(spec, module=module or spec.module, submodules=subs)


def _pre_norm(norm, linear):
    """(norm, first linear) of a layer: the norm masked, or the fused norm + linear eps-scaled."""
    if norm is IdentityOp:  # TE: the norm lives in the next linear
        return IdentityOp, modules.eps_scaled(linear)
    return modules.elastic_norm(norm), linear


def _with_submodules(fn: partial, **changes) -> partial:
    """A ``partial(cls, submodules=...)`` spec with some submodules replaced."""
    subs = dataclasses.replace(fn.keywords["submodules"], **changes)
    return partial(fn.func, *fn.args, **{**fn.keywords, "submodules": subs})


def elastic_moe(moe_spec: partial) -> partial:
    """megatron's MoE spec (``partial(MoELayer, submodules=MoESubmodules(...))``) with the masked router and
    input-masked fc2 in the routed experts and the shared expert (both backends' expert modules)."""
    subs = moe_spec.keywords["submodules"]
    experts = subs.experts  # partial(SequentialMLP | TEGroupedMLP, submodules=...)
    fc2 = experts.keywords["submodules"].linear_fc2
    experts = _with_submodules(experts, linear_fc2=modules.input_masked(fc2))
    shared = subs.shared_experts
    if shared is not None:
        shared = _with_submodules(shared, linear_fc2=modules.input_masked(shared.keywords["submodules"].linear_fc2))
    return _with_submodules(moe_spec, experts=experts, shared_experts=shared, router=modules.ElasticTopKRouter)


def _mamba(spec: ModuleSpec) -> ModuleSpec:
    s = spec.submodules
    norm, in_proj = _pre_norm(s.norm, s.mixer.submodules.in_proj)
    mixer = _replace(s.mixer, module=modules.ElasticMambaMixer, in_proj=in_proj)
    return _replace(spec, module=modules.ElasticMambaLayer, norm=norm, mixer=mixer,
                    mamba_bda=ModuleSpec(module=modules.ElasticBiasDropoutAdd))


def _attention(spec: ModuleSpec) -> ModuleSpec:
    s = spec.submodules
    attn = s.self_attention.submodules
    norm, qkv = _pre_norm(s.input_layernorm, attn.linear_qkv)
    self_attention = _replace(s.self_attention, linear_qkv=qkv, linear_proj=modules.input_masked(attn.linear_proj))
    return _replace(spec, module=modules.ElasticTransformerLayer, input_layernorm=norm,
                    self_attention=self_attention, self_attn_bda=ModuleSpec(module=modules.ElasticBiasDropoutAdd))


def _mlp(spec: ModuleSpec) -> ModuleSpec:
    s = spec.submodules
    mlp_subs = s.mlp.keywords["submodules"]
    norm, fc1 = _pre_norm(s.pre_mlp_layernorm, mlp_subs.linear_fc1)
    mlp = _with_submodules(s.mlp, linear_fc1=fc1, linear_fc2=modules.input_masked(mlp_subs.linear_fc2))
    return _replace(spec, module=modules.ElasticMLPLayer, pre_mlp_layernorm=norm, mlp=mlp,
                    mlp_bda=ModuleSpec(module=modules.ElasticBiasDropoutAdd))


def _moe(spec: ModuleSpec) -> ModuleSpec:
    s = spec.submodules
    return _replace(spec, module=modules.ElasticMoETransformerLayer,
                    pre_mlp_layernorm=modules.elastic_norm(s.pre_mlp_layernorm), mlp=elastic_moe(s.mlp),
                    mlp_bda=ModuleSpec(module=modules.ElasticBiasDropoutAdd))


def elastic_stack_spec(base: ModuleSpec) -> ModuleSpec:
    """The nested-mask form of ``pipeline.model.spec.hybrid_stack_spec`` (either backend)."""
    s = base.submodules
    return _replace(base, mamba_layer=_mamba(s.mamba_layer), attention_layer=_attention(s.attention_layer),
                    mlp_layer=_mlp(s.mlp_layer), moe_layer=_moe(s.moe_layer),
                    final_norm=modules.elastic_norm(s.final_norm))


def build_elastic_model(recipe, dtype: torch.dtype = torch.float32, **kwargs):
    """``pipeline.model.build.build_model`` with nested-mask submodules: the parent's function while no mask is
    set (``ElasticMasks``), and a parent checkpoint loads unchanged."""
    return build_model(recipe, dtype, spec_transform=elastic_stack_spec, **kwargs)
