"""CMC curve plots (matplotlib: a core dependency, imported lazily)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .rank import EvalResult

__all__ = ["plot_cmc"]


def plot_cmc(
    results: Mapping[str, EvalResult] | EvalResult,
    max_rank: int | None = None,
    path: str | Path | None = None,
    title: str | None = "CMC",
    ax: Any = None,
    percent: bool = True,
) -> Any:
    """Plot CMC curves (rank 1..max_rank) of one or several results.

    Args:
        results: ``{label: EvalResult}`` or a single result.
        max_rank: last rank shown (default: the shortest curve's length).
        path: save the figure there (format from the suffix, e.g. ``.png``, ``.pdf``).
        title: axes title (None: none).
        ax: a matplotlib Axes to draw on (default: a new figure).
        percent: y axis in percent (else fractions).

    Returns:
        The matplotlib ``Figure``. Legend labels include R1 and mAP.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_cmc needs matplotlib: pip install 'reidkit[plot]' (or matplotlib)"
        ) from exc
    if isinstance(results, EvalResult):
        results = {"model": results}
    if not results:
        raise ValueError("plot_cmc: no results given")
    n = min(len(r.cmc) for r in results.values())
    if max_rank is not None:
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        n = min(n, max_rank)
    scale = 100.0 if percent else 1.0
    if ax is None:  # a bare Figure: no pyplot state, works headless
        fig = Figure(figsize=(5, 4))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    ranks = list(range(1, n + 1))
    for label, res in results.items():
        ax.plot(
            ranks,
            res.cmc[:n] * scale,
            marker="." if n <= 30 else None,
            label=f"{label} (R1 {res.cmc[0] * 100:.1f}, mAP {res.mAP * 100:.1f})",
        )
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)" if percent else "matching rate")
    ax.set_xlim(1, max(n, 2))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    if path is not None:
        fig.savefig(str(path), bbox_inches="tight", dpi=150)
    return fig
