"""The quality study (docs/quality.md): are the nested models any good compared with what users would otherwise do?

    python bench/quality_study.py [--recipe recipes/study.yaml] [--indep-multiples 1 3] [--time-limit 540] [key=value ...]
    python bench/quality_study.py --scale tiny --root /tmp/runs      # CPU smoke: the tiny recipe, a few minutes

Drives the CLI as a user would (one ``python -m pipeline`` subprocess per step, logs in <study>/logs/):

- parent: data -> pretrain (the data stage's reasoning generator) -> importance (permuted parent);
- elastic: stage1 -> stage2 (T tokens in total, every size from one run) -> export;
- independent: for each smaller budget and each k of --indep-multiples, ``distill`` of the subnet the elastic router
  chose, KD from the parent with k x T tokens (its own run, ``<name>-indep-<budget>-x<k>``) -> export;
- untrained: stage 2's subnets of the permuted parent (``export --checkpoint importance --budgets stage2``);
- per arm and size: validation loss (``evaluate``, the same batches for every arm) and greedy exact-match accuracy
  on held-out problems (``budget-eval`` of that one budget: ``X->X``);
- quantised: ``qad`` (FP8 PTQ scales + NVFP4 QAD) of the elastic checkpoint -> ``evaluate`` (BF16 / FP8 PTQ /
  NVFP4 PTQ / NVFP4 QAD loss per size);
- budget control: ``budget-eval`` of the elastic checkpoint (every S->L pair, the token-budget control, Pareto PNG).

Writes <root>/<name>/study/results.json, results.md and plots/. Resumable: a step whose marker
(study/steps/<step>.json) exists is skipped; training stages resume from their checkpoints. ``--time-limit S``
sends SIGTERM to the running step at S seconds (a training stage saves and exits) and stops: re-run the same
command to continue.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.study_table import build_results, write_outputs  # noqa: E402

# --scale tiny: recipes/tiny.yaml with every stage cut to a few steps (a CPU smoke of the whole command)
TINY = ["run.name=study_tiny", "training.data=blend", "importance.data=blend", "qad.calibration_data=blend",
        "data.demo_corpus.records=400", "data.num_workers=0", "pretrain.training.train_iters=12",
        "stage1.training.train_iters=4", "stage1.training.lr_warmup_iters=1", "stage2.training.train_iters=2",
        "stage2.training.lr_warmup_iters=1", "distill.training.lr_warmup_iters=1", "distill.training.lr=5.0e-4",
        "distill.training.min_lr=5.0e-5", "qad.training.train_iters=2", "qad.training.lr_warmup_iters=1", "qad.training.eval_iters=1",
        "qad.calibration_samples=2", "importance.depth=false", "training.eval_iters=1",
        "checkpointing.save_interval=1000", "logging.log_interval=1", "logging.tensorboard=false",
        "budget_eval.num_problems=2", "budget_eval.think_tokens=6", "budget_eval.answer_tokens=4",
        "budget_eval.token_budget_caps=[3]"]


class Interrupted(Exception):
    pass


class Study:
    def __init__(self, args, overrides: List[str]):
        from pipeline.config.load import load_recipe

        self.args, self.overrides = args, overrides
        self.recipe = load_recipe(args.recipe, overrides)  # validated here: bad input fails before any step
        r = self.recipe
        self.name, self.root = r.run.name, r.run.root
        self.run_dir = os.path.join(self.root, self.name)
        self.dir = os.path.join(self.run_dir, "study")
        self.budgets = [b.name for b in r.elastic.budgets]
        self.start = time.monotonic()
        self.child: Optional[subprocess.Popen] = None
        self.stopped = False

    # ---- token accounting (from the resolved recipe: what each stage trains) ----------------------------------
    def stage_tokens(self, stage: str, iters: Optional[int] = None) -> int:
        t = getattr(self.recipe, stage).training
        return (t.train_iters if iters is None else iters) * t.global_batch_size * t.seq_length

    def elastic_tokens(self) -> int:
        """T: the elastic arm's training tokens (stage 1 + stage 2), every size from the one run."""
        return self.stage_tokens("stage1") + self.stage_tokens("stage2")

    def distill_iters(self, k: float) -> int:
        t = self.recipe.distill.training
        return max(1, math.ceil(k * self.elastic_tokens() / (t.global_batch_size * t.seq_length)))

    # ---- running one CLI step ---------------------------------------------------------------------------------
    def step(self, name: str, argv: List[str], check: Optional[str] = None) -> None:
        """Run ``python -m pipeline <argv>`` unless its marker exists; ``check``: a file the step must leave."""
        marker = os.path.join(self.dir, "steps", f"{name}.json")
        if os.path.isfile(marker):
            print(f"[study] {name}: done (skipped)", flush=True)
            return
        if self.stopped:
            raise Interrupted(name)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        cmd = [self.args.python, "-m", "pipeline", *argv]
        print(f"[study] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        with open(os.path.join(self.dir, "logs", f"{name}.log"), "a") as log:
            self.child = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            rc = self.child.wait()
            self.child = None
        seconds = time.monotonic() - t0
        if self.stopped:
            raise Interrupted(name)
        if rc != 0 or (check and not os.path.exists(check)):
            tail = open(os.path.join(self.dir, "logs", f"{name}.log")).read().splitlines()[-5:]
            raise SystemExit(f"[study] {name} failed (exit {rc}); log {self.dir}/logs/{name}.log:\n  " + "\n  ".join(tail))
        with open(marker, "w") as f:
            json.dump({"argv": argv, "seconds": seconds}, f)
        print(f"[study] {name}: {seconds:.1f} s", flush=True)

    def terminate(self, *_) -> None:
        """SIGTERM / --time-limit: the running stage saves and exits; no new step starts."""
        self.stopped = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    # ---- the study --------------------------------------------------------------------------------------------
    def main_run(self, stage: str, *flags: str, sets: List[str] = ()) -> List[str]:
        """A step's argv: its flags, the study's overrides, then the step's own ``sets`` (they win)."""
        return [stage, "--recipe", self.args.recipe, *flags, *self.overrides, *sets]

    def accuracy(self, label: str, checkpoint: str, budget: str) -> None:
        """Greedy exact-match accuracy of ONE budget of an elastic directory: budget-eval's ``X->X`` row."""
        out = os.path.join(self.dir, "accuracy", label)
        self.step(f"accuracy-{label}", self.main_run("budget-eval", sets=[
            f"budget_eval.checkpoint={checkpoint}", f"budget_eval.budgets=[{budget}]",
            "budget_eval.token_budget_caps=[]", f"budget_eval.out={out}"]), os.path.join(out, "budget_eval.json"))

    def run(self) -> Dict:
        r, d = self.recipe, self.run_dir
        final = self.final
        self.step("data", self.main_run("data"))
        self.step("pretrain", self.main_run("pretrain"), final(self.name, "pretrain"))
        self.step("importance", self.main_run("importance"))
        self.step("stage1", self.main_run("stage1"), final(self.name, "stage1"))
        self.step("stage2", self.main_run("stage2"), final(self.name, "stage2"))
        self.step("qad", self.main_run("qad"), final(self.name, "qad"))
        self.step("evaluate", self.main_run("evaluate", "--trained", "stage2"), os.path.join(d, "evaluate", "stage2.json"))
        elastic, untrained = os.path.join(d, "elastic"), os.path.join(self.dir, "untrained")
        self.step("export", self.main_run("export", "--overwrite"), os.path.join(elastic, "elastic.json"))
        self.step("export-untrained", self.main_run("export", "--checkpoint", "importance", "--budgets", "stage2",
                                                    "--out", untrained, "--overwrite"))
        for b in self.budgets:
            self.accuracy(f"elastic-{b}", elastic, b)
        for b in self.budgets[1:]:
            self.accuracy(f"untrained-{b}", untrained, b)
        self.accuracy("parent", untrained, self.budgets[0])
        self.independent()
        self.step("budget-eval", self.main_run("budget-eval"), os.path.join(d, "budget_eval", "budget_eval.json"))
        results = build_results(self, self.read_json)
        paths = write_outputs(results, self.dir)
        print(f"[study] wrote {paths['json']}, {paths['md']} and {', '.join(paths['plots'])}", flush=True)
        return results

    def independent(self) -> None:
        """Prune to the router's subnet, KD from the parent with k x T tokens, per smaller budget and k."""
        importance = os.path.abspath(os.path.join(self.run_dir, "importance", "checkpoints"))
        for b in self.budgets[1:]:
            for k in self.args.indep_multiples:
                run = self.indep_run(b, k)
                common = [f"run.name={run}", f"data.output_dir={os.path.join(self.run_dir, 'data')}",
                          f"distill.budget={b}", f"distill.budgets_from={os.path.abspath(os.path.join(self.run_dir, 'stage2'))}",
                          f"distill.teacher={importance}", f"distill.training.init_from={importance}"]
                self.step(f"distill-{b}-x{k:g}", self.main_run("distill", sets=[
                    *common, f"distill.training.train_iters={self.distill_iters(k)}"]), self.final(run, "distill"))
                # the elastic arm's validation batches (stage 2's: same recipe section, same document order)
                self.step(f"evaluate-{run}", self.main_run("evaluate", "--trained", "distill", "--valid-as", "stage2",
                                                          "--parent", importance, sets=common),
                          os.path.join(self.root, run, "evaluate", "distill.json"))
                out = os.path.join(self.root, run, "elastic")
                self.step(f"export-{run}", self.main_run("export", "--checkpoint", "distill", "--overwrite", sets=common),
                          os.path.join(out, "elastic.json"))
                self.accuracy(f"independent-{b}-x{k:g}", out, b)

    def final(self, run: str, stage: str) -> str:
        """A training stage's ``final.json``: written only when it ran to train_iters (not when SIGTERM stopped it)."""
        return os.path.join(self.root, run, stage, "final.json")

    def indep_run(self, budget: str, k: float) -> str:
        return f"{self.name}-indep-{budget}-x{k:g}"

    def read_json(self, *parts: str):
        path = os.path.join(*parts)
        with open(path) as f:
            return json.load(f)


OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")  # key.path=value


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="default recipes/study.yaml (--scale tiny: recipes/tiny.yaml)")
    p.add_argument("--scale", choices=("study", "tiny"), default="study",
                   help="tiny: the tiny recipe with every stage cut to a few steps (CPU smoke)")
    p.add_argument("--root", default=None, help="run.root (default: the recipe's)")
    p.add_argument("--indep-multiples", type=float, nargs="+", default=[1.0],
                   help="token multiples k of T for the independent arm (k x T tokens per size; >1 finds where it catches up)")
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds: stop the running step (it saves) and exit 3")
    p.add_argument("--python", default=sys.executable, help="interpreter of the pipeline steps")
    p.add_argument("overrides", nargs="*", help="recipe overrides key.path=value (every step gets them)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # overrides first: after `--indep-multiples 1 3` argparse would read them as more multiples
    overrides = [a for a in argv if OVERRIDE.match(a)]
    return p.parse_args(overrides + [a for a in argv if not OVERRIDE.match(a)])


def main(argv=None) -> int:
    args = parse(argv)
    tiny = args.scale == "tiny"
    args.recipe = args.recipe or os.path.join("recipes", "tiny.yaml" if tiny else "study.yaml")
    overrides = (TINY if tiny else []) + ([f"run.root={args.root}"] if args.root else []) + list(args.overrides)
    from pipeline.errors import UserError

    try:
        study = Study(args, overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    before = {sig: signal.signal(sig, study.terminate) for sig in (signal.SIGTERM, signal.SIGALRM)}
    if args.time_limit > 0:
        signal.setitimer(signal.ITIMER_REAL, args.time_limit)
    try:
        study.run()
    except Interrupted as e:
        print(f"[study] stopped during {e}: re-run the same command to resume", flush=True)
        return 3
    finally:  # a caller (tests) gets its handlers back
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
