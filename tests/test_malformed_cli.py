"""Malformed command lines (stages, flags, overrides): exit 2, one line naming the flag or key, no traceback,
nothing written outside the run directory. In-process, plus a few real ``python -m pipeline`` processes."""

import os

import pytest

from conftest import TINY, run_cli
from malformed import expect_user_error, tiny_raw, write_recipe

RECIPE = "{recipe}"  # replaced by the case's recipe (the tiny recipe with its run dir under tmp_path)

CASES = {
    "no stage": ([], ["no stage given"]),
    "unknown stage": (["train", "--recipe", RECIPE], ["invalid choice: 'train'"]),
    "missing --recipe": (["pretrain"], ["--recipe"]),
    "recipe does not exist": (["pretrain", "--recipe", "{tmp}/nope.yaml"], ["recipe file not found", "nope.yaml"]),
    "recipe is a directory": (["pretrain", "--recipe", "{tmp}"], ["recipe file not found"]),
    "unknown flag": (["pretrain", "--recipe", RECIPE, "--fast"], ["unrecognized arguments: --fast"]),
    "override without =": (["pretrain", "--recipe", RECIPE, "training.lr"], ["'training.lr'", "key.path=value"]),
    "override with an empty key part": (["pretrain", "--recipe", RECIPE, "model..hidden_size=3"],
                                        ["empty key component"]),
    "override of an unknown key": (["pretrain", "--recipe", RECIPE, "model.hiden_size=3"],
                                   ["unknown key 'model.hiden_size'"]),
    "override below a value": (["pretrain", "--recipe", RECIPE, "run.name.x=3"], ["name is not a section"]),
    "override of the wrong type": (["pretrain", "--recipe", RECIPE, "training.lr=fast"],
                                   ["training.lr must be float"]),
    "override run.name escaping": (["pretrain", "--recipe", RECIPE, "run.name=../../x"], ["run.name = '../../x'"]),
    "override train_iters 0": (["pretrain", "--recipe", RECIPE, "training.train_iters=0"],
                               ["training.train_iters = 0"]),
    "override log_interval 0": (["pretrain", "--recipe", RECIPE, "logging.log_interval=0"],
                                ["logging.log_interval = 0"]),
    "override lr nan": (["pretrain", "--recipe", RECIPE, "training.lr=.nan"], ["training.lr = nan"]),
    "override micro batch 0 at dry-run": (["pretrain", "--recipe", RECIPE, "--dry-run", "training.micro_batch_size=0"],
                                          ["training.micro_batch_size = 0"]),
    "override run.name empty": (["pretrain", "--recipe", RECIPE, "run.name="], ["run.name = ''", "empty"]),
    "override two budgets of one size": (["stage1", "--recipe", RECIPE,
                                          "elastic.budgets=[{name: a, fraction: 1.0}, {name: b, fraction: 1.0}]"],
                                         ["elastic.budgets", "fraction 1"]),
    "override adam_beta1 1": (["pretrain", "--recipe", RECIPE, "training.adam_beta1=1.0"],
                              ["training.adam_beta1 = 1.0"]),
    "override keep_last negative": (["pretrain", "--recipe", RECIPE, "checkpointing.keep_last=-1"],
                                    ["checkpointing.keep_last = -1"]),
    "override save_interval negative": (["pretrain", "--recipe", RECIPE, "checkpointing.save_interval=-5"],
                                        ["checkpointing.save_interval = -5"]),
    "slice --dtype-bytes negative": (["slice", "--recipe", RECIPE, "--storage-report", "--dtype-bytes", "-2"],
                                     ["--dtype-bytes", "positive integer"]),
    "export --max-shard-gb inf": (["export", "--recipe", RECIPE, "--max-shard-gb", "inf"],
                                  ["--max-shard-gb", "positive"]),
    "slice --max-shard-gb negative": (["slice", "--recipe", RECIPE, "--budget", "full", "--out", "{run}/o",
                                       "--max-shard-gb", "-1"], ["--max-shard-gb", "'-1' must be a positive number"]),
    "slice --max-shard-gb zero": (["slice", "--recipe", RECIPE, "--budget", "full", "--out", "{run}/o",
                                   "--max-shard-gb", "0"], ["--max-shard-gb", "positive"]),
    "slice --max-shard-gb nan": (["slice", "--recipe", RECIPE, "--budget", "full", "--out", "{run}/o",
                                  "--max-shard-gb", "nan"], ["--max-shard-gb", "positive"]),
    "slice --max-shard-gb words": (["slice", "--recipe", RECIPE, "--max-shard-gb", "big"],
                                   ["--max-shard-gb", "'big' is not a number"]),
    "slice --dtype-bytes zero": (["slice", "--recipe", RECIPE, "--storage-report", "--dtype-bytes", "0"],
                                 ["--dtype-bytes", "positive integer"]),
    "slice --format": (["slice", "--recipe", RECIPE, "--format", "onnx"], ["--format", "invalid choice: 'onnx'"]),
    "slice --budget empty": (["slice", "--recipe", RECIPE, "--budget", "", "--out", "{run}/o"],
                             ["--budget", "must not be empty"]),
    "slice without --budget": (["slice", "--recipe", RECIPE, "--out", "{run}/o"], ["--budget is required"]),
    "slice without --out": (["slice", "--recipe", RECIPE, "--budget", "full"], ["--out is required"]),
    "export --max-shard-gb negative": (["export", "--recipe", RECIPE, "--max-shard-gb", "-0.5"],
                                       ["--max-shard-gb", "positive"]),
    "export --dtype": (["export", "--recipe", RECIPE, "--dtype", "int8"], ["--dtype", "invalid choice: 'int8'"]),
    "export --out empty": (["export", "--recipe", RECIPE, "--out", ""], ["--out", "must not be empty"]),
    "import without --hf": (["import", "--recipe", RECIPE], ["--hf"]),
    "import --hf empty": (["import", "--recipe", RECIPE, "--hf", ""], ["--hf", "must not be empty"]),
    "import --hf missing dir": (["import", "--recipe", RECIPE, "--hf", "{tmp}/nohf"], ["nohf", "no config.json"]),
    "evaluate --trained": (["evaluate", "--recipe", RECIPE, "--trained", "stage3"], ["--trained", "'stage3'"]),
    "evaluate --parent empty": (["evaluate", "--recipe", RECIPE, "--parent", ""], ["--parent", "must not be empty"]),
    "evaluate --valid-as": (["evaluate", "--recipe", RECIPE, "--valid-as", "pretrain"], ["--valid-as", "'pretrain'"]),
    "distill before stage 2": (["distill", "--recipe", RECIPE, "distill.budget=small"],
                               ["distill.budgets_from", "elastic_budgets.json is missing"]),
    "distill --dry-run before stage 2": (["distill", "--recipe", RECIPE, "--dry-run", "distill.budget=small"],
                                         ["distill.budgets_from", "elastic_budgets.json is missing"]),
    "data positional junk": (["data", "--recipe", RECIPE, "now"], ["'now'", "key.path=value"]),
}


