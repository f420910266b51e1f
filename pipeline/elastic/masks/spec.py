"""The elastic classes ``pipeline.model.spec.hybrid_stack_spec(..., elastic=True)`` puts into the ModuleSpecs."""

from __future__ import annotations

import dataclasses
from functools import partial
from types import SimpleNamespace

from pipeline.elastic.masks import modules


def elastic_moe(moe_spec: partial) -> partial:
    """megatron's MoE spec (``partial(MoELayer, submodules=MoESubmodules(...))``) with the masked router and
    input-masked fc2 in the routed experts and the shared expert (both backends' expert modules)."""
    subs = moe_spec.keywords["submodules"]
    experts = subs.experts  # partial(SequentialMLP | TEGroupedMLP, submodules=...)
    expert_subs = experts.keywords["submodules"]
    experts = partial(experts.func, *experts.args, **{**experts.keywords, "submodules": dataclasses.replace(
        expert_subs, linear_fc2=modules.input_masked(expert_subs.linear_fc2))})
    shared = subs.shared_experts
    if shared is not None:
        shared_subs = shared.keywords["submodules"]
        shared = partial(shared.func, *shared.args, **{**shared.keywords, "submodules": dataclasses.replace(
            shared_subs, linear_fc2=modules.input_masked(shared_subs.linear_fc2))})
    subs = dataclasses.replace(subs, experts=experts, shared_experts=shared, router=modules.ElasticTopKRouter)
    return partial(moe_spec.func, *moe_spec.args, **{**moe_spec.keywords, "submodules": subs})


def elastic_classes() -> SimpleNamespace:
    return SimpleNamespace(
        norm=modules.ElasticRMSNorm,
        input_masked=modules.input_masked,
        bda=modules.ElasticBiasDropoutAdd,
        mamba_layer=modules.ElasticMambaLayer,
        mamba_mixer=modules.ElasticMambaMixer,
        attention_layer=modules.ElasticTransformerLayer,
        mlp_layer=modules.ElasticMLPLayer,
        moe_layer=modules.ElasticMoETransformerLayer,
        moe=elastic_moe,
    )
