"""FP8 vs bf16 training through Transformer Engine: pretrain and stage 1 of one recipe, side by side.

    python bench/bench_fp8.py --root /tmp/fp8 [--recipe recipes/proxy_1b.yaml] [--fp8 delayed] [--steps 100]

Runs the CLI as users do (one process per run, same seed, same synthetic stream): pretrain in bf16 and in FP8;
the importance stage once on the bf16 parent; stage 1 from that permuted parent in bf16 and in FP8 (the FP8
student learns from the bf16 teacher, ``stage1.teacher_fp8=false``, so both runs have the same targets;
``--teacher-fp8``: the recipe default, teacher in FP8 too). Prints, per stage and precision, tokens/s/GPU (median of the logged intervals after the first,
which holds compilation and autotuning), the loss at the last step and its mean over the last 10 steps, and
FP8's relative difference to bf16; the two loss curves side by side (every tenth of the run); then each stage-1
student's validation loss per budget (``evaluate``, bf16), the like-for-like comparison (one step's stage-1 loss
is one budget's subnet, which the two routers may pick differently). A stage whose output exists is not re-run:
repeat the command to continue after a time limit. Needs a GPU with FP8 (Hopper) and transformer_engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(stage: str, recipe: str, *args: str, done: str = "") -> None:
    """Runs one stage as users do; skipped when ``done`` (its output file) exists, so a run cut by a time limit
    continues where it stopped when the same command is repeated."""
    cmd = [sys.executable, "-m", "pipeline", stage, "--recipe", recipe, *args]
    if done and os.path.exists(done):
        print(f"(done: {done})", flush=True)
        return
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = [line for line in proc.stdout.splitlines() if " step " in line][-2:]
    print("\n".join(tail), flush=True)
    if proc.returncode:
        sys.exit(f"{stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def summary(stage_dir: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(stage_dir, "logs", "metrics.jsonl"))]
    speeds = [r["tokens_per_s_per_gpu"] for r in rows if "tokens_per_s_per_gpu" in r][1:]
    return {"tokens_per_s": statistics.median(speeds) if speeds else float("nan"), "last_step": rows[-1]["step"],
            "loss_last": rows[-1]["loss"], "loss_last10": statistics.mean(r["loss"] for r in rows[-10:]),
            "mem_gib": max((r.get("mem_gib", 0.0) for r in rows), default=0.0),
            "curve": {r["step"]: r["loss"] for r in rows}}


def print_curves(results: dict, every: int) -> None:
    """The loss of every ``every``-th step, bf16 and FP8 side by side, per stage."""
    for stage in dict.fromkeys(s for s, _ in results):
        if (stage, "fp8") not in results:
            continue
        a, b = results[(stage, "bf16")]["curve"], results[(stage, "fp8")]["curve"]
        steps = [s for s in sorted(a) if s in b and (s % every == 0 or s == 1)]
        print(f"\n{stage}: loss per step, bf16 vs FP8")
        print("| step | bf16 | FP8 | FP8 vs bf16 |")
        print("|---|---|---|---|")
        for s in steps:
            print(f"| {s} | {a[s]:.4f} | {b[s]:.4f} | {(b[s] - a[s]) / a[s]:+.2%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "proxy_1b.yaml"))
    ap.add_argument("--root", required=True, help="run root for the four runs")
    ap.add_argument("--fp8", default="delayed", choices=["delayed", "current", "blockwise"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--stages", nargs="+", default=["pretrain", "stage1"], choices=["pretrain", "stage1"])
    ap.add_argument("--teacher-fp8", action="store_true",
                    help="stage 1's teacher in FP8 too (the recipe default); without it the FP8 student learns from "
                         "the bf16 run's exact targets (stage1.teacher_fp8=false): FP8's effect on the student alone")
    ap.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides for every run")
    args = ap.parse_args()
    common = [f"run.root={args.root}", f"training.train_iters={args.steps}", "logging.log_interval=10",
              f"checkpointing.save_interval={args.steps}", *args.overrides]
    runs = {"bf16": "bench_bf16", "fp8": "bench_fp8"}
    results, scored = {}, {}
    for precision, name in runs.items():
        fp8 = "none" if precision == "bf16" else args.fp8
        cli("pretrain", args.recipe, *common, f"run.name={name}", f"pretrain.training.fp8={fp8}",
            done=os.path.join(args.root, name, "pretrain", "final.json"))
        results[("pretrain", precision)] = summary(os.path.join(args.root, name, "pretrain"))
    if "stage1" in args.stages:
        parent = os.path.join(args.root, runs["bf16"], "importance", "checkpoints")
        cli("importance", args.recipe, *common, f"run.name={runs['bf16']}",
            done=os.path.join(parent, "latest_checkpointed_iteration.txt"))
        for precision, name in runs.items():
            fp8 = "none" if precision == "bf16" else args.fp8
            cli("stage1", args.recipe, *common, f"run.name={name}", f"stage1.training.fp8={fp8}",
                f"stage1.teacher_fp8={'true' if args.teacher_fp8 else 'false'}", f"stage1.teacher={parent}", f"stage1.training.init_from={parent}",
                done=os.path.join(args.root, name, "stage1", "final.json"))
            results[("stage1", precision)] = summary(os.path.join(args.root, name, "stage1"))
            # each stage-1 student scored the same way (bf16, the same validation batches): one step's loss is
            # one budget and one routed subnet, which the two runs' routers may choose differently
            result = os.path.join(args.root, name, "evaluate", "stage1.json")
            cli("evaluate", args.recipe, *common, f"run.name={name}", "--trained", "stage1", "--parent", parent,
                done=result)
            with open(result) as f:
                scored[precision] = json.load(f)
    print(f"\n| stage | precision | tokens/s/GPU | loss @ step {args.steps} | mean loss, last 10 steps | "
          f"FP8 vs bf16 (last 10) | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for (stage, precision), r in results.items():
        base = results[(stage, "bf16")]["loss_last10"]
        rel = "" if precision == "bf16" else f"{(r['loss_last10'] - base) / base:+.2%}"
        print(f"| {stage} | {precision if precision == 'bf16' else 'fp8-' + args.fp8} | {r['tokens_per_s']:,.0f} | "
              f"{r['loss_last']:.4f} | {r['loss_last10']:.4f} | {rel} | {r['mem_gib']:.1f} |")
    print_curves(results, max(1, args.steps // 10))
    if scored:
        print("\nstage-1 students, validation loss per budget (bf16 evaluation of each run's checkpoint):")
        print("| budget | bf16-trained | FP8-trained | FP8 vs bf16 | untrained slice |")
        print("|---|---|---|---|---|")
        for b16, b8 in zip(scored["bf16"]["budgets"], scored["fp8"]["budgets"]):
            print(f"| {b16['name']} | {b16['trained']:.4f} | {b8['trained']:.4f} | "
                  f"{(b8['trained'] - b16['trained']) / b16['trained']:+.2%} | {b16['untrained']:.4f} |")
    print(json.dumps({**{f"{s}/{p}": {k: v for k, v in r.items() if k != "curve"} for (s, p), r in results.items()},
                      **{f"evaluate/{p}": v["budgets"] for p, v in scored.items()}}))


if __name__ == "__main__":
    main()
