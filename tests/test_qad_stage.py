"""The qad stage through the CLI: calibrate -> NVFP4 QAD -> evaluate table -> export --quant -> slice (CPU).

A stage-2 run is planted in-process (test_elastic_slice_vs_masked's parent and budgets); the CLI then runs
as users do. Checks: the scales file covers the quantised linears, the evaluate table has every row, the
exported FP8 / NVFP4 elastic directories slice to a budget, and a missing stage 2 is one clear error line.
"""

import json
import os

import pytest
import torch

from conftest import run_cli
from test_elastic_slice_vs_masked import AXES, BUDGETS, PATTERN, REMOVAL_ORDER, hard_choice, perturbed_parent, \
    recipe_at


def _overrides(root):
    axes = [f"elastic.axes.{a}=[{', '.join(map(str, c))}]" for a, c in AXES.items()]
    return [f"run.root={root}", "run.device=cpu", f"model.pattern={PATTERN}", f"model.num_layers={len(PATTERN)}",
            *axes, "elastic.budgets=[{name: medium, fraction: 0.7}, {name: small, fraction: 0.4}]",
            "stage2.budget_weights=[]", "qad.budget_weights=[]", "training.data=synthetic",
            "qad.calibration_data=synthetic", "qad.calibration_samples=2",
            "qad.training.train_iters=2", "qad.training.seq_length=32", "qad.training.global_batch_size=2",
            "qad.training.lr_warmup_iters=0", "qad.training.eval_iters=1", "stage2.training.seq_length=32",
            "stage2.training.eval_iters=1", "checkpointing.save_interval=2", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from pipeline import parallel
    from pipeline.elastic.subnet import BUDGETS_FILE, ResolvedBudget, budgets_to_json
    from pipeline.training import checkpoint

    root = str(tmp_path_factory.mktemp("qad_stage") / "runs")
    r = recipe_at(root)
    parallel.initialize(r)
    stage = os.path.join(root, "tiny", "stage2")
    checkpoint.save(os.path.join(stage, "checkpoints"), 0, [perturbed_parent(r)])
    parallel.shutdown()
    budgets = [ResolvedBudget(name, 1.0 - 0.3 * j, hard_choice(j).argmax_subnet(r.model, REMOVAL_ORDER))
               for name, (j, _) in BUDGETS.items()]
    with open(os.path.join(stage, BUDGETS_FILE), "w") as f:
        json.dump(budgets_to_json(r.model, budgets), f)
    return root


@pytest.mark.slow  # five CLI runs (~50 s of CPU)
def test_qad_evaluate_export_slice(run):
    args = ["--recipe", "recipes/tiny.yaml", *_overrides(run)]
    done = run_cli("qad", *args, check=True)
    assert "[qad] done: 2 iterations" in done.stdout
    with open(os.path.join(run, "tiny", "qad", "quant_scales.json")) as f:
        scales = json.load(f)
    assert "backbone.layers.0.mixer.in_proj" in scales["input_amax"] and scales["budgets"] == list(BUDGETS)
    assert os.path.isfile(os.path.join(run, "tiny", "qad", "elastic_budgets.json"))
    table = run_cli("evaluate", *args, "--parent", "stage2", check=True).stdout
    assert "quantised nested models" in table
    for name in BUDGETS:
        row = next(line for line in table.splitlines() if line.startswith(name) and "%" in line)
        assert len(row.split()) == 7, row

    for fmt in ("fp8", "nvfp4"):
        run_cli("export", *args, "--quant", fmt, check=True)
        elastic = os.path.join(run, "tiny", f"elastic-{fmt}")
        with open(os.path.join(elastic, "elastic.json")) as f:
            data = json.load(f)
        assert data["quantization"]["format"] == fmt and data["storage"]["format"] == fmt
    out = os.path.join(run, "medium-nvfp4")
    run_cli("slice", *args, "--checkpoint", elastic, "--budget", "medium", "--out", out, check=True)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_algo"] == "NVFP4"
    from pipeline.hf.safetensors_io import SafetensorsDir

    nv = SafetensorsDir(os.path.join(run, "medium-nvfp4")).tensors
    assert nv["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.uint8


def test_missing_stage2_is_one_line(tmp_path):
    done = run_cli("qad", "--recipe", "recipes/tiny.yaml", f"run.root={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: qad.budgets_from = 'stage2'") and "Traceback" not in done.stderr
