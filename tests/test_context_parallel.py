"""Context parallelism (CP=2 on 2 gloo ranks) equals one rank, and the sharding helpers on their own.

tests/cp_worker.py: a Mamba + MoE pattern (no attention: megatron's local attention has no CP; TE attention
under CP is a GPU test), one real Trainer step from the same checkpoints at CP=1 (1 rank) and CP=2 (2 ranks):
pretrain (LMTask) and the elastic stage (ElasticTask: sampled budgets, router, hard masks, frozen teacher, KD +
budget loss). The batch is split by megatron's ``get_batch_on_this_cp_rank`` (zigzag), Mamba runs megatron's
Mamba context parallelism (all-to-all to head shards, full sequence per rank), the losses are reduced over CP
with the global token count (``token_mean``). Compared: the logged loss and every parameter's gradient (after
megatron's DP x CP reduction), per tensor max |diff| / max |reference| <= 2e-5 (fp32).
"""

import pytest
import torch

from dist_helpers import run_ranks

TOL = 2e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    root = str(tmp / "runs")
    ranks = run_ranks("cp_worker:cp2", 2, tmp, {"root": root})
    (ref,) = run_ranks("cp_worker:cp1", 1, tmp, {"root": root})
    return ref, ranks


def worst(got, want):
    assert set(got) == set(want)
    return max(((got[n] - w).abs().max().item() / max(w.abs().max().item(), 1e-30), n) for n, w in want.items())


@pytest.mark.slow
@pytest.mark.parametrize("step", ["pretrain", "elastic"])
def test_cp2_step_equals_one_rank(runs, step):
    ref, ranks = runs
    assert ref["cp_size"] == 1 and all(r["cp_size"] == 2 for r in ranks)
    want = ref[step]
    zero = [n for n, g in want["grads"].items() if not g.abs().max() > 0]
    assert not zero, f"reference has parameters without gradient: {zero[:5]}"  # an informative comparison
    if step == "elastic":  # both budgets drawn, and the budget loss (scaled by 1 / (tp x cp)) is in play
        assert {"kd/full", "kd/small"} <= set(want["values"])
        assert all(want["values"][f"budget_loss/{b}"] > 0 for b in ("full", "small"))
    for r in ranks:
        got = r[step]
        for key, value in want["values"].items():
            if key in ("loss", "grad_norm") or key.startswith("kd/"):
                assert got["values"][key] == pytest.approx(value, rel=1e-5), key
        rel, name = worst(got["grads"], want["grads"])
        print(f"{step}: worst gradient {name} {rel:.1e}")
        assert rel <= TOL, f"{step}: gradient of {name} differs by {rel:.1e} (relative)"


@pytest.mark.slow
def test_batch_split_is_megatrons_zigzag(runs):
    """16 positions at CP=2: chunks of 4, rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2, for every key
    (the attention mask along its query dim)."""
    _, ranks = runs
    want = {0: [0, 1, 2, 3, 12, 13, 14, 15], 1: [4, 5, 6, 7, 8, 9, 10, 11]}
    for r in ranks:
        s, pos = r["shard"]["shard"], torch.tensor(want[r["shard"]["rank"]])
        assert torch.equal(s["position_ids"], pos.repeat(2, 1))
        assert torch.equal(s["tokens"], pos.repeat(2, 1) + 1000) and torch.equal(s["labels"], pos.repeat(2, 1) + 2000)
        assert torch.equal(s["loss_mask"], pos.float().repeat(2, 1))
        assert s["attention_mask"].shape == (2, 1, 8, 16)
        assert torch.equal(s["attention_mask"][0, 0, :, 0], pos)


def test_shard_is_identity_and_token_mean_is_global_without_cp():
    """One rank (no CP group): the batch is untouched; token_mean = masked sum / mask count."""
    from pipeline.training.task import context_parallel_shard, token_mean

    batch = {"tokens": torch.arange(8).view(1, 8)}
    assert context_parallel_shard(batch) is batch
    per_token, mask = torch.arange(6.0).view(2, 3), torch.tensor([[1.0, 0, 1], [1, 1, 0]])
    loss, value = token_mean(per_token, mask)
    assert loss.item() == pytest.approx((0 + 2 + 3 + 4) / 4) and value.item() == pytest.approx(loss.item())
