"""Recipes: every shipped recipe validates; precedence; malformed recipes give one line and exit 2."""

import glob
import os

import pytest

from conftest import NANO, ROOT, TINY, run_cli
from pipeline.config import load_recipe
from pipeline.errors import UserError


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml"))))
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert len(recipe.model.pattern) == recipe.model.num_layers


def test_every_key_of_the_nano_recipe_is_commented():
    prev = ""
    for n, line in enumerate(open(NANO), 1):
        body = line.split("#")[0].strip()
        if body and not body.endswith(":") and not body.startswith("- {"):  # a key with a value
            assert "#" in line or prev.startswith("#"), f"{NANO}:{n} has no comment: {line.rstrip()}"
        prev = line.strip()


def test_precedence_defaults_yaml_cli():
    r = load_recipe(TINY)
    assert r.model.hidden_size == 128  # yaml over default (64)
    assert r.checkpointing.async_save is False
    r = load_recipe(TINY, ["model.init_std=0.01", "training.lr=1e-4", "training.min_lr=1e-5", "parallelism.pp=2", "parallelism.pp_layers=[3, 5]"])
    assert r.model.init_std == 0.01 and r.training.lr == 1e-4 and r.parallelism.pp_layers == [3, 5]
    # stage blocks inherit the top-level training section, and override it
    assert r.pretrain.training.lr == 1e-4
    r = load_recipe(TINY, ["training.lr=1e-4", "training.min_lr=1e-5", "pretrain.training.lr=5e-4"])
    assert r.pretrain.training.lr == 5e-4 and r.training.lr == 1e-4


def test_dry_run_prints_resolved_config_for_both_recipes():
    for path, hidden in ((TINY, 128), (NANO, 2688)):
        proc = run_cli("pretrain", "--recipe", path, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert f"hidden_size: {hidden}" in proc.stdout
        assert "checkpoints" not in proc.stdout  # nothing was run


def _write(tmp_path, text, name="bad.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


BAD = {
    "unknown key": ("model:\n  hiden_size: 64\n", "unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
    "wrong type": ("training:\n  lr: fast\n", "training.lr must be float, got str 'fast'"),
    "tp not dividing heads": ("parallelism:\n  tp: 3\n", "parallelism.tp = 3 does not divide"),
    "bad pattern symbol": ("model:\n  num_layers: 3\n  pattern: M*X\n", "unknown layer symbol(s) 'X'"),
    "pattern length": ("model:\n  num_layers: 4\n  pattern: M*E\n", "model.pattern has 3 layers but model.num_layers = 4"),
    "ep not dividing experts": ("parallelism:\n  ep: 3\n", "parallelism.ep = 3 does not divide model.num_experts = 8"),
    "elastic not multiple of 16": ("model:\n  hidden_size: 64\nelastic:\n  axes:\n    hidden: [64, 40]\n",
                                   "elastic.axes.hidden choice 40 is not a multiple of elastic.size_multiple = 16"),
    "missing data file": ("data:\n  sources:\n    - {name: a, path: /nonexistent/x.jsonl}\n",
                          "data.sources[0].path: file not found"),
    "bad yaml": ("model: [unclosed\n", "not valid YAML"),
    "section not mapping": ("model: 3\n", "model must be a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_recipe_is_one_line_error(case, tmp_path):
    text, expected = BAD[case]
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_malformed_recipes_exit_2_through_the_cli(tmp_path):
    for case in ("unknown key", "tp not dividing heads", "wrong type"):
        path = _write(tmp_path, BAD[case][0], name=case.replace(" ", "_") + ".yaml")
        proc = run_cli("params", "--recipe", path)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and BAD[case][1] in lines[0]
    proc = run_cli("params", "--recipe", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: recipe file not found: {tmp_path / 'missing.yaml'}"
    proc = run_cli("params", "--recipe", TINY, "--no-such-flag")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("params", "--recipe", TINY, "model.hidden_size")
    assert proc.returncode == 2 and "expected key.path=value" in proc.stderr
