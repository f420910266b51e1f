"""The accuracy-latency plane: which configurations are Pareto-optimal, and the PNG of it."""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

from pipeline.errors import UserError


def pareto_front(points: Sequence[Tuple[float, float]]) -> Set[int]:
    """Indices of the (latency, accuracy) points no other point dominates (no slower and no less
    accurate, and better in one of the two)."""
    front = set()
    for i, (t, a) in enumerate(points):
        if not any((t2 <= t and a2 >= a) and (t2 < t or a2 > a) for j, (t2, a2) in enumerate(points) if j != i):
            front.add(i)
    return front


COLORS = {"think-small": "tab:blue", "same": "tab:green", "inverse": "tab:red", "token-budget": "tab:orange"}


def plot(rows: List[Dict], path: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UserError(f"matplotlib is not installed (pip install matplotlib): {path} not written; the table "
                        "is in budget_eval.json beside it") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for kind, color in COLORS.items():
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter([r["seconds_per_problem"] for r in pts], [r["accuracy"] for r in pts], c=color, label=kind,
                       zorder=3)
    for r in rows:
        ax.annotate(r["label"], (r["seconds_per_problem"], r["accuracy"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    front = sorted((r["seconds_per_problem"], r["accuracy"]) for r in rows if r.get("pareto"))
    if front:
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="black", linewidth=1, label="Pareto front", zorder=2)
        ax.scatter(xs, ys, facecolors="none", edgecolors="black", s=120, zorder=4)
    ax.set_xlabel("wall time per problem (s)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
