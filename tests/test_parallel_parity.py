"""One training step on 2 gloo ranks equals the single-rank step, for every parallel layout.

What runs (tests/parity_worker.py): the tiny recipe at seq 64, 2 micro-batches of 2 sequences, through the real
``Trainer.setup()`` + ``Trainer.step()`` (megatron schedules, DDP, finalize_model_grads, optimizer with grad
clipping). One 2-rank job writes each model's initial checkpoint at TP=1, then per layout loads it
(``training.init_from``, resharded by dist_checkpointing), takes one step on the synthetic data and saves the
updated weights (``Trainer.save``) and the gradients read just before the optimizer step (as a model
checkpoint). A 1-rank job takes the same step from the same checkpoint, then loads every layout's checkpoints at
TP=1, so each gradient and weight is compared at full shape.

Compared with the reference, per layout: the loss (PP: on the last stage; DP: averaged over DP), the grad norm,
every parameter's gradient, every updated weight and buffer (incl. the router's expert bias); and TP ranks'
gradients of the parameters they replicate. Layouts: tp2 (dense model, no sequence parallel), tp2_sp (MoE under TP
needs sequence parallelism), ep2 (alltoall and allgather dispatchers), pp2, dp2.

Tolerances (fp32; observed on the dev machine in brackets): loss and grad norm relative 1e-5 [<= 1e-7];
gradients and weights: per tensor, max |diff| / max |reference| <= 2e-5 [<= 1.4e-6 grads, <= 1.3e-6 weights].
Real layout bugs (a missing TP/DP/EP reduction, a wrong shard) show up as O(1) differences.
"""

import pytest
import torch

from dist_helpers import run_ranks

pytestmark = pytest.mark.slow

LAYOUTS = ["tp2", "tp2_sp", "ep2", "ep2_allgather", "pp2", "dp2"]
RTOL_SCALAR = 1e-5
RTOL_TENSOR = 2e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    root = str(tmp / "runs")
    ranks = run_ranks("parity_worker:layouts", 2, tmp, {"root": root, "names": LAYOUTS})
    (reference,) = run_ranks("parity_worker:reference", 1, tmp, {"root": root, "names": LAYOUTS})
    return reference, ranks


def worst_tensor_diff(got: dict, want: dict):
    """(max over tensors of max |got - want| / max |want|, that tensor's name, its max |got - want|)."""
    assert set(got) >= set(want), f"missing after load: {sorted(set(want) - set(got))[:5]}"
    worst = (0.0, "", 0.0)
    for name, w in want.items():
        diff = (got[name].double() - w.double()).abs().max().item()
        rel = diff / max(w.abs().max().item(), 1e-30)
        worst = max(worst, (rel, name, diff))
    return worst


def test_reference_step_is_informative(runs):
    """Guards the comparisons below against 0 == 0: every gradient is non-zero and the step moved the weights."""
    reference, _ = runs
    for model, ref in reference["models"].items():
        zero = [n for n, g in ref["grads"].items() if not g.abs().max() > 0]
        assert not zero, f"{model}: parameters without gradient: {zero[:5]}"
        still = [n for n in ref["grads"] if torch.equal(ref["weights"][n], ref["initial"][n])]
        assert not still, f"{model}: the step left {still[:5]} unchanged"
        params = {n: ref["initial"][n] for n in ref["grads"]}
        moved, name, _ = worst_tensor_diff(ref["weights"], params)
        assert moved > 1e3 * RTOL_TENSOR, f"{model}: the step barely moved the weights ({moved:.2e} at {name})"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_matches_single_rank(runs, layout):
    reference, ranks = runs
    got = [r[layout] for r in ranks]
    ref = reference["models"][got[0]["model"]]
    # the last rank is on the last pipeline stage in every layout, so it holds the loss
    loss, want = got[-1]["values"]["loss"], ref["values"]["loss"]
    assert loss == pytest.approx(want, rel=RTOL_SCALAR), f"{layout}: loss {loss} vs single rank {want}"
    if layout == "pp2":
        assert "loss" not in got[0]["values"], "the first pipeline stage reported a loss"
    for r in got:
        norm, want = r["values"]["grad_norm"], ref["values"]["grad_norm"]
        assert norm == pytest.approx(want, rel=RTOL_SCALAR), f"{layout}: grad norm {norm} vs {want}"
        assert r["tp_replica_spread"] <= 1e-7, f"{layout}: TP ranks disagree on a replicated parameter's grad"

    loaded = reference["layouts"][layout]  # saved at the layout, loaded at TP=1 on one rank
    report = []
    for key in ("grads", "weights"):
        rel, name, diff = worst_tensor_diff(loaded[key], ref[key])
        assert rel <= RTOL_TENSOR, f"{layout}: {key} of {name} differ by {diff:.3e} (relative {rel:.2e})"
        report.append(f"{key} {diff:.1e} (relative {rel:.1e})")
    print(f"{layout}: loss {loss:.7f} vs {ref['values']['loss']:.7f}; max |diff| " + ", ".join(report))
