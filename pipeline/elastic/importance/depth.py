"""Depth: rank layers by iterative removal (METHOD §2, the paper's normalised MSE).

Round r: for every remaining layer j, run the depth subset with the layers removed so far plus j skipped and
measure nMSE = sum (y - y_full)^2 / sum y_full^2 over the final norm's output (the LM head's input); remove
the layer with the smallest nMSE (ties: lower index) and repeat. After the last round the layers left are
appended by their last-round nMSE, so the result is a complete order, least important first.

A skipped layer is left out of its stage's layer list for the pass (``skip_layers``): the residual stream
goes straight to the next layer, exactly what a depth choice that removes it computes. The sums are
all-reduced over the world: DP ranks hold different samples, TP ranks either sequence shards (SP) or
replicas (scaling both sums equally), non-last pipeline stages contribute zeros.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.distributed as dist

from megatron.core.utils import unwrap_model


# run_pass(on_final): one forward over the depth subset; on_final(micro_batch_index, y) on the last stage
RunPass = Callable[[Callable[[int, torch.Tensor], None]], None]


@contextlib.contextmanager
def skip_layers(model: torch.nn.Module, skipped: Sequence[int]):
    """This stage's HybridStack without the layers whose global index is in ``skipped``."""
    stack = unwrap_model(model).decoder
    full = stack.layers
    stack.layers = torch.nn.ModuleList([m for m in full if m.layer_number - 1 not in set(skipped)])
    try:
        yield
    finally:
        stack.layers = full


@contextlib.contextmanager
def final_norm_output(model: torch.nn.Module, sink: Callable[[torch.Tensor], None]):
    """Calls ``sink(y)`` with the final norm's output (last pipeline stage only)."""
    decoder = unwrap_model(model).decoder
    norm = getattr(decoder, "final_norm", None) if decoder.post_process else None
    handle = norm.register_forward_hook(lambda m, i, out: sink(out.detach())) if norm is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def removal_order(model: torch.nn.Module, num_layers: int, rounds: int, run_pass: RunPass,
                  log: Callable[[str], None] = lambda s: None) -> Dict:
    """{"removal_order": [...], "rounds": [{"removed": j, "nmse": {layer: value}}], "passes": n, "seconds": t}."""
    device = next(model.parameters()).device
    reference: Dict[int, torch.Tensor] = {}
    outputs: List[torch.Tensor] = []
    with final_norm_output(model, outputs.append):
        run_pass(lambda i, _: reference.__setitem__(i, outputs.pop().float()))
    start, passes = time.perf_counter(), 1

    def nmse(skipped: List[int]) -> float:
        sums = torch.zeros(2, dtype=torch.float64, device=device)

        def compare(i: int, _):
            y, ref = outputs.pop().float(), reference[i]
            sums[0] += (y - ref).double().pow(2).sum()
            sums[1] += ref.double().pow(2).sum()

        with skip_layers(model, skipped), final_norm_output(model, outputs.append):
            run_pass(compare)
        dist.all_reduce(sums)
        return float(sums[0] / sums[1].clamp(min=1e-300))

    removed: List[int] = []
    history = []
    remaining = list(range(num_layers))
    for r in range(max(1, min(rounds, num_layers - 1))):
        scores = {j: nmse(removed + [j]) for j in remaining}
        passes += len(remaining)
        best = min(remaining, key=lambda j: (scores[j], j))
        removed.append(best)
        remaining.remove(best)
        history.append({"removed": best, "nmse": {str(j): v for j, v in scores.items()}})
        log(f"depth round {r + 1}: removed layer {best} (nMSE {scores[best]:.3e}); "
            f"{len(remaining)} left")
    last = history[-1]["nmse"]
    order = removed + sorted(remaining, key=lambda j: (last[str(j)], j))
    return {"removal_order": order, "rounds": history, "passes": passes,
            "seconds": round(time.perf_counter() - start, 3)}