def _argv(args, tmp_path, recipe):
    run = str(tmp_path / "runs" / "t")
    return [a.replace(RECIPE, recipe).replace("{tmp}", str(tmp_path)).replace("{run}", run) for a in args]


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_command_line(case, tmp_path, capsys):
    args, expected = CASES[case]
    recipe = write_recipe(tmp_path, tiny_raw(tmp_path))
    expect_user_error(_argv(args, tmp_path, recipe), capsys, tmp_path, *expected)
    assert not (tmp_path / "runs").exists()


# ---- the same contract through real processes (what a user's shell sees) -------------------------------------
def _one_line(proc, *expected):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stdout, proc.stderr
    for text in expected:
        assert text in lines[0], lines[0]


def test_processes_refuse_bad_input_with_one_line(tmp_path):
    before = set(os.listdir(tmp_path))
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(os.urandom(512) + b"\xff")
    _one_line(run_cli("pretrain", "--recipe", str(junk)), str(junk), "not a text (UTF-8) recipe file")
    _one_line(run_cli("pretrain", "--recipe", TINY, f"run.root={tmp_path}/runs", "run.name=../../escaped"),
              "run.name = '../../escaped'")
    _one_line(run_cli("slice", "--recipe", TINY, "--budget", "full", "--out", str(tmp_path / "o"),
                      "--max-shard-gb", "-1"), "--max-shard-gb")
    assert set(os.listdir(tmp_path)) == before | {"junk.yaml"}
    assert not os.path.exists(os.path.join(os.path.dirname(str(tmp_path)), "escaped"))
