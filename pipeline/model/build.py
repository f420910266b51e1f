"""The model provider: recipe -> ``TransformerConfig`` -> megatron-core ``HybridModel``.

Holds no training logic, so importance, elastic, export and tests build the same model. Parallel state must
be initialised first (``pipeline.parallel.initialize``).
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.activations import squared_relu as mcore_squared_relu
from megatron.core.models.hybrid.hybrid_model import HybridModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from pipeline.config.schema import Recipe
from pipeline.errors import UserError
from pipeline.model.spec import get_backend, hybrid_stack_spec, use_te as recipe_uses_te


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


ACTIVATIONS = {"squared_relu": squared_relu, "gelu": F.gelu, "silu": F.silu}


# training.fp8 -> megatron's fp8_recipe (TE recipes: DelayedScaling, Float8CurrentScaling, Float8BlockScaling)
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise", "blockwise": "blockwise"}


def fp8_settings(fp8: str, te: bool) -> dict:
    """TransformerConfig fields for ``training.fp8``: E4M3 forward / E5M2 backward ("hybrid"), TE's recipe."""
    if fp8 == "none":
        return {}
    if not te:
        raise UserError(f"training.fp8 = {fp8} needs the Transformer Engine backend (model.backend: te or auto "
                        "with transformer_engine installed)")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        found = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        raise UserError(f"training.fp8 = {fp8} needs a GPU with FP8 tensor cores (Ada/Hopper or newer); found {found}")
    return {"fp8": "hybrid", "fp8_recipe": FP8_RECIPES[fp8]}


def _te_fused_permute() -> bool:
    if not torch.cuda.is_available():
        return False
    from megatron.core.transformer.moe import moe_utils

    return moe_utils.fused_permute is not None and moe_utils.fused_unpermute is not None


def mamba_mem_eff_available() -> bool:
    """megatron's memory-efficient Mamba path (``mamba_split_conv1d_scan_combined``: conv1d + SSD + gate in one
    autograd function that recomputes instead of storing) needs a GPU, mamba-ssm and causal-conv1d's kernels;
    megatron's mixer module records whether they imported."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.ssm import mamba_mixer

    return mamba_mixer.causal_conv1d_fn is not None and mamba_mixer.mamba_split_conv1d_scan_combined is not None


def mamba_kernels(mem_eff_path: bool) -> str:
    """Which Mamba kernels this process runs, for the run header: mamba-ssm's Triton SSD (+ the fused conv/scan
    path when on) or the plain-PyTorch scan of ``te_kernels`` (CPU, or no mamba-ssm)."""
    from megatron.core.ssm import mamba_mixer

    scan = getattr(mamba_mixer, "mamba_chunk_scan_combined", None)
    if scan is None or scan.__module__.startswith("te_kernels"):
        return "torch"
    return "triton mem-eff" if mem_eff_path and mamba_mem_eff_available() else "triton"


def fused_grouped_mlp(recipe: Recipe, use_te: bool, plain: bool) -> bool:
    """Whether the experts run TE's fused grouped MLP (``model.moe_fused_grouped_mlp``): only in plain models
    (an elastic student's width mask and QAD's quantisers sit on fc1 / fc2, which the fused op bypasses), on
    the TE path, with megatron's supported shape (non-gated squared ReLU, expert TP 1)."""
    m = recipe.model
    return (m.moe_fused_grouped_mlp and plain and use_te and "E" in m.pattern and m.activation == "squared_relu"
            and recipe.parallelism.etp == 1)


def transformer_config(recipe: Recipe, dtype: torch.dtype = torch.float32, use_cpu_init: bool = False,
                       use_te: Optional[bool] = None, fp8: str = "none", plain: bool = True) -> TransformerConfig:
    """``plain``: no elastic masks or quantiser hooks will be attached (see ``fused_grouped_mlp``)."""
    m, p = recipe.model, recipe.parallelism
    has_moe = "E" in m.pattern
    bf16 = dtype == torch.bfloat16
    te = recipe_uses_te(m) if use_te is None else use_te
    quant = fp8_settings(fp8, te)
    fused_mlp = fused_grouped_mlp(recipe, te, plain)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.attention_head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        add_bias_linear=False,
        gated_linear_unit=False,
        # the fused grouped MLP recognises megatron's own squared ReLU (the same formula, torch.compile'd)
        activation_func=mcore_squared_relu if fused_mlp else ACTIVATIONS[m.activation],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        attention_softmax_in_fp32=True,
        # Mamba-2
        mamba_state_dim=m.mamba_state_dim,
        mamba_head_dim=m.mamba_head_dim,
        mamba_num_groups=m.mamba_num_groups,
        mamba_num_heads=m.mamba_num_heads,
        # fused conv1d + SSD where its kernels exist (GPU); else conv1d -> SSD -> gated norm (te_kernels on CPU)
        use_mamba_mem_eff_path=m.mamba_mem_eff_path and mamba_mem_eff_available(),
        # MoE (Nano v3: sigmoid scores, expert bias for selection, normalised top-k x scaling)
        num_moe_experts=m.num_experts if has_moe else None,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size if has_moe else None,
        moe_shared_expert_intermediate_size=(m.moe_shared_expert_ffn_hidden_size or None) if has_moe else None,
        moe_router_topk=m.moe_topk,
        moe_router_score_function=m.moe_score_function,
        moe_router_enable_expert_bias=m.moe_expert_bias and has_moe,
        moe_router_bias_update_rate=m.moe_expert_bias_update_rate,
        moe_router_topk_scaling_factor=m.moe_topk_scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_token_dispatcher_type=p.moe_token_dispatcher,
        moe_grouped_gemm=te and has_moe,
        # TE's fused token permute / unpermute (fewer small kernels per MoE layer) where it imports
        moe_permute_fusion=te and has_moe and _te_fused_permute(),
        # TE's fused grouped MLP (op fuser: fc1 + weighted squared ReLU + fc2) where fused_grouped_mlp allows it
        use_transformer_engine_op_fuser=fused_mlp,
        use_fused_weighted_squared_relu=fused_mlp,
        # FP8 grouped GEMMs need every expert's token count padded to a multiple of 16
        moe_router_padding_for_quantization=bool(quant) and has_moe,
        # parallelism
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
        context_parallel_size=p.cp,
        sequence_parallel=p.tp > 1 and p.sequence_parallel,
        **recompute_settings(p),
        # precision
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        **quant,
        # megatron's fused vocab-parallel cross entropy (its 'native' form: TE's has known stability issues)
        cross_entropy_loss_fusion=te and torch.cuda.is_available(),
        cross_entropy_fusion_impl="native",
        # kernels that need apex / TE stay off without them
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        # megatron's local linears (the output layer) need apex for it; TE's get it in build_model
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=use_cpu_init,
    )


