"""megatron-core as a budget engine: a budget's sliced megatron model in megatron's static inference mode.

The budget is sliced from the elastic checkpoint into a megatron dist checkpoint (``slice_to_megatron``, the
model ``slice --format megatron`` writes) and built as the recipe builds models (TE or local backend). Generation
runs megatron's own inference path: the prompt in one forward that fills its attention KV cache and Mamba conv /
SSM states (``StaticInferenceContext``), then one token per forward from those states, greedy. That is the
model-side work of megatron's text-generation controller without its scheduling; ``bench/bench_budget_inference.py``
(engine ``megatron``) times it against transformers' NemotronH.

megatron-core 0.19's static Mamba decode takes one sequence at a time (its mixer reads the ``[1, b, d]`` decode
input as one sequence of b tokens), so this engine runs batch 1; megatron's dynamic engine (paged KV cache,
batched Mamba states, CUDA graphs) needs CUDA and is not wired here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Tuple

import torch

from pipeline.errors import UserError


def load_budget_model(recipe, elastic_dir: str, model_cfg, budget, work_dir: str,
                      dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The budget's megatron model, sliced into ``work_dir`` and loaded. ``pipeline.parallel.initialize`` must have
    run at TP = PP = EP = 1 (as for ``slice_to_megatron``)."""
    from pipeline.elastic.elastic_dir import slice_to_megatron
    from pipeline.model.build import build_model
    from pipeline.training import checkpoint

    slice_to_megatron(recipe, elastic_dir, work_dir, model_cfg, budget, dtype, overwrite=True, progress=False)
    small = dataclasses.replace(recipe, model=budget.subnet.model_config(model_cfg))
    model = build_model(small, dtype).eval()
    checkpoint.load(checkpoint.resolve(os.path.join(work_dir, "checkpoints")), [model], load_rng=False)
    return model


def _forward(model, tokens: torch.Tensor, start: int, context) -> torch.Tensor:
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).unsqueeze(0)
    logits = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
    context.sequence_len_offset += tokens.shape[1]
    return logits[:, -1]


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, new_tokens: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(prompt + ``new_tokens`` greedy tokens [1, p + n], the logits that chose each new token [1, vocab]) from
    megatron's static inference: the prompt in one forward, then one forward per token from the cached states."""
    from megatron.core.inference.contexts.static_context import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    if prompt.dim() != 2 or prompt.shape[0] != 1:
        raise UserError(f"the megatron engine decodes one sequence at a time (prompt shape {tuple(prompt.shape)}): "
                        "megatron-core's static Mamba decode has no batch dimension")
    device = next(model.parameters()).device
    tokens = prompt.to(device)
    context = StaticInferenceContext(1, tokens.shape[1] + new_tokens)
    chosen: List[torch.Tensor] = []
    with InferenceMode.active():
        logits = _forward(model, tokens, 0, context)
        for i in range(new_tokens):
            chosen.append(logits.float())
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
            if i + 1 < new_tokens:
                logits = _forward(model, tokens[:, -1:], tokens.shape[1] - 1, context)
    return tokens, chosen
