"""Forward-only passes through megatron's pipeline schedule (PP/TP/EP/CP as in training), no gradients.

The calibration pass, the depth passes and the benchmark all run here, so the importance pass and a plain
forward are the same code with and without hooks.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import torch

from megatron.core.pipeline_parallel import get_forward_backward_func

# on_output(micro_batch_index, output): the model output on the last pipeline stage (logits [b, s, v/tp])
OnOutput = Callable[[int, torch.Tensor], None]


def forward_only(model: torch.nn.Module, batches: Iterator[Dict[str, torch.Tensor]], num_microbatches: int,
                 seq_length: int, micro_batch_size: int, on_output: Optional[OnOutput] = None) -> None:
    """Run ``num_microbatches`` micro-batches from ``batches`` (dicts with tokens, position_ids)."""
    counter = {"n": 0}
    device = next(model.parameters()).device

    def step(data_iterator, module):
        batch = next(data_iterator)
        out = module(batch["tokens"].to(device), batch["position_ids"].to(device), None)
        index = counter["n"]
        counter["n"] += 1

        def loss(output):
            if on_output is not None:
                on_output(index, output)
            return output.new_zeros(()), {}

        return out, loss

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=batches, model=[model], num_microbatches=num_microbatches,
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True,
        )


def chunks(total: int, size: int) -> List[int]:
    """``total`` micro-batches as schedule calls of at most ``size`` (one progress line per call)."""
    size = max(1, size)
    return [min(size, total - start) for start in range(0, total, size)]
