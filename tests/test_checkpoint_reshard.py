"""A checkpoint saved on 2 ranks at TP=2 (with sequence parallelism), EP=2 or PP=2 loads on 1 rank at TP=1
(``pipeline.training.checkpoint``, i.e. megatron ``dist_checkpointing`` resharding) and gives the same logits.

The 2-rank job (tests/reshard_worker.py) builds the tiny model fresh at each layout with seed 7, records its
full-vocab logits on fixed tokens (TP shards gathered; PP: the last stage, via the forward-only schedule) and
saves it. The 1-rank job builds the model at TP=1 with the recipe's seed, loads each checkpoint and records the
logits again. Tolerance: max |diff| / max |logits| <= 1e-5 (fp32; observed: TP=2 6e-7, EP=2 and PP=2 exactly 0).
Control: before loading, the TP=1 model's logits differ at O(1), so a partial load cannot pass. The TP=2 checkpoint
also loads on 2 ranks at EP=2 (another 2-rank layout; tests/gpu/test_multi_gpu.py runs the same on 2 GPUs with TE).
"""

import pytest

from dist_helpers import run_ranks

pytestmark = pytest.mark.slow

LAYOUTS = ["tp2", "ep2", "pp2"]
RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    root = str(tmp / "ckpts")
    saved = run_ranks("reshard_worker:save_layouts", 2, tmp, {"root": root})
    (loaded,) = run_ranks("reshard_worker:load_single", 1, tmp, {"root": root})
    at_ep2 = run_ranks("reshard_worker:load_at", 2, tmp, {"root": root, "layout": "ep2", "names": ["tp2"]})
    return saved, loaded, at_ep2


def relative_diff(got, want) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_at_tp1_gives_the_saved_models_logits(runs, layout):
    saved, loaded, _ = runs
    if layout == "tp2":  # both TP ranks hold the gathered logits
        assert relative_diff(saved[0][layout], saved[1][layout]) == 0.0
    if layout == "pp2":
        assert saved[0][layout] is None, "the first pipeline stage produced logits"
    want = saved[-1][layout]  # the last rank is on the last pipeline stage
    got = loaded[layout]
    assert got["after"].shape == want.shape == (2, 64, 512)
    assert relative_diff(got["before"], want) > 0.1, "the TP=1 model matched before loading: the check is void"
    rel = relative_diff(got["after"], want)
    assert rel <= RTOL, f"{layout} -> TP=1: logits differ by {rel:.2e} (relative to max |logit|)"
    print(f"{layout} -> tp1: max relative logit diff {rel:.1e}")


def test_tp2_checkpoint_loads_at_ep2_on_two_ranks(runs):
    saved, _, at_ep2 = runs
    want = saved[0]["tp2"]
    for got in at_ep2:  # EP=2 (DP=2): both ranks run the whole batch through the whole model
        assert relative_diff(got["tp2"]["before"], want) > 0.1, "the EP=2 model matched before loading"
        rel = relative_diff(got["tp2"]["after"], want)
        assert rel <= RTOL, f"tp2 -> ep2: logits differ by {rel:.2e}"
        print(f"tp2 -> ep2: max relative logit diff {rel:.1e}")