def recompute_settings(p) -> dict:
    """``parallelism.recompute`` -> megatron's recompute fields: full = every layer (uniform, 1 layer per
    unit); selective = megatron's ``recompute_modules`` (ours, ``mamba``, is applied by model/recompute.py)."""
    if p.recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if p.recompute == "selective":
        mods = [x for x in p.recompute_modules if x != "mamba"]
        return {"recompute_granularity": "selective" if mods else None, "recompute_modules": mods}
    return {}


def pipeline_pattern(pattern: str, pp: int, pp_layers: List[int]) -> str:
    """Insert '|' stage boundaries (megatron's explicit PP layout); balanced when pp_layers is empty."""
    if pp == 1:
        return pattern
    if not pp_layers:
        base, extra = divmod(len(pattern), pp)
        pp_layers = [base + (1 if i < extra else 0) for i in range(pp)]
    out, start = [], 0
    for n in pp_layers:
        out.append(pattern[start:start + n])
        start += n
    return "|".join(out)


SpecTransform = Callable[[ModuleSpec], ModuleSpec]


def hybrid_model(recipe: Recipe, config: TransformerConfig, use_te: bool, pre_process: bool,
                 post_process: bool, spec_transform: Optional[SpecTransform] = None) -> HybridModel:
    """The HybridModel for this recipe and config (no device placement; import builds it on meta).
    ``spec_transform`` derives another stack spec from the base one (the elastic model's nested masks:
    ``pipeline.elastic.masks.build_elastic_model``)."""
    m, p = recipe.model, recipe.parallelism
    spec = hybrid_stack_spec(get_backend(use_te), m.num_experts, m.mamba_conv_kernel, m.mamba_chunk_size)
    if spec_transform is not None:
        spec = spec_transform(spec)
    return HybridModel(
        config=config,
        hybrid_stack_spec=spec,
        vocab_size=m.vocab_size,
        max_sequence_length=m.max_sequence_length,
        hybrid_layer_pattern=pipeline_pattern(m.pattern, p.pp, p.pp_layers),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="none",
    )


def build_model(recipe: Recipe, dtype: torch.dtype = torch.float32, pre_process=None, post_process=None,
                use_te: Optional[bool] = None, spec_transform: Optional[SpecTransform] = None,
                fp8: str = "none", trainable: bool = False) -> HybridModel:
    """This rank's model chunk. ``use_te`` None = ``model.backend``; ``fp8``: a ``training.fp8`` recipe name;
    ``trainable``: it will be wrapped in megatron DDP and trained (see ``transformer_config``)."""
    use_te = recipe_uses_te(recipe.model) if use_te is None else use_te
    cpu = not torch.cuda.is_available()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    if recipe.parallelism.cp > 1 and "*" in recipe.model.pattern and not use_te:
        raise UserError(f"parallelism.cp = {recipe.parallelism.cp} with attention layers needs Transformer Engine "
                        f"(model.backend = {recipe.model.backend} resolved to megatron's local attention, which has "
                        "no context parallelism)")
    config = transformer_config(recipe, dtype, use_cpu_init=cpu, use_te=use_te, fp8=fp8,
                                plain=spec_transform is None)
    model = hybrid_model(recipe, config, use_te, pre_process, post_process, spec_transform=spec_transform)
    if recipe.parallelism.recompute == "selective" and "mamba" in recipe.parallelism.recompute_modules:
        from pipeline.model.recompute import recompute_mamba_mixers

        recompute_mamba_mixers(model)
    if not cpu:
        model.cuda()
        if use_te and trainable:
            fuse_te_wgrad_accumulation(model)
    return model


def fuse_te_wgrad_accumulation(model: torch.nn.Module) -> int:
    """Gradient-accumulation fusion for the TE modules: their weight-gradient GEMMs accumulate straight into
    megatron DDP's fp32 ``main_grad`` (no bf16 grad tensor, no separate add). It is what
    ``TransformerConfig.gradient_accumulation_fusion`` passes to TE, set per module here because the same flag
    would also switch megatron's local output layer to apex's kernel (not installed). Returns the modules set."""
    n = 0
    for module in model.modules():
        te_class = any(c.__module__.startswith("transformer_engine") for c in type(module).__mro__)
        if te_class and hasattr(module, "fuse_wgrad_accumulation"):
            module.fuse_wgrad_accumulation = True
            n += 1
    return n
