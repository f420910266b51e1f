"""The quality study's results: one row per arm and size, the token accounting, the checks of issue 19, and the
JSON / Markdown / plots written from them (bench/quality_study.py runs the steps; this only reads what they wrote).

Token accounting (training tokens = optimizer steps x global batch x sequence length, from the resolved recipe):
the parent's pretraining is shared by every arm and reported once; ``elastic`` spends T = stage 1 + stage 2 once for
all sizes; ``independent`` spends k x T (rounded up to whole steps) per smaller size; ``untrained`` spends none
(the importance pass only runs forwards over its calibration set, reported too).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Callable, Dict, List, Optional

ARMS = ("parent", "elastic", "independent", "untrained")


def _row(arm: str, budget: str, active: int, loss: float, acc: Dict, tokens: int, note: str, k=None) -> Dict:
    top = acc["rows"][0]  # budget-eval of one budget: its X->X row
    return {"arm": arm, "budget": budget, "k": k, "active_params": int(active), "val_loss": float(loss),
            "accuracy": float(top["accuracy"]), "correct": int(top["correct"]), "problems": int(top["problems"]),
            "training_tokens": int(tokens), "tokens_note": note}


def build_results(study, read_json: Callable) -> Dict:
    d, acc_dir = study.run_dir, os.path.join(study.dir, "accuracy")
    acc = lambda label: read_json(acc_dir, label, "budget_eval.json")  # noqa: E731
    ev = read_json(d, "evaluate", "stage2.json")
    by_name = {b["name"]: b for b in ev["budgets"]}
    T = study.elastic_tokens()
    full = study.budgets[0]
    rows = [_row("parent", full, by_name[full]["active_params"], ev["parent"], acc("parent"),
                 study.stage_tokens("pretrain"), "pretraining (shared by every arm)")]
    for b in study.budgets:
        rows.append(_row("elastic", b, by_name[b]["active_params"], by_name[b]["trained"], acc(f"elastic-{b}"), T,
                         "stage 1 + stage 2, once for every size"))
    indep_total, mismatch = {}, []
    for b in study.budgets[1:]:
        for k in study.args.indep_multiples:
            run = study.indep_run(b, k)
            iev_json = read_json(study.root, run, "evaluate", "distill.json")
            iev = {x["name"]: x for x in iev_json["budgets"]}
            if not math.isclose(iev_json["parent"], ev["parent"], rel_tol=1e-3):  # the same batches give the same parent
                mismatch.append(f"{run}: parent {iev_json['parent']:.4f} vs {ev['parent']:.4f}")
            tokens = study.stage_tokens("distill", study.distill_iters(k))
            indep_total[k] = indep_total.get(k, 0) + tokens
            rows.append(_row("independent", b, iev[b]["active_params"], iev[b]["trained"],
                             acc(f"independent-{b}-x{k:g}"), tokens, f"{k:g} x T for this size alone", k=k))
        rows.append(_row("untrained", b, by_name[b]["active_params"], by_name[b]["untrained"], acc(f"untrained-{b}"),
                         0, "stage 2's subnet of the permuted parent, no training"))
    imp = study.recipe.importance
    calib = (imp.samples or study.recipe.data.calibration_samples) * (imp.seq_length or study.recipe.data.calibration_seq_length)
    quant = read_json(d, "evaluate", "qad.json")
    be = read_json(d, "budget_eval", "budget_eval.json")
    steps_dir = os.path.join(study.dir, "steps")
    steps = {f[:-5]: read_json(steps_dir, f)["seconds"] for f in sorted(os.listdir(steps_dir)) if f.endswith(".json")}
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recipe": study.args.recipe, "overrides": study.overrides, "device": be.get("device"), "dtype": be.get("dtype"),
        "tokens": {"parent_pretrain": study.stage_tokens("pretrain"), "importance_calibration_forward": calib,
                   "elastic_T": T, "stage1": study.stage_tokens("stage1"), "stage2": study.stage_tokens("stage2"),
                   "qad": study.stage_tokens("qad"),
                   "independent_total": {f"{k:g}": v for k, v in indep_total.items()},
                   "independent_over_elastic": {f"{k:g}": v / T for k, v in indep_total.items()}},
        "validation_tokens": ev["tokens"], "validation_mismatch": mismatch, "problems": rows[0]["problems"],
        "rows": rows, "quant": quant["budgets"], "quant_validation_tokens": quant["tokens"],
        "budget_eval": {"rows": [{k: r[k] for k in ("label", "kind", "accuracy", "think_tokens", "seconds_per_problem",
                                                   "pareto")} for r in be["rows"]],
                        "problems": be.get("num_problems"), "png": os.path.join(d, "budget_eval", "pareto.png")},
        "steps_seconds": steps,
    }
    results["checks"] = checks(results, study.budgets)
    return results


def loss_catch_up(elastic_loss: float, points) -> Optional[float]:
    """The token multiple k at which the independent arm's validation loss first reaches the elastic one, linear in
    k between the tried multiples that bracket it (the first tried k if it already does; None if none does). With
    accuracy at 0 on small models, the loss is what still separates the arms."""
    prev = None
    for k, loss in sorted(points):
        if loss <= elastic_loss:
            if prev is None or prev[1] == loss:
                return float(k)
            (k0, l0) = prev
            return k0 + (k - k0) * (l0 - elastic_loss) / (l0 - loss)
        prev = (k, loss)
    return None


def checks(res: Dict, budgets: List[str]) -> Dict:
    """Issue 19's "must show" items, computed (the reading of them is docs/quality.md's, after the GPU run)."""
    rows = res["rows"]
    get = lambda arm, b, k=None: next((r for r in rows if r["arm"] == arm and r["budget"] == b and r["k"] == k), None)  # noqa: E731
    parent = get("parent", budgets[0])
    out: Dict = {"elastic_vs_parent_accuracy": {}, "elastic_vs_independent": {}, "quant": {}}
    for b in budgets:
        e = get("elastic", b)
        out["elastic_vs_parent_accuracy"][b] = e["accuracy"] - parent["accuracy"]
    ks = sorted({r["k"] for r in rows if r["arm"] == "independent"})
    for b in budgets[1:]:
        e = get("elastic", b)
        per_k = {}
        for k in ks:
            i = get("independent", b, k)
            per_k[f"{k:g}"] = {"accuracy_delta": e["accuracy"] - i["accuracy"], "loss_delta": e["val_loss"] - i["val_loss"],
                               "elastic_at_least_as_accurate": e["accuracy"] >= i["accuracy"]}
        catch = [k for k in ks if get("independent", b, k)["accuracy"] >= e["accuracy"]]
        out["elastic_vs_independent"][b] = {
            "per_k": per_k, "independent_catches_up_at_k": min(catch) if catch else None,
            "loss_catch_up_k": loss_catch_up(e["val_loss"], [(k, get("independent", b, k)["val_loss"]) for k in ks])}
    for q in res["quant"]:
        out["quant"][q["name"]] = {"fp8_within_1pct": abs(q["fp8_vs_bf16"]) <= 0.01,
                                   "qad_closes_two_thirds": (not math.isnan(q["gap_closed"])) and q["gap_closed"] >= 2 / 3}
    be = res["budget_eval"]["rows"]
    same = [r for r in be if r["kind"] == "same"]
    ll = same[0] if same else None
    wins = [r["label"] for r in be if ll and r["kind"] == "think-small" and r["accuracy"] >= ll["accuracy"]
            and r["seconds_per_problem"] < ll["seconds_per_problem"]]
    out["think_small_beats_full"] = wins
    return out


def _fmt_tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n):,}"


def markdown(res: Dict) -> str:
    t = res["tokens"]
    lines = [f"# Quality study ({res['date']}, {res['device']}, {res['dtype']})", "",
             f"Recipe `{res['recipe']}`; overrides: `{' '.join(res['overrides']) or 'none'}`.", "",
             f"Validation loss: {res['validation_tokens']:,} tokens of the data stage's validation split (same batches "
             f"for every arm). Accuracy: greedy exact match on {res['problems']} held-out problems.", "",
             *([f"**Warning: validation batches differ between runs:** {'; '.join(res['validation_mismatch'])}", ""]
               if res["validation_mismatch"] else []),
             "| arm | size | k | active params | val loss | accuracy | training tokens | tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        k = "" if r["k"] is None else f"{r['k']:g}"
        lines.append(f"| {r['arm']} | {r['budget']} | {k} | {r['active_params']:,} | {r['val_loss']:.4f} | "
                     f"{r['accuracy']:.3f} ({r['correct']}/{r['problems']}) | {_fmt_tokens(r['training_tokens'])} | "
                     f"{r['tokens_note']} |")
    indep = ", ".join(f"k={k}: {_fmt_tokens(v)} ({res['tokens']['independent_over_elastic'][k]:.2f} x T)"
                      for k, v in t["independent_total"].items())
    lines += ["", f"Tokens: parent pretraining {_fmt_tokens(t['parent_pretrain'])} (shared); elastic T = "
              f"{_fmt_tokens(t['elastic_T'])} (stage 1 {_fmt_tokens(t['stage1'])} + stage 2 {_fmt_tokens(t['stage2'])}) "
              f"for every size; independent, all smaller sizes together: {indep}; importance calibration "
              f"{_fmt_tokens(t['importance_calibration_forward'])} (forward only); QAD {_fmt_tokens(t['qad'])}.", "",
              f"Quantised elastic checkpoint (validation loss, {res['quant_validation_tokens']:,} tokens):", "",
              "| size | BF16 | FP8 PTQ | (vs BF16) | NVFP4 PTQ | NVFP4 QAD | NVFP4 gap closed |", "|---|---|---|---|---|---|---|"]
    for q in res["quant"]:
        closed = "n/a" if math.isnan(q["gap_closed"]) else f"{100 * q['gap_closed']:.0f}%"
        lines.append(f"| {q['name']} | {q['bf16']:.4f} | {q['fp8_ptq']:.4f} | {100 * q['fp8_vs_bf16']:+.2f}% | "
                     f"{q['nvfp4_ptq']:.4f} | {q['nvfp4_qad']:.4f} | {closed} |")
    lines += ["", f"Budget control (elastic checkpoint, {res['budget_eval']['problems']} problems; Pareto plot "
              f"`{res['budget_eval']['png']}`):", "",
              "| configuration | kind | accuracy | think tokens | s / problem | Pareto |", "|---|---|---|---|---|---|"]
    for r in res["budget_eval"]["rows"]:
        lines.append(f"| {r['label']} | {r['kind']} | {r['accuracy']:.3f} | {r['think_tokens']:.1f} | "
                     f"{r['seconds_per_problem']:.3f} | {'yes' if r['pareto'] else ''} |")
    c = res["checks"]
    lines += ["", "Checks (computed; see docs/quality.md for the reading):", ""]
    lines += [f"- elastic {b} accuracy - parent: {v:+.3f}" for b, v in c["elastic_vs_parent_accuracy"].items()]
    for b, v in c["elastic_vs_independent"].items():
        per = "; ".join(f"k={k}: accuracy {x['accuracy_delta']:+.3f}, loss {x['loss_delta']:+.4f}" for k, x in v["per_k"].items())
        lk = v["loss_catch_up_k"]
        lines.append(f"- elastic - independent at {b}: {per}; independent catches up at k = "
                     f"{v['independent_catches_up_at_k'] if v['independent_catches_up_at_k'] is not None else 'none tried'}"
                     f" (accuracy), k ~ {f'{lk:.2f}' if lk is not None else 'none tried'} (validation loss, interpolated)")
    lines += [f"- {b}: FP8 PTQ within 1%: {'yes' if v['fp8_within_1pct'] else 'no'}; NVFP4 QAD closes >= 2/3 of the "
              f"PTQ gap: {'yes' if v['qad_closes_two_thirds'] else 'no'}" for b, v in c["quant"].items()]
    lines.append(f"- think small -> answer large faster than full->full at >= its accuracy: "
                 f"{', '.join(c['think_small_beats_full']) or 'none'}")
    lines += ["", "Wall time per step (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["steps_seconds"].items())]
    return "\n".join(lines) + "\n"


def plot(res: Dict, plots_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, name in (("accuracy", "exact-match accuracy (held-out)", "accuracy_vs_size.png"),
                             ("val_loss", "validation loss", "loss_vs_size.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
        for arm, marker in zip(ARMS, "*osx"):
            groups = {}
            for r in res["rows"]:
                if r["arm"] == arm:
                    groups.setdefault(r["k"], []).append(r)
            for k, rs in groups.items():
                rs = sorted(rs, key=lambda r: r["active_params"])
                lab = arm if k is None else f"{arm} ({k:g} x T per size)"
                ax.plot([r["active_params"] / 1e6 for r in rs], [r[key] for r in rs], marker=marker, label=lab)
        ax.set_xlabel("active parameters (M)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(plots_dir, name))
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths


def write_outputs(res: Dict, out_dir: str) -> Dict:
    plots_dir = os.path.join(out_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    plots = plot(res, plots_dir)
    res["plots"] = plots + [res["budget_eval"]["png"]]
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md"), "plots": res["plots"]}
    with open(paths["json"], "w") as f:
        json.dump(res, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(markdown(res))
    return paths
