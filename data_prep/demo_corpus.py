"""A deterministic reasoning corpus: multi-step arithmetic and list problems with a worked trace.

Every problem has a question, a step-by-step trace (what goes between ``<think>`` and ``</think>``) and a
checkable final answer, so the demo, the budget-control evaluation and the tests need no downloads.
Records come in the two formats the data stage reads:

- chat: ``{"messages": [{"role": "user", "content": Q},
  {"role": "assistant", "reasoning_content": TRACE, "content": "The answer is A."}], "answer": A}``
- text: ``{"text": "Problem: Q\\nReasoning:\\nTRACE\\nAnswer: A\\n", "answer": A}``

The same (seed, index) always gives the same problem (``random.Random`` with an integer seed is stable).
"""

from __future__ import annotations

import json
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List


@dataclass(frozen=True)
class Problem:
    kind: str
    question: str
    steps: List[str]
    answer: str

    @property
    def trace(self) -> str:
        return "\n".join(self.steps)


def _fmt(xs: List[int]) -> str:
    return "[" + ", ".join(str(x) for x in xs) + "]"


def _arithmetic(rng: random.Random) -> Problem:
    start = value = rng.randint(2, 99)
    ops = []
    words = {"+": "add", "-": "subtract", "*": "multiply by"}
    steps = [f"Start with {value}."]
    for _ in range(rng.randint(2, 6)):
        op = rng.choice("+-*" if abs(value) < 1000 else "+-")
        arg = rng.randint(2, 9) if op == "*" else rng.randint(1, 99)
        new = value + arg if op == "+" else value - arg if op == "-" else value * arg
        steps.append(f"{value} {op} {arg} = {new}.")
        ops.append(f"{words[op]} {arg}")
        value = new
    question = f"Start with {start}, then {', then '.join(ops)}. What is the result?"
    return Problem("arithmetic", question, steps, str(value))


def _sort(rng: random.Random) -> Problem:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
    rest, done, steps = list(xs), [], []
    while rest:
        smallest = min(rest)
        rest.remove(smallest)
        done.append(smallest)
        steps.append(f"The smallest of what is left is {smallest}; sorted so far {_fmt(done)}.")
    return Problem("sort", f"Sort the list {_fmt(xs)} in ascending order.", steps, _fmt(done))


def _even_sum(rng: random.Random) -> Problem:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
    total, steps = 0, []
    for x in xs:
        if x % 2:
            steps.append(f"{x} is odd, skip it; the total stays {total}.")
        else:
            steps.append(f"{x} is even: {total} + {x} = {total + x}.")
            total += x
    return Problem("even_sum", f"What is the sum of the even numbers in {_fmt(xs)}?", steps, str(total))


def _maximum(rng: random.Random) -> Problem:
    xs = [rng.randint(0, 999) for _ in range(rng.randint(3, 8))]
    best, steps = xs[0], [f"Begin with the first number, {xs[0]}."]
    for x in xs[1:]:
        if x > best:
            steps.append(f"{x} is larger than {best}, so the largest so far is {x}.")
            best = x
        else:
            steps.append(f"{x} is not larger than {best}; keep {best}.")
    return Problem("maximum", f"Find the largest number in {_fmt(xs)}.", steps, str(best))


def _reverse(rng: random.Random) -> Problem:
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    done, steps = [], []
    for x in reversed(xs):
        done.append(x)
        steps.append(f"Take {x} from the end; reversed so far {_fmt(done)}.")
    return Problem("reverse", f"Reverse the list {_fmt(xs)}.", steps, _fmt(done))


def _count(rng: random.Random) -> Problem:
    target = rng.randint(0, 9)
    xs = [rng.choice([target, rng.randint(0, 9)]) for _ in range(rng.randint(4, 9))]
    n, steps = 0, []
    for x in xs:
        if x == target:
            n += 1
            steps.append(f"{x} matches, count {n}.")
        else:
            steps.append(f"{x} does not match, count stays {n}.")
    return Problem("count", f"How many times does {target} appear in {_fmt(xs)}?", steps, str(n))


KINDS: Dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": _arithmetic,
    "sort": _sort,
    "even_sum": _even_sum,
    "maximum": _maximum,
    "reverse": _reverse,
    "count": _count,
}


def problems(n: int, seed: int) -> Iterator[Problem]:
    """``n`` problems, kinds drawn uniformly; deterministic in ``seed``."""
    rng = random.Random(seed)
    kinds = sorted(KINDS)
    for _ in range(n):
        yield KINDS[rng.choice(kinds)](rng)


def chat_record(p: Problem) -> dict:
    return {
        "messages": [
            {"role": "user", "content": p.question},
            {"role": "assistant", "reasoning_content": p.trace, "content": f"The answer is {p.answer}."},
        ],
        "kind": p.kind,
        "answer": p.answer,
    }


def text_record(p: Problem) -> dict:
    return {"text": f"Problem: {p.question}\nReasoning:\n{p.trace}\nAnswer: {p.answer}\n", "kind": p.kind,
            "answer": p.answer}


def source_seed(seed: int, source_name: str) -> int:
    """Each demo source draws its own stream, so two sources never repeat each other's problems."""
    return seed * 1_000_003 + zlib.crc32(source_name.encode())


def write_jsonl(path: str, fmt: str, n: int, seed: int) -> int:
    """Write ``n`` records of format ``fmt`` (text | chat); returns the bytes written."""
    to_record = chat_record if fmt == "chat" else text_record
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in problems(n, seed):
            line = json.dumps(to_record(p), ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line)
    return size
