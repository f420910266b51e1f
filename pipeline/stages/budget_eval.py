"""``budget-eval``: every think/answer budget configuration on held-out problems (docs/budget_control.md).

    python -m pipeline budget-eval --recipe R.yaml [budget_eval.num_problems=64 ...]

Writes ``budget_eval.json`` (one row per configuration: accuracy, thinking and answer tokens, wall time per
problem, tokens/s, Pareto flag) and ``pareto.png`` (the accuracy-latency plane) to ``budget_eval.out``
(default ``<root>/<name>/budget_eval``) and prints the table.
"""

from __future__ import annotations

import os

from pipeline.errors import UserError


def _plan(recipe):
    """(checkpoint dir, output dir): every budget_eval value checked before anything loads."""
    from pipeline.inference.problems import training_seeds

    c = recipe.budget_eval
    for key in ("num_problems", "think_tokens", "answer_tokens"):
        if getattr(c, key) < 1:
            raise UserError(f"budget_eval.{key} = {getattr(c, key)} must be >= 1")
    if any(cap < 1 for cap in c.token_budget_caps):
        raise UserError(f"budget_eval.token_budget_caps = {c.token_budget_caps}: every cap must be >= 1")
    if c.dtype not in ("auto", "bf16", "fp32", "fp16"):
        raise UserError(f"budget_eval.dtype = {c.dtype!r}: auto | bf16 | fp32 | fp16")
    if c.engine not in ("views", "sliced"):
        raise UserError(f"budget_eval.engine = {c.engine!r}: views | sliced")
    if c.problems and not os.path.isfile(c.problems):
        raise UserError(f"budget_eval.problems = {c.problems}: no such file")
    if not c.problems and c.seed in training_seeds(recipe):
        raise UserError(f"budget_eval.seed = {c.seed} is a data source's generator seed: pick another")
    ckpt = c.checkpoint or os.path.join(recipe.run.root, recipe.run.name, "elastic")
    if not os.path.isdir(ckpt):
        raise UserError(f"budget_eval.checkpoint: {ckpt} does not exist (run `python -m pipeline export` first)")
    return ckpt, c.out or os.path.join(recipe.run.root, recipe.run.name, "budget_eval")


def dry_run(recipe, args) -> None:
    ckpt, out = _plan(recipe)
    print(f"# budget-eval of {ckpt} -> {out}")


def main(recipe, args) -> None:
    from pipeline.inference import budget_eval, problems
    from pipeline.inference.family import Family

    c = recipe.budget_eval
    ckpt, out = _plan(recipe)
    family = Family.load(ckpt, c.device, c.dtype, c.engine)
    names = [n for n in family.names if family.budget(n).subnet.homogeneous]
    if c.budgets:
        unknown = [n for n in c.budgets if n not in family.names]
        if unknown:
            raise UserError(f"budget_eval.budgets: {unknown} not in {ckpt}/elastic.json ({', '.join(family.names)})")
        names = [n for n in names if n in c.budgets]
    if c.problems:
        probs, source = problems.from_jsonl(c.problems, c.num_problems), c.problems
    else:
        probs = problems.generated(c.num_problems, c.seed, problems.training_questions(recipe))
        source = f"data_prep.demo_corpus seed {c.seed} (training questions excluded)"
    configs = budget_eval.configurations(names, c.think_tokens, c.token_budget_caps)
    print(f"# budget-eval: {len(probs)} problems ({source}), {len(configs)} configurations, "
          f"{family.device} {str(family.full.dtype).replace('torch.', '')}, engine {c.engine}, checkpoint {ckpt}")
    print(budget_eval.HEADER)
    rows = budget_eval.run(family, probs, configs, c.answer_tokens)
    meta = {"checkpoint": os.path.abspath(ckpt), "problems": source, "num_problems": len(probs),
            "device": str(family.device), "dtype": str(family.full.dtype), "engine": c.engine,
            "think_tokens": c.think_tokens,
            "answer_tokens": c.answer_tokens, "budgets": {n: family.active_params(n) for n in names}}
    paths = budget_eval.write(out, rows, meta, f"{recipe.run.name}: accuracy vs latency ({len(probs)} problems)")
    print(f"# Pareto front: {', '.join(r['label'] for r in rows if r['pareto'])}")
    print(f"# wrote {paths['json']} and {paths['png']}")
