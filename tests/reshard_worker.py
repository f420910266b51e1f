"""Rank-side code of tests/test_checkpoint_reshard.py (run through dist_helpers.run_ranks).

``save_layouts`` (2 ranks) builds the tiny model fresh at TP=2 (+SP), EP=2 and PP=2, records its full-vocab
logits on fixed tokens and saves it with ``pipeline.training.checkpoint.save``; ``load_single`` (1 rank) builds
the model at TP=1 with another seed, records its logits, loads each checkpoint and records them again.
``load_at`` does the same at another 2-rank layout (TP=2 -> EP=2). ``names`` picks layouts, ``extra`` adds recipe
overrides (``model.backend=te`` on GPUs, tests/gpu/test_multi_gpu.py); logits come back on the CPU.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from pipeline import parallel
from pipeline.config.load import load_recipe
from pipeline.model.build import build_model
from pipeline.training import checkpoint

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "tiny.yaml")
BATCH, SEQ = 2, 64
LAYOUTS = {
    "tp2": ["parallelism.tp=2", "parallelism.sequence_parallel=true"],
    "ep2": ["parallelism.ep=2"],
    "pp2": ["parallelism.pp=2"],
}
SAVE_SEED = 7  # the TP=1 side builds with the recipe's seed, so only a complete load can match


def recipe(root: str, name: str, extra: List[str] = ()):
    return load_recipe(TINY, [f"training.seq_length={SEQ}", f"run.root={root}", f"run.name={name}", *extra])


def logits(model, vocab: int) -> Optional[torch.Tensor]:
    """Full-vocab logits [BATCH, SEQ, vocab] of fixed tokens on the last stage (None on others), through
    megatron's forward-only schedule so PP stages pass activations as in training."""
    device = next(model.parameters()).device  # CPU gloo or this rank's GPU: the same code
    tokens = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(device)
    positions = torch.arange(SEQ, device=device).expand(BATCH, SEQ)

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        out = chunk(tokens, positions, None)

        def gather(output):  # vocab-parallel shards -> full vocab
            full = tensor_parallel.gather_from_tensor_model_parallel_region(output)
            return output.new_zeros(()), {"logits": full.detach().float().cpu()}

        return out, gather

    model.eval()
    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
            seq_length=SEQ, micro_batch_size=BATCH, forward_only=True)
    return stored[0]["logits"] if parallel_state.is_pipeline_last_stage() else None


def save_layouts(root: str, names: List[str] = tuple(LAYOUTS),
                 extra: List[str] = ()) -> Dict[str, Optional[torch.Tensor]]:
    out = {}
    for name in names:
        r = recipe(root, name, [*LAYOUTS[name], *extra, f"run.seed={SAVE_SEED}"])
        parallel.initialize(r)
        model = build_model(r)
        out[name] = logits(model, r.model.vocab_size)
        checkpoint.save(os.path.join(root, name), 0, [model])
    parallel.shutdown()
    return out


def load_single(root: str, names: List[str] = tuple(LAYOUTS),
                extra: List[str] = ()) -> Dict[str, Dict[str, torch.Tensor]]:
    return load_at(root, "tp1", names, extra)


def load_at(root: str, layout: str, names: List[str], extra: List[str] = ()) -> Dict[str, Dict[str, torch.Tensor]]:
    """Each named checkpoint loaded into a model built at ``layout`` (``tp1`` or a LAYOUTS key) with the recipe's
    seed: its logits before and after loading."""
    out = {}
    r = recipe(root, layout, [*LAYOUTS.get(layout, []), *extra])
    parallel.initialize(r)
    for name in names:
        model = build_model(r)
        before = logits(model, r.model.vocab_size)
        checkpoint.load(checkpoint.iter_dir(os.path.join(root, name), 0), [model], load_rng=False)
        out[name] = {"before": before, "after": logits(model, r.model.vocab_size)}
    parallel.shutdown()
    return out
