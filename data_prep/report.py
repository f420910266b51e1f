"""What the data stage did: documents read / written / dropped by reason (with file:line examples), tokens.

Every dropped record goes to ``dropped.tsv`` (location, reason, detail); the printed report shows the first
few per reason. For each source ``read == written + sum(dropped)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List

from data_prep.formats import DROP_REASONS

EXAMPLES_PER_REASON = 5


@dataclass
class SourceReport:
    name: str
    path: str
    format: str
    read: int = 0
    written: int = 0
    tokens: int = 0
    seconds: float = 0.0
    dropped: Dict[str, int] = field(default_factory=dict)
    examples: Dict[str, List[str]] = field(default_factory=dict)  # reason -> ["path:line: detail", ...]
    notes: List[str] = field(default_factory=list)
    reused: bool = False  # up to date from an earlier run (not re-tokenized)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def drop(self, location: str, reason: str, detail: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES_PER_REASON:
            examples.append(f"{location}: {detail}" if detail else location)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SourceReport":
        return cls(**d)


@dataclass
class Report:
    sources: List[SourceReport] = field(default_factory=list)
    tokenizer: str = ""
    workers: int = 0
    seconds: float = 0.0
    calibration_tokens: int = 0

    @property
    def tokenized(self) -> List[SourceReport]:
        return [s for s in self.sources if not s.reused]

    def tokens_per_second(self) -> float:
        """Tokens written per second of tokenization, over the sources tokenized in this run."""
        secs = sum(s.seconds for s in self.tokenized)
        return sum(s.tokens for s in self.tokenized) / secs if secs else 0.0

    def to_dict(self) -> dict:
        return {
            "tokenizer": self.tokenizer,
            "workers": self.workers,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second(), 1),
            "calibration_tokens": self.calibration_tokens,
            "totals": {k: sum(getattr(s, k) for s in self.sources) for k in ("read", "written", "tokens")}
            | {"dropped": sum(s.dropped_total for s in self.sources)},
            "sources": [s.to_dict() for s in self.sources],
        }

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def format(self) -> str:
        lines = [f"{'source':<20} {'read':>10} {'written':>10} {'dropped':>9} {'tokens':>13} {'tok/s':>11}"]
        for s in self.sources:
            rate = "(reused)" if s.reused else f"{s.tokens / s.seconds:,.0f}" if s.seconds else "-"
            lines.append(f"{s.name:<20} {s.read:>10,} {s.written:>10,} {s.dropped_total:>9,} {s.tokens:>13,} "
                         f"{rate:>11}")
        t = self.to_dict()["totals"]
        rate = f"{self.tokens_per_second():,.0f}" if self.tokenized else "(reused)"
        lines.append(f"{'total':<20} {t['read']:>10,} {t['written']:>10,} {t['dropped']:>9,} {t['tokens']:>13,} "
                     f"{rate:>11}")
        for s in self.sources:
            for note in s.notes:
                lines.append(f"note [{s.name}]: {note}")
            for reason, n in sorted(s.dropped.items()):
                lines.append(f"dropped [{s.name}] {n:,} x {reason} ({DROP_REASONS[reason]}), e.g.:")
                lines += [f"    {e}" for e in s.examples[reason]]
        lines.append(f"calibration subset: {self.calibration_tokens:,} tokens; "
                     f"{self.workers} tokenizer worker(s); {self.seconds:.1f} s in all")
        return "\n".join(lines)
