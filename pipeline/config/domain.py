"""Value domains of recipe keys, declared next to each field in ``schema.py``.

``value(default, ge=1)`` is a dataclass ``field`` whose metadata says which values the key accepts (range,
finiteness, a fixed set of choices, a name that becomes a path). ``check_domains`` walks a built recipe and
raises one ``UserError`` naming ``section.key`` and the bad value; relations between keys live in
``validate.py``. Both run before anything heavy (and at ``--dry-run``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple

from pipeline.errors import UserError


@dataclass(frozen=True)
class Domain:
    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    one_of: Tuple[Any, ...] = ()
    finite: bool = True  # floats: no NaN / inf
    name: bool = False  # a name that becomes a file or directory name
    nonempty: bool = False  # strings and lists

    def problem(self, v: Any) -> Optional[str]:
        """Why ``v`` is outside the domain (None when it is inside)."""
        if isinstance(v, list):
            if self.nonempty and not v:
                return "must not be empty"
            for i, item in enumerate(v):  # bounds of a list field apply to each item
                why = dataclasses.replace(self, nonempty=False).problem(item)
                if why:
                    return f"item [{i}] = {item!r} {why}"
            return None
        if self.one_of and v not in self.one_of:
            return f"expected one of {', '.join(map(str, self.one_of))}"
        if isinstance(v, str):
            if self.name:
                return path_name_problem(v)
            return "must not be empty" if self.nonempty and not v.strip() else None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return None
        if isinstance(v, float) and self.finite and not math.isfinite(v):
            return "must be a finite number"
        for bound, op, ok in ((self.ge, ">=", lambda a, b: a >= b), (self.gt, ">", lambda a, b: a > b),
                              (self.le, "<=", lambda a, b: a <= b), (self.lt, "<", lambda a, b: a < b)):
            if bound is not None and not ok(v, bound):
                return f"must be {op} {bound:g}"
        return None


def value(default: Any = dataclasses.MISSING, *, factory: Optional[Callable[[], Any]] = None, **domain) -> Any:
    """A dataclass field with a default (or ``factory`` for lists / dicts) and its domain."""
    meta = {"domain": Domain(**domain)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def path_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be one directory or file name (None when it can)."""
    if not name.strip():
        return "must not be empty"
    if "/" in name or "\\" in name or "\0" in name:
        return "must not contain a path separator"
    if name in (".", "..") or ".." in name:
        return "must not contain '..'"
    if name != name.strip():
        return "must not start or end with whitespace"
    return None


def check_domains(obj: Any, path: str = "", fail: Optional[Callable[[str], None]] = None) -> None:
    """Every field with a declared domain, recursively (sections, lists and dicts of sections)."""
    fail = fail or _raise
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{path}.{f.name}" if path else f.name
        domain = f.metadata.get("domain")
        if domain is not None:
            why = domain.problem(v)
            if why:
                shown = f"{v!r}" if not isinstance(v, list) else str(v)
                fail(f"{key} = {shown} {why}" if not why.startswith("expected") else f"{key} = {shown}, {why}")
        if dataclasses.is_dataclass(v):
            check_domains(v, key, fail)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if dataclasses.is_dataclass(item):
                    check_domains(item, f"{key}[{i}]", fail)
        elif isinstance(v, dict):
            for k, item in v.items():
                if dataclasses.is_dataclass(item):
                    check_domains(item, f"{key}.{k}", fail)


def _raise(msg: str) -> None:
    raise UserError(msg)


# ---- command-line flags (argparse ``type=``): a bad value becomes the parser's one-line error ----------------
def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return v


def nonempty_str(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def path_name(text: str) -> str:
    why = path_name_problem(text)
    if why:
        raise argparse.ArgumentTypeError(f"{text!r} {why}")
    return text
