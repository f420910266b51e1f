"""The memory plan vs measured peak GPU memory: ``recipes/proxy_1b.yaml`` on one GPU.

    python bench/bench_memory_plan.py [--recipe recipes/proxy_1b.yaml] [--stages pretrain stage1] [--out F.json]

For pretrain and stage 1 (the elastic step: router, masks, frozen teacher, KD), with and without full
recompute, at seq 4096 and at the longest sequence (of 8K, 16K, 32K, 64K) the plan says fits this GPU: two
real Trainer steps (megatron schedule, DDP, optimizer; the second runs with Adam's state) in a fresh process per
case, micro-batch 1, bf16; measured = ``torch.cuda.max_memory_allocated()`` from before the model is built to
after the second step. Prints one row per case with measured / plan (target: within 10%), and the plan's terms of the
case furthest off. Each case runs in its own process (~20-40 s each on an H100/H200).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
GIB = 1024 ** 3
LONG = (8192, 16384, 32768, 65536)


def overrides(stage: str, seq: int, recompute: str, root: str):
    t = f"{stage}.training"
    out = [f"run.root={root}", "logging.tensorboard=false", "checkpointing.save_interval=100000",
           f"{t}.seq_length={seq}", f"{t}.micro_batch_size=1", f"{t}.global_batch_size=1",
           f"{t}.train_iters=2", f"{t}.lr_warmup_iters=0", f"{t}.init_from=",
           f"{stage}.parallelism.recompute={recompute}", "model.max_sequence_length=65536"]
    if stage == "stage1":
        out.append(f"stage1.teacher={os.path.join(root, 'teacher')}")
    return out


def one_case(recipe_path: str, stage: str, seq: int, recompute: str, root: str) -> dict:
    """In this process: one step, the measured peak and the plan."""
    from pipeline.cli import quiet_libraries

    quiet_libraries()
    import torch

    from pipeline.config.load import for_stage, load_recipe
    from pipeline.model.memory_plan import causal_conv1d, plan
    from pipeline.model.spec import use_te
    from pipeline.training.loop import Trainer
    from pipeline.training.task import LMTask

    r = for_stage(load_recipe(recipe_path, overrides(stage, seq, recompute, root)), stage)
    gpu = torch.cuda.is_available()  # (without a GPU the case still runs: a smoke test, measured = 0)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    if stage == "stage1":
        from pipeline.elastic.task import ElasticTask

        task = ElasticTask(r, stage)
    else:
        task = LMTask(r, stage)
    trainer = Trainer(r, stage, task)
    trainer.setup()
    trainer.step()  # Adam's m and v come to exist in the first step's optimizer update, after the backward:
    trainer.step()  # only the second step's forward and backward hold them beside the activations (the plan)
    measured = torch.cuda.max_memory_allocated() if gpu else 0
    mp = plan(r, stage, gpus=1, gpu_gib=torch.cuda.get_device_properties(0).total_memory / GIB if gpu else 80.0,
              te=use_te(r.model))  # the backend this machine resolves auto to
    return {"stage": stage, "seq": seq, "recompute": recompute, "measured": measured, "plan": mp.total,
            "terms": [(n, b) for n, b, _ in mp.lines], "causal_conv1d": causal_conv1d()}


def replan(recipe_path: str, rows: list) -> list:
    """Measured rows of an earlier run (--out JSON) against this code's plan for the same cases, with the Mamba conv
    kernel that machine had (rows from before the flag was recorded: the H200 bundle's causal-conv1d)."""
    from pipeline.config.load import for_stage, load_recipe
    from pipeline.model.memory_plan import plan

    out = []
    for row in rows:
        r = for_stage(load_recipe(recipe_path, overrides(row["stage"], row["seq"], row["recompute"], "/nonexistent")),
                      row["stage"])
        conv_fused = row.get("causal_conv1d", True)
        mp = plan(r, row["stage"], gpus=1, gpu_gib=140.0, te=True, conv_fused=conv_fused)
        out.append(dict(row, plan=mp.total, terms=[(n, b) for n, b, _ in mp.lines], causal_conv1d=conv_fused))
    return out


def make_teacher(recipe_path: str, root: str) -> None:
    """The frozen parent stage 1 reads: this recipe's model, freshly initialised, saved as a checkpoint."""
    import torch

    from pipeline import parallel
    from pipeline.config.load import load_recipe
    from pipeline.model.build import build_model
    from pipeline.training import checkpoint

    r = load_recipe(recipe_path, [f"run.root={root}"])
    parallel.initialize(r)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    checkpoint.save(os.path.join(root, "teacher"), 0, [build_model(r, dtype)])
    parallel.shutdown()


def longest_fitting(recipe_path: str, stage: str, recompute: str, root: str, gpu_gib: float) -> int:
    from pipeline.config.load import for_stage, load_recipe
    from pipeline.model.memory_plan import plan
    from pipeline.model.spec import use_te

    best = 4096
    for seq in LONG:
        r = for_stage(load_recipe(recipe_path, overrides(stage, seq, recompute, root)), stage)
        if plan(r, stage, gpus=1, gpu_gib=gpu_gib, te=use_te(r.model)).fits:
            best = seq
    return best


def child(args) -> None:
    if args.case == "teacher":
        make_teacher(args.recipe, args.root)
        return
    stage, seq, recompute = args.case.split(":")
    print("RESULT " + json.dumps(one_case(args.recipe, stage, int(seq), recompute, args.root)), flush=True)


HEADER = f"{'stage':<9}{'seq':>7} {'recompute':<10}{'plan GiB':>10}{'measured GiB':>14}{'measured/plan':>15}"


def row_line(row: dict) -> str:
    return (f"{row['stage']:<9}{row['seq']:>7} {row['recompute']:<10}{row['plan'] / GIB:>10.2f}"
            f"{row['measured'] / GIB:>14.2f}{row['measured'] / row['plan']:>15.3f}")


def report(rows: list, out: str, table: bool = True) -> None:
    if table:
        print(HEADER)
        for row in rows:
            print(row_line(row))
    if rows:
        worst = max(rows, key=lambda r: abs(r["measured"] / r["plan"] - 1))
        print(f"plan terms of the case furthest off ({worst['stage']} seq {worst['seq']} {worst['recompute']}): "
              + ", ".join(f"{n} {b / GIB:.2f}" for n, b in worst["terms"]))
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=os.path.join(REPO, "recipes", "proxy_1b.yaml"))
    ap.add_argument("--out", default="", help="also write the rows as JSON here")
    ap.add_argument("--stages", nargs="+", default=["pretrain", "stage1"], choices=["pretrain", "stage1"],
                    help="which stages' cases (one device call each fits in 10 minutes)")
    ap.add_argument("--replan", default="", metavar="ROWS.json",
                    help="no GPU: print an earlier run's measured peaks (its --out file) against this code's plan")
    ap.add_argument("--case", default="", help=argparse.SUPPRESS)  # child process: one case
    ap.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        return child(args)
    if args.replan:
        with open(args.replan) as f:
            saved = json.load(f)
        rows = replan(args.recipe, saved["rows"] if isinstance(saved, dict) else saved)
        print(f"{args.replan}: measured peaks vs this code's plan; {args.recipe}")
        return report(rows, args.out)
    import torch

    if not torch.cuda.is_available():
        sys.exit("error: bench_memory_plan measures GPU memory: no CUDA device is visible")
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    root = tempfile.mkdtemp(prefix="memory_plan_")
    run = lambda case: subprocess.run([sys.executable, __file__, "--recipe", args.recipe, "--root", root,  # noqa
                                       "--case", case], cwd=REPO, capture_output=True, text=True)
    if "stage1" in args.stages:
        proc = run("teacher")
        if proc.returncode:
            sys.exit(f"error: writing the teacher checkpoint failed:\n{proc.stderr[-3000:]}")
    cases = []
    for stage in args.stages:
        for recompute in ("none", "full"):
            cases += [(stage, 4096, recompute), (stage, longest_fitting(args.recipe, stage, recompute, root, gpu_gib),
                                                 recompute)]
    rows = []
    print(f"{torch.cuda.get_device_name(0)}, {gpu_gib:.0f} GiB; {args.recipe}")
    print(HEADER)
    for stage, seq, recompute in dict.fromkeys(cases):
        proc = run(f"{stage}:{seq}:{recompute}")
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{stage:<9}{seq:>7} {recompute:<10} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(line[7:]))
        print(row_line(rows[-1]), flush=True)
    report(rows, args.out, table=False)


if __name__ == "__main__":
    main()
