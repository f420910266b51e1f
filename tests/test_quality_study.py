"""The quality study (bench/quality_study.py, docs/quality.md): the table and token accounting from planted step
outputs (fast), and the whole command end to end at tiny scale on CPU (slow: ~25 CLI subprocesses)."""

import json
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import quality_study, study_table  # noqa: E402


def _study(tmp_path, *extra):
    args = quality_study.parse(["--scale", "tiny", "--root", str(tmp_path), *extra])
    args.recipe = os.path.join(ROOT, "recipes", "tiny.yaml")
    return quality_study.Study(args, quality_study.TINY + [f"run.root={tmp_path}"])


def _dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _acc(correct, n=4, label="x->x"):
    return {"rows": [{"label": label, "accuracy": correct / n, "correct": correct, "problems": n}]}


def test_token_accounting_follows_the_resolved_recipe(tmp_path):
    s = _study(tmp_path, "--indep-multiples", "1", "2.5")
    r = s.recipe
    t1, t2, td = r.stage1.training, r.stage2.training, r.distill.training
    T = t1.train_iters * t1.global_batch_size * t1.seq_length + t2.train_iters * t2.global_batch_size * t2.seq_length
    assert s.elastic_tokens() == T == 4 * 8 * 128 + 2 * 4 * 256
    per_step = td.global_batch_size * td.seq_length
    for k in (1, 2.5):  # the fewest whole steps that reach k x T
        iters = s.distill_iters(k)
        assert (iters - 1) * per_step < k * T <= iters * per_step


