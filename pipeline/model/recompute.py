"""Selective recompute of the Mamba mixers (``parallelism.recompute_modules: [mamba]``).

megatron-core's selective recompute covers attention, MoE, MLPs and norms but not Mamba; this wraps each
Mamba mixer's training forward in megatron's ``tensor_parallel.checkpoint`` (RNG states restored on
recompute), keeping only the mixer's input: its in_proj output, conv, SSD scan and gated norm are recomputed
in the backward. Inference and no-grad forwards run unwrapped.
"""

from __future__ import annotations

import torch

from megatron.core import tensor_parallel
from megatron.core.ssm.mamba_mixer import MambaMixer


def _checkpointed(mixer: MambaMixer, forward):
    def run(hidden_states, *args, **kwargs):
        if not (mixer.training and torch.is_grad_enabled()):
            return forward(hidden_states, *args, **kwargs)
        out, bias = tensor_parallel.checkpoint(lambda h: forward(h, *args, **kwargs), False, hidden_states)
        return out, bias

    return run


def recompute_mamba_mixers(model: torch.nn.Module) -> int:
    """Wrap every Mamba mixer of ``model``; returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, MambaMixer):
            module.forward = _checkpointed(module, module.forward)
            n += 1
    return n
