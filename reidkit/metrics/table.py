"""Text tables of evaluation results (for the CLI, logs and READMEs)."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal

from .rank import EvalResult

__all__ = ["format_metrics_table", "format_percent"]


def format_percent(value: float, digits: int = 2) -> str:
    """``value`` (a fraction) in percent with ``digits`` decimals, rounding half up:
    ``0.0625 -> '6.25'``, ``0.06255 -> '6.26'`` (Python's ``format`` would round the binary
    float half to even). Every table, log line and report uses this, so they agree."""
    # 12 significant digits first: 100 * 0.1 is 10.000000000000002 in binary
    exact = Decimal(f"{100.0 * float(value):.12g}")
    return str(exact.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


_COLUMNS = (("mAP", None), ("R1", 1), ("R5", 5), ("R10", 10), ("mINP", None))


def _cell(res: EvalResult, col: str, k: int | None, digits: int) -> str:
    if col == "mAP":
        v = res.mAP
    elif col == "mINP":
        v = res.mINP
    else:
        assert k is not None
        if k > len(res.cmc):
            return "-"
        v = res.rank(k)
    return format_percent(v, digits)


def format_metrics_table(
    results: Mapping[str, EvalResult] | EvalResult, digits: int = 2, name_header: str = "model"
) -> str:
    """A Markdown table with one row per model: mAP, R1, R5, R10, mINP in percent.

    Args:
        results: ``{name: EvalResult}`` (row order kept) or a single result (one row
            named ``"result"``).
        digits: decimals per value.
        name_header: header of the first column.

    Returns:
        The table as a string (no trailing newline); ranks beyond ``max_rank`` print
        ``-``.
    """
    if isinstance(results, EvalResult):
        results = {"result": results}
    if not isinstance(results, Mapping):
        raise TypeError(
            f"results must be an EvalResult or a dict of them, got {type(results).__name__}"
        )
    for name, res in results.items():
        if not isinstance(res, EvalResult):
            raise TypeError(f"results[{name!r}] is {type(res).__name__}, expected EvalResult")
    header = [name_header] + [c for c, _ in _COLUMNS]
    rows = [[str(n)] + [_cell(r, c, k, digits) for c, k in _COLUMNS] for n, r in results.items()]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
