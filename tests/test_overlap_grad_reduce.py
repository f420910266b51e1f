"""DDP's overlapped gradient reduction (the multi-rank default) gives the gradients of the non-overlapped one,
the elastic router's included (its TP/PP sum runs after DDP's reduction): one stage-1 step on 2 gloo ranks."""

import torch

from dist_helpers import run_ranks


def test_overlapped_reduction_equals_the_plain_one(tmp_path):
    ranks = run_ranks("overlap_worker:elastic_grads", 2, tmp_path, {"root": str(tmp_path / "run")})
    for rank in ranks:
        plain, overlapped = rank[False], rank[True]
        assert overlapped["overlapped"] and not plain["overlapped"]  # the default is on; the override turns it off
        assert plain["loss"] == overlapped["loss"]
        assert any("elastic_router" in n for n in plain["grads"])
        for name, g in plain["grads"].items():
            torch.testing.assert_close(overlapped["grads"][name], g, rtol=1e-6, atol=1e-9, msg=name)
        router = torch.cat([g.flatten() for n, g in plain["grads"].items() if "elastic_router" in n])
        assert router.abs().max() > 0
    for name, g in ranks[0][True]["grads"].items():  # reduced: both data-parallel ranks hold the same mean
        torch.testing.assert_close(ranks[1][True]["grads"][name], g, rtol=0, atol=0, msg=name)