def test_table_has_every_arm_and_size_with_the_planted_numbers(tmp_path):
    s = _study(tmp_path, "--indep-multiples", "1", "2")
    d, names = s.run_dir, s.budgets
    active = {"full": 1000, "medium": 750, "small": 500}
    loss = {"full": (1.0, 1.0), "medium": (1.2, 1.5), "small": (1.4, 2.0)}  # (trained, untrained)
    _dump(os.path.join(d, "evaluate", "stage2.json"), {"tokens": 4096, "parent": 0.9, "budgets": [
        {"name": b, "active_params": active[b], "trained": loss[b][0], "untrained": loss[b][1]} for b in names]})
    for b, c in zip(names, (3, 3, 2)):
        _dump(os.path.join(s.dir, "accuracy", f"elastic-{b}", "budget_eval.json"), _acc(c))
    _dump(os.path.join(s.dir, "accuracy", "parent", "budget_eval.json"), _acc(4))
    for b in names[1:]:
        _dump(os.path.join(s.dir, "accuracy", f"untrained-{b}", "budget_eval.json"), _acc(0))
        for k, c in ((1, 1), (2, 3)):  # the independent arm catches up at k = 2 (medium: 3 >= 3; small: 3 >= 2)
            run = s.indep_run(b, k)
            _dump(os.path.join(s.root, run, "evaluate", "distill.json"), {"parent": 0.9, "budgets": [
                {"name": x, "active_params": active[x], "trained": 1.3 + 0.1 * k} for x in names]})
            _dump(os.path.join(s.dir, "accuracy", f"independent-{b}-x{k}", "budget_eval.json"), _acc(c))
    _dump(os.path.join(d, "evaluate", "qad.json"), {"tokens": 2048, "budgets": [
        {"name": b, "bf16": 1.0, "fp8_ptq": 1.005, "fp8_vs_bf16": 0.005, "nvfp4_ptq": 1.3, "nvfp4_qad": 1.1,
         "gap_closed": 2 / 3 if b == "full" else 0.5} for b in names]})
    be_rows = [{"label": lab, "kind": kind, "accuracy": a, "think_tokens": 5.0, "seconds_per_problem": sec,
                "pareto": p} for lab, kind, a, sec, p in (("small->full", "think-small", 0.75, 0.5, True),
                                                           ("full->full", "same", 0.75, 1.0, False),
                                                           ("full->full cap 3", "token-budget", 0.25, 0.4, True))]
    _dump(os.path.join(d, "budget_eval", "budget_eval.json"), {"device": "cpu", "dtype": "torch.float32",
                                                               "num_problems": 4, "rows": be_rows})
    _dump(os.path.join(s.dir, "steps", "pretrain.json"), {"seconds": 12.0})

    res = study_table.build_results(s, s.read_json)
    arms = {(r["arm"], r["budget"], r["k"]) for r in res["rows"]}
    assert arms == ({("parent", "full", None)} | {("elastic", b, None) for b in names}
                    | {("untrained", b, None) for b in names[1:]}
                    | {("independent", b, k) for b in names[1:] for k in (1.0, 2.0)})
    row = {(r["arm"], r["budget"], r["k"]): r for r in res["rows"]}
    assert row[("parent", "full", None)]["val_loss"] == 0.9 and row[("parent", "full", None)]["accuracy"] == 1.0
    assert row[("untrained", "small", None)]["val_loss"] == 2.0 and row[("untrained", "small", None)]["training_tokens"] == 0
    assert row[("independent", "medium", 2.0)]["val_loss"] == pytest.approx(1.5)
    T = s.elastic_tokens()
    assert all(row[("elastic", b, None)]["training_tokens"] == T for b in names)
    td = s.recipe.distill.training
    assert row[("independent", "small", 2.0)]["training_tokens"] == s.distill_iters(2) * td.global_batch_size * td.seq_length
    assert res["tokens"]["independent_over_elastic"]["2"] == pytest.approx(2 * s.distill_iters(2) * td.global_batch_size
                                                                             * td.seq_length / T)
    assert res["validation_mismatch"] == []
    c = res["checks"]
    assert c["elastic_vs_parent_accuracy"]["small"] == pytest.approx(-0.5)
    assert c["elastic_vs_independent"]["medium"]["independent_catches_up_at_k"] == 2.0
    assert c["elastic_vs_independent"]["small"]["per_k"]["1"]["elastic_at_least_as_accurate"] is True
    # loss: medium's independent runs (1.4, 1.5) never reach the elastic 1.2
    assert c["elastic_vs_independent"]["medium"]["loss_catch_up_k"] is None
    assert c["quant"]["full"] == {"fp8_within_1pct": True, "qad_closes_two_thirds": True}
    assert c["quant"]["small"]["qad_closes_two_thirds"] is False
    assert c["think_small_beats_full"] == ["small->full"]

    paths = study_table.write_outputs(res, s.dir)
    md = open(paths["md"]).read()
    for arm, b, k in arms:
        assert f"| {arm} | {b} | {'' if k is None else f'{k:g}'} |" in md
    assert json.load(open(paths["json"]))["rows"] == res["rows"]
    assert all(os.path.getsize(p) > 0 for p in paths["plots"][:2])


def _fake_python(tmp_path, body):
    path = tmp_path / "fakepy"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_time_limit_stops_the_running_step_and_a_rerun_resumes(tmp_path, capsys):
    """--time-limit: SIGTERM to the running step (a stage saves and exits 0), no marker, exit 3; a finished step
    leaves its marker and is skipped; a step that exits 0 without its output is a failure."""
    base = ["--scale", "tiny", "--root", str(tmp_path)]
    slow = _fake_python(tmp_path, "trap 'echo saved; exit 0' TERM\nsleep 30 &\nwait")
    t0 = time.monotonic()
    assert quality_study.main(base + ["--python", slow, "--time-limit", "1"]) == 3
    assert time.monotonic() - t0 < 20
    steps = tmp_path / "study_tiny" / "study" / "steps"
    assert not (steps / "data.json").exists()
    assert "saved" in (tmp_path / "study_tiny" / "study" / "logs" / "data.log").read_text()
    quick = _fake_python(tmp_path, "exit 0")
    with pytest.raises(SystemExit, match="pretrain failed"):  # exit 0 but no pretrain/final.json
        quality_study.main(base + ["--python", quick])
    assert (steps / "data.json").exists() and not (steps / "pretrain.json").exists()
    assert "[study] data: done (skipped)" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="pretrain failed"):
        quality_study.main(base + ["--python", quick])
    assert "[study] data: done (skipped)" in capsys.readouterr().out


