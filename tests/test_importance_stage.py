"""The ``importance`` stage through the CLI: outputs, the checkpoint the elastic stages load, user errors."""

import json
import os

import pytest
import torch

import importance_worker as w
from conftest import NANO, TINY, run_cli
from pipeline import parallel
from pipeline.model.build import build_model
from pipeline.training import checkpoint
from pipeline.training.loop import resolve_init

ARGS = ["importance.data=synthetic", "importance.samples=8", "importance.seq_length=64",
        "importance.micro_batch_size=2", "importance.depth=true", "importance.depth_samples=2",
        "logging.log_interval=2", f"model.pattern={w.PATTERN}"]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("importance_stage"))
    parent = w.make_parent(root)
    parallel.shutdown()
    proc = run_cli("importance", "--recipe", TINY, f"run.root={root}", f"importance.init_from={parent}", *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = os.path.join(root, "tiny", "importance")
    return root, parent, out, proc.stdout, json.load(open(os.path.join(out, "importance.json")))


def test_report(stage):
    _, parent, out, stdout, report = stage
    assert report["calibration"]["tokens"] == 8 * 64 and report["calibration"]["parent"] == parent
    assert stdout.count("[importance] calibration ") == 2  # one progress line per 2 micro-batches (4 in all)
    assert report["cost"]["calibration"]["seconds"] > 0 and report["cost"]["depth"]["forward_passes"] == 36
    order = report["depth"]["removal_order"]
    assert sorted(order) == list(range(8))
    layers = report["layers"]
    assert layers["3"]["kind"] == "attention" and sorted(layers["3"]["attention_heads"]["order"]) == [0, 1, 2, 3]
    assert len(layers["1"]["experts"]["scores"]) == 8 and len(layers["1"]["experts"]["tokens"]) == 8
    assert sorted(report["hidden"]["order"]) == list(range(128))
    tensors = torch.load(os.path.join(out, report["tensors"]))
    assert tensors["layers.1.moe_ffn.order"].shape == (8, 64)
    for axis in ("hidden", "attention_heads", "mamba_heads", "ffn", "moe_ffn", "shared_expert_ffn", "experts"):
        share = report["summary"][axis]["share"]
        assert list(share.values()) == sorted(share.values(), reverse=True)
        for k, v in share.items():  # sorted prefixes keep at least the unpermuted share
            assert v >= report["summary"][axis]["share_unpermuted"][k] - 1e-6, axis
    assert report["summary"]["hidden"]["choices"] == [128, 96, 64]  # the recipe's elastic.axes
    assert os.path.isfile(os.path.join(out, "config.yaml"))


def test_checkpoint_loads_as_training_init_from_importance(stage):
    """Trainer format: ``training.init_from: importance`` resolves it and the model it loads computes what
    the parent computes."""
    root, parent, out, _, _ = stage
    r = w.recipe(root, "tiny")
    assert resolve_init(r, "importance") == os.path.join(out, "checkpoints", "iter_0000000")
    parallel.initialize(r)
    try:
        logits = {}
        for name, path in (("parent", parent), ("permuted", resolve_init(r, "importance"))):
            model = build_model(r)
            checkpoint.load(path, [model], load_rng=False)
            logits[name] = w.logits(model.eval(), r)
    finally:
        parallel.shutdown()
    diff = (logits["permuted"] - logits["parent"]).abs().max() / logits["parent"].abs().max()
    assert diff <= 1e-5


@pytest.mark.parametrize("args,expected", [
    (["importance.init_from=/nonexistent/ckpt"], "importance.init_from = '/nonexistent/ckpt': neither a path"),
    (["importance.init_from=stage1"], "importance.init_from = 'stage1': neither a path nor a finished stage"),
    (["importance.sampels=8"], "did you mean 'importance.samples'"),
    (["importance.data=web"], "importance.data = 'web', expected one of blend, synthetic"),
    (["importance.samples=7", "importance.micro_batch_size=2"], "importance.samples = 7 is not a multiple"),
])
def test_user_errors_are_one_line(tmp_path, args, expected):
    proc = run_cli("importance", "--recipe", TINY, f"run.root={tmp_path}", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


def test_dry_run_prints_the_plan(tmp_path):
    proc = run_cli("importance", "--recipe", NANO, f"run.root={tmp_path}", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "# importance: parent not found yet" in proc.stdout
    assert "# calibration: 1024 samples x 4096 tokens = 4,194,304 tokens (blend)" in proc.stdout
    assert not os.path.exists(os.path.join(str(tmp_path), "nano_v3_elastic"))
