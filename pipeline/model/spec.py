"""ModuleSpecs of the Nemotron-H hybrid stack, built from a megatron-core ``BackendSpecProvider``.

Two backends, one spec function: Transformer Engine (``TESpecProvider``: fused norm+linear, TE attention,
grouped-GEMM experts) or the local backend (megatron's ``LocalSpecProvider`` with our sequence-parallel-capable
``RMSNorm``), chosen by ``model.backend`` (auto = TE when ``transformer_engine`` imports). 0.19.x hard-wires the hybrid stack's
final norm to ``TENorm``; ``HybridStack`` below takes it from the spec instead.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.models.hybrid.hybrid_block import HybridStack as _McoreHybridStack
from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import MoETransformerLayer, TransformerLayer
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from pipeline.errors import UserError
from pipeline.model.norm import RMSNorm


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def use_te(model_cfg) -> bool:
    """``model.backend``: te | local | auto (TE when ``transformer_engine`` imports)."""
    backend = getattr(model_cfg, "backend", "auto")
    if backend == "te" and not te_available():
        raise UserError("model.backend = te but transformer_engine is not importable (install transformer-engine, "
                        "or use model.backend: local)")
    return backend == "te" or (backend == "auto" and te_available())


class LocalBackend(LocalSpecProvider):
    """megatron's local layers, with an RMSNorm that supports sequence parallelism."""

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False):
        return RMSNorm


def get_backend(use_te: bool) -> BackendSpecProvider:
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalBackend()


@dataclass
class HybridStackSpecSubmodules(HybridStackSubmodules):
    final_norm: type = IdentityOp


class HybridStack(_McoreHybridStack):
    """megatron-core's HybridStack with the final norm taken from the spec (not hard-wired TENorm)."""

    def __init__(self, config, submodules: HybridStackSpecSubmodules, *args, post_layer_norm=True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = submodules.final_norm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )


def hybrid_stack_spec(backend: BackendSpecProvider, num_experts: int, d_conv: int, chunk_size: int) -> ModuleSpec:
    """The stack spec for layer symbols M (Mamba-2), * (attention), E (MoE), - (dense MLP).

    With TE the pre-norms of Mamba, attention and dense MLP layers fuse into the next linear
    (``TELayerNormColumnParallelLinear``); the local backend keeps a separate norm whose checkpoint key is mapped
    to the fused name, so both backends read and write the same dist-checkpoint keys. The elastic model derives
    its spec from this one (``pipeline.elastic.masks.spec.elastic_stack_spec``)."""
    norm = backend.layer_norm(rms_norm=True)
    fused = backend.fuse_layernorm_and_linear()
    col, row = backend.column_parallel_linear(), backend.row_parallel_linear()
    in_col = backend.column_parallel_layer_norm_linear() if fused else col

    mamba_layer = ModuleSpec(
        module=MambaLayer,
        submodules=MambaLayerSubmodules(
            norm=IdentityOp if fused else norm,
            mixer=ModuleSpec(
                module=MambaMixer,
                params={"d_conv": d_conv, "chunk_size": chunk_size},
                submodules=MambaMixerSubmodules(in_proj=in_col, out_proj=row),
            ),
            mamba_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused else {"norm.": "mixer.in_proj.layer_norm_"},
        ),
    )
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp if fused else norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=in_col, core_attention=backend.core_attention(), linear_proj=row,
                    q_layernorm=IdentityOp, k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused else {
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_"},
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=IdentityOp if fused else norm,
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=in_col, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={} if fused else {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )
    # TE: grouped-GEMM experts (megatron's local backend has only sequential experts; same checkpoint keys)
    grouped = not isinstance(backend, LocalSpecProvider)
    moe = get_moe_module_spec_for_backend(backend, num_experts=num_experts, moe_grouped_gemm=grouped)
    moe_layer = ModuleSpec(
        module=MoETransformerLayer,
        submodules=TransformerLayerSubmodules(pre_mlp_layernorm=norm, mlp=moe, mlp_bda=get_bias_dropout_add),
    )
    return ModuleSpec(
        module=HybridStack,
        submodules=HybridStackSpecSubmodules(
            mamba_layer=mamba_layer, attention_layer=attention_layer, mlp_layer=mlp_layer,
            moe_layer=moe_layer, final_norm=norm,
        ),
    )
