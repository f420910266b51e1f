"""budget-eval: every think/answer budget configuration on the same problems; accuracy, tokens, latency.

Configurations, budgets ordered by active parameters (L the largest, S the smallest):
- every S->L pair (think with the smaller, answer with the larger budget);
- L->L, S->S and L->S (the references and the inverse), with the same thinking cap as the pairs;
- the default token-budget control: L->L with each cap of ``token_budget_caps`` (think until the cap, then
  a forced ``</think>`` and the answer).
A pair re-prefills the context on the answering model; a same-model configuration continues on its cache
(pipeline/inference/control.py says why).
Each problem runs greedy and alone (batch 1): wall time per problem is a request's latency.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from pipeline.inference.chat import encode, render_prompt, special_tokens
from pipeline.inference.control import Sampling, think_then_answer
from pipeline.inference.problems import EvalProblem, correct


@dataclass(frozen=True)
class Config:
    label: str
    think: str
    answer: str
    think_cap: int
    kind: str  # think-small (S->L) | same (L->L, S->S) | inverse (L->S) | token-budget (L->L at a cap)


def configurations(names: List[str], think_cap: int, caps: List[int]) -> List[Config]:
    """``names`` largest first."""
    L, S = names[0], names[-1]
    out = [Config(f"{names[j]}->{names[i]}", names[j], names[i], think_cap, "think-small")
           for i in range(len(names)) for j in range(len(names)) if j > i]
    out += [Config(f"{L}->{L}", L, L, think_cap, "same")]
    if S != L:
        out += [Config(f"{S}->{S}", S, S, think_cap, "same"), Config(f"{L}->{S}", L, S, think_cap, "inverse")]
    out += [Config(f"{L}->{L} cap {c}", L, L, c, "token-budget") for c in caps]
    return out


def warm_up(family, names: List[str], prompt_ids: List[int], special) -> None:
    """One short generation per budget before timing (kernel selection, allocator, lazy inits)."""
    from pipeline.inference.control import _generate

    for n in names:
        _generate(family.model(n), prompt_ids, 4, special.stop, special, Sampling())


def run(family, problems: List[EvalProblem], configs: List[Config], answer_tokens: int,
        log=print) -> List[Dict]:
    tok = family.tokenizer
    special = special_tokens(tok, family.dir)
    prompts = [encode(tok, render_prompt(tok, p.prompt)) for p in problems]
    warm_up(family, sorted({c.think for c in configs} | {c.answer for c in configs}), prompts[0], special)
    rows = []
    for c in configs:
        results = [think_then_answer(family.model(c.think), family.model(c.answer), tok, special, ids, c.think_cap,
                                     Sampling(max_new_tokens=answer_tokens)) for ids in prompts]
        ok = [correct(r.answer_text, p.answer) for r, p in zip(results, problems)]
        seconds = sum(r.seconds for r in results)
        rows.append({
            **asdict(c), "problems": len(problems), "correct": sum(ok), "accuracy": sum(ok) / len(problems),
            "think_tokens": statistics.mean(len(r.think_ids) for r in results),
            "answer_tokens": statistics.mean(len(r.answer_ids) for r in results),
            "closed_by_model": statistics.mean(float(r.closed_by_model) for r in results),
            "seconds_per_problem": seconds / len(problems),
            "tokens_per_s": sum(r.generated for r in results) / seconds if seconds else 0.0,
            "think_active_params": family.active_params(c.think),
            "answer_active_params": family.active_params(c.answer),
            "example": {"prompt": problems[0].prompt, "expected": problems[0].answer,
                        "think": results[0].think_text[:400], "answer": results[0].answer_text[:200]},
        })
        log(format_row(rows[-1]))
    return rows


HEADER = (f"{'configuration':<24} {'accuracy':>9} {'think tok':>9} {'answer tok':>10} {'closed':>6} "
          f"{'s/problem':>9} {'tok/s':>8}")


def format_row(r: Dict) -> str:
    return (f"{r['label']:<24} {r['accuracy']:>9.3f} {r['think_tokens']:>9.1f} {r['answer_tokens']:>10.1f} "
            f"{r['closed_by_model']:>6.2f} {r['seconds_per_problem']:>9.3f} {r['tokens_per_s']:>8.1f}")


def format_table(rows: List[Dict]) -> str:
    return "\n".join([HEADER] + [format_row(r) for r in rows])


def write(out_dir: str, rows: List[Dict], meta: Dict, title: Optional[str] = None) -> Dict[str, str]:
    """budget_eval.json (meta + rows) and pareto.png; returns their paths."""
    from pipeline.inference.pareto import pareto_front, plot

    os.makedirs(out_dir, exist_ok=True)
    front = pareto_front([(r["seconds_per_problem"], r["accuracy"]) for r in rows])
    for i, r in enumerate(rows):
        r["pareto"] = i in front
    paths = {"json": os.path.join(out_dir, "budget_eval.json"), "png": os.path.join(out_dir, "pareto.png")}
    with open(paths["json"] + ".tmp", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=2)
    os.replace(paths["json"] + ".tmp", paths["json"])
    plot(rows, paths["png"], title or "budget control: accuracy vs latency")
    return paths