@pytest.mark.slow
def test_the_study_command_runs_end_to_end_at_tiny_scale(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "bench", "quality_study.py"), "--scale", "tiny", "--root", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "study_tiny" / "study"
    res = json.loads((out / "results.json").read_text())
    budgets = ["full", "medium", "small"]
    arms = {(r["arm"], r["budget"]) for r in res["rows"]}
    assert arms == ({("parent", "full")} | {("elastic", b) for b in budgets}
                    | {(a, b) for a in ("independent", "untrained") for b in budgets[1:]})
    for r in res["rows"]:
        assert math.isfinite(r["val_loss"]) and 0 <= r["accuracy"] <= 1 and r["problems"] == 2, r
    assert [q["name"] for q in res["quant"]] == budgets
    assert all(math.isfinite(q[k]) for q in res["quant"] for k in ("bf16", "fp8_ptq", "nvfp4_ptq", "nvfp4_qad"))
    assert any(r["kind"] == "token-budget" for r in res["budget_eval"]["rows"])
    assert all(os.path.getsize(p) > 0 for p in res["plots"])
    assert "| independent | small | 1 |" in (out / "results.md").read_text()
    # resumable: every step is skipped on a second run, and the same rows come back
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[study] stage1: done (skipped)" in again.stdout, again.stdout[-2000:]
    assert json.loads((out / "results.json").read_text())["rows"] == res["rows"]
    # the independent arm trained the pruned model only: outside its subnet every weight is the permuted parent's
    from safetensors.torch import load_file

    def weights(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    parent, indep = weights(out / "untrained"), weights(tmp_path / "study_tiny-indep-small-x1" / "elastic")
    small = next(b for b in json.loads((out / "untrained" / "elastic.json").read_text())["budgets"] if b["name"] == "small")
    h, emb = small["subnet"]["hidden"], "backbone.embeddings.weight"
    assert h < parent[emb].shape[1]
    assert parent[emb][:, h:].equal(indep[emb][:, h:])
    assert not parent[emb][:, :h].equal(indep[emb][:, :h])
    # the distill stage names a wrong budget in one line (exit 2)
    bad = subprocess.run([sys.executable, "-m", "pipeline", "distill", "--recipe", "recipes/tiny.yaml", "--dry-run",
                          f"run.root={tmp_path}", "run.name=study_tiny", "distill.budget=tiny",
                          f"distill.budgets_from={tmp_path / 'study_tiny' / 'stage2'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: distill.budget = 'tiny'")


def test_loss_catch_up_interpolates_between_the_bracketing_multiples():
    # the tiny CPU preview's medium row (docs/quality.md): elastic 1.3579 between k=0.5 (1.3821) and k=1 (1.3232)
    pts = [(1.0, 1.3232), (0.25, 1.4477), (0.5, 1.3821)]
    assert study_table.loss_catch_up(1.3579, pts) == pytest.approx(0.5 + 0.5 * (1.3821 - 1.3579) / (1.3821 - 1.3232))
    assert study_table.loss_catch_up(1.5, pts) == 0.25
    assert study_table.loss_catch_up(1.3, pts) is None


def test_overrides_after_the_multiples_stay_overrides():
    args = quality_study.parse(["--indep-multiples", "1", "3", "training.lr=1e-4", "--root", "/tmp/a=b",
                                "stage1.training.train_iters=5"])
    assert args.indep_multiples == [1.0, 3.0] and args.root == "/tmp/a=b"
    assert args.overrides == ["training.lr=1e-4", "stage1.training.train_iters=5"]
