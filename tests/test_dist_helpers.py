"""dist_helpers.run_ranks: the ranks form a real gloo group with one thread each, and a failing rank's error
reaches the test's AssertionError (rank order of results is checked by the parity tests: PP's loss on the last
rank). The rank-side function lives here too: plain torch, fast imports."""

import os

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_ranks


def fail_on_last_rank():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    if rank == world - 1:
        raise ValueError(f"planted failure on rank {rank} of {world}: sum {float(total):.0f}, "
                         f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    return rank


def test_failing_rank_surfaces_its_stderr(tmp_path):
    with pytest.raises(AssertionError, match=r"(?s)failed \(exit 1, no result from ranks \[1\].*"
                                             r"rank 1 stderr.*planted failure on rank 1 of 2: sum 3, OMP_NUM_THREADS=1"):
        run_ranks("test_dist_helpers:fail_on_last_rank", 2, tmp_path, timeout=120)
