"""Where things live in one pipeline stage of the megatron-core HybridModel, for hooks and permutation.

Layers are addressed by their global index (``layer_number - 1``), so every pipeline stage handles exactly
its own layers; the layer kind comes from the recipe's pattern (M Mamba-2, * attention, - MLP, E MoE).
"""

from __future__ import annotations

from typing import List, NamedTuple

import torch

from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from pipeline.config.schema import Recipe


class Layer(NamedTuple):
    index: int  # global layer index (0-based)
    kind: str  # pattern symbol
    module: torch.nn.Module


def stack_layers(model: torch.nn.Module, pattern: str) -> List[Layer]:
    """This stage's layers with their global index and kind."""
    layers = []
    for layer in unwrap_model(model).decoder.layers:
        i = layer.layer_number - 1
        layers.append(Layer(i, pattern[i], layer))
    return layers


def scoring_model(recipe: Recipe, dtype: torch.dtype) -> torch.nn.Module:
    """The parent built from megatron's local layers, whatever the machine has: the hooks need the
    residual-stream norms as modules (Transformer Engine fuses them into the next linear) and sequential
    experts; checkpoints do not depend on the backend. bf16 follows the Trainer (``Float16Module``)."""
    from megatron.core.transformer.module import Float16Module

    from pipeline.model.build import hybrid_model, transformer_config

    cpu = not torch.cuda.is_available()
    config = transformer_config(recipe, dtype, use_cpu_init=cpu, use_te=False)
    config.moe_grouped_gemm = False  # sequential experts: one module per expert to hook
    model = hybrid_model(recipe, config, use_te=False, pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage())
    if not cpu:
        model.cuda()
    if dtype == torch.bfloat16:
        model = Float16Module(model.config, model)
    return model.eval()
