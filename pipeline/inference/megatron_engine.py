"""megatron-core as a budget engine: a budget's sliced megatron model in megatron's static inference mode.

The budget is sliced from the elastic checkpoint into a megatron dist checkpoint (``slice_to_megatron``, the
model ``slice --format megatron`` writes) and built as the recipe builds models (TE or local backend). Generation
runs megatron's own inference path: the prompt in one forward that fills its attention KV cache and Mamba conv /
SSM states (``StaticInferenceContext``), then one token per forward from those states, greedy. That is the
model-side work of megatron's text-generation controller without its scheduling; ``bench/bench_budget_inference.py``
(engine ``megatron``) times it against transformers' NemotronH.

megatron-core 0.19's static Mamba decode hands the ``[1, b, d]`` step to its decode kernels as one sequence of b
tokens, which only works at b = 1. Its dynamic path has the right layout (batch first, each row's conv / SSM state
addressed by index); ``BatchedDecodeMambaMixer`` sends a static step through it with row i's state at index i,
so a batch of equal-length prompts decodes together. megatron's dynamic engine itself (paged KV cache, request
scheduling, CUDA graphs) needs CUDA and is not wired here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Tuple

import torch

from pipeline.errors import UserError
from pipeline.model.build import build_model  # first: registers mamba-ssm's import stubs before megatron's mixer

from megatron.core.ssm.mamba_mixer import MambaMixer  # noqa: E402  (isort: after pipeline.model, on purpose)


class BatchedDecodeMambaMixer(MambaMixer):
    """megatron's Mamba mixer whose static-inference decode step takes a batch (see the module docstring)."""

    def _decode(self, hidden_states, conv_state, ssm_state, batch_indices=None):
        if batch_indices is None:
            batch_indices = torch.arange(hidden_states.shape[1], device=hidden_states.device)
        return super()._decode(hidden_states, conv_state, ssm_state, batch_indices)


def inference_stack_spec(base):
    """The recipe's stack spec with ``BatchedDecodeMambaMixer`` as the Mamba mixer (same parameters)."""
    layer = base.submodules.mamba_layer
    mixer = dataclasses.replace(layer.submodules.mixer, module=BatchedDecodeMambaMixer)
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mixer=mixer))
    return dataclasses.replace(base, submodules=dataclasses.replace(base.submodules, mamba_layer=layer))


def load_budget_model(recipe, elastic_dir: str, model_cfg, budget, work_dir: str,
                      dtype: torch.dtype = torch.bfloat16, batched_decode: bool = True) -> torch.nn.Module:
    """The budget's megatron model, sliced into ``work_dir`` and loaded (``batched_decode``: with
    ``BatchedDecodeMambaMixer``). ``pipeline.parallel.initialize`` must have run at TP = PP = EP = 1 (as for
    ``slice_to_megatron``)."""
    from pipeline.elastic.elastic_dir import slice_to_megatron
    from pipeline.training import checkpoint

    slice_to_megatron(recipe, elastic_dir, work_dir, model_cfg, budget, dtype, overwrite=True, progress=False)
    small = dataclasses.replace(recipe, model=budget.subnet.model_config(model_cfg))
    model = build_model(small, dtype, spec_transform=inference_stack_spec if batched_decode else None).eval()
    checkpoint.load(checkpoint.resolve(os.path.join(work_dir, "checkpoints")), [model], load_rng=False)
    return model


def _forward(model, tokens: torch.Tensor, start: int, context) -> torch.Tensor:
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    logits = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)
    context.sequence_len_offset += tokens.shape[1]
    return logits[:, -1]


@torch.no_grad()
def greedy_generate(model, prompt: torch.Tensor, new_tokens: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """(prompts + ``new_tokens`` greedy tokens [b, p + n], the logits that chose each new token, [b, vocab] per
    step) from megatron's static inference: the prompts (equal length) in one forward, then one forward per token
    from the cached states. The model must be built with ``inference_stack_spec`` for b > 1."""
    from megatron.core.inference.contexts.static_context import StaticInferenceContext
    from megatron.core.inference.utils import InferenceMode

    if prompt.dim() != 2:
        raise UserError(f"prompt shape {tuple(prompt.shape)}: expected [batch, tokens] of equal-length prompts")
    device = next(model.parameters()).device
    tokens = prompt.to(device)
    context = StaticInferenceContext(tokens.shape[0], tokens.shape[1] + new_tokens)
    chosen: List[torch.Tensor] = []
    with InferenceMode.active():
        logits = _forward(model, tokens, 0, context)
        for i in range(new_tokens):
            chosen.append(logits)  # kept as computed: no copy on the decode path
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
            if i + 1 < new_tokens:
                logits = _forward(model, tokens[:, -1:], tokens.shape[1] - 1, context)
    return tokens, chosen
