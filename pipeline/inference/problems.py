"""Held-out problems with checkable answers for budget-eval.

Generated: the data stage's reasoning generator (``data_prep.demo_corpus``) with a seed no data source
uses, and any question that also occurs in the recipe's demo training sources dropped (the problem space
of a few kinds is small; an exact repeat would not be held out). Or a user's JSONL: one
``{"prompt": ..., "answer": ...}`` per line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import List, Set

from pipeline.errors import UserError


@dataclass(frozen=True)
class EvalProblem:
    prompt: str
    answer: str
    kind: str = ""


def training_questions(recipe) -> Set[str]:
    """Every question of the recipe's generated demo sources (what the data stage trains on)."""
    from data_prep import demo_corpus

    c = recipe.data.demo_corpus
    out: Set[str] = set()
    for src in recipe.data.sources:
        if src.demo:
            out.update(p.question for p in demo_corpus.problems(c.records, demo_corpus.source_seed(c.seed, src.name)))
    return out


def training_seeds(recipe) -> Set[int]:
    from data_prep import demo_corpus

    return {demo_corpus.source_seed(recipe.data.demo_corpus.seed, s.name) for s in recipe.data.sources if s.demo}


def generated(n: int, seed: int, exclude: Set[str]) -> List[EvalProblem]:
    """``n`` problems of the reasoning generator at ``seed`` whose question is not in ``exclude``."""
    from data_prep import demo_corpus

    out: List[EvalProblem] = []
    for p in demo_corpus.problems(50 * n + 100, seed):
        if p.question not in exclude:
            out.append(EvalProblem(p.question, p.answer, p.kind))
            if len(out) == n:
                return out
    raise UserError(f"budget_eval.seed = {seed}: fewer than {n} problems not seen in training")


def from_jsonl(path: str, limit: int = 0) -> List[EvalProblem]:
    out: List[EvalProblem] = []
    try:
        with open(path, encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    out.append(EvalProblem(str(rec["prompt"]), str(rec["answer"]), str(rec.get("kind", ""))))
                except (ValueError, KeyError, TypeError) as e:
                    raise UserError(f"{path}:{no}: expected a JSON object with prompt and answer ({e})") from None
                if limit and len(out) == limit:
                    break
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not out:
        raise UserError(f"{path}: no problems")
    return out


_ANSWER = re.compile(r"answer is\s*:?\s*([^\n]*)", re.IGNORECASE)
_LAST = re.compile(r"\[[^\]]*\]|-?\d+")


def _norm(s: str) -> str:
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def extract(text: str) -> str:
    """The final answer of a response: after "answer is", else the last number or list in it."""
    m = _ANSWER.search(text)
    if m and m.group(1).strip():
        return m.group(1).strip().rstrip(".")
    found = _LAST.findall(text)
    return found[-1] if found else ""


def correct(text: str, answer: str) -> bool:
    got = extract(text)
    return bool(got) and _norm(got) == _norm(answer)
