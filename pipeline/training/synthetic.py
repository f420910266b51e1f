"""A deterministic, learnable synthetic token stream (used until/unless the data stage has run).

Sample i of the global stream is drawn from a fixed sparse Markov chain (each token has a few likely
successors), seeded by (seed, i) alone, so any DP layout and any resume point see the same samples.
Same interface as ``data_prep.loading.train_batches``.
"""

from __future__ import annotations

from typing import Dict, Iterator

import torch

SUCCESSORS = 4


def _transitions(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (vocab, SUCCESSORS), generator=g)


def sample(index: int, seq_length: int, vocab: int, seed: int, table: torch.Tensor) -> torch.Tensor:
    """seq_length + 1 tokens of global sample ``index``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    choice = torch.randint(0, SUCCESSORS, (seq_length,), generator=g)
    out = torch.empty(seq_length + 1, dtype=torch.long)
    out[0] = torch.randint(0, vocab, (1,), generator=g)
    for t in range(seq_length):
        out[t + 1] = table[out[t], choice[t]]
    return out


def batch_from_samples(samples: torch.Tensor) -> Dict[str, torch.Tensor]:
    tokens, labels = samples[:, :-1].contiguous(), samples[:, 1:].contiguous()
    b, s = tokens.shape
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": torch.ones(b, s, dtype=torch.float),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
    }


def synthetic_batches(vocab: int, seq_length: int, seed: int, consumed_samples: int, micro_batch_size: int,
                      dp_rank: int, dp_size: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Micro-batches of this DP rank; global micro-batch k covers samples [start + k*mbs*dp, ...)."""
    table = _transitions(vocab, seed)
    start = consumed_samples
    while True:
        first = start + dp_rank * micro_batch_size
        rows = [sample(first + j, seq_length, vocab, seed, table) for j in range(micro_batch_size)]
        yield batch_from_samples(torch.stack(rows))
        start += micro_batch_size * dp_size
