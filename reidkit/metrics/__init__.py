"""Ranking evaluation (CMC / mAP / mINP), distances, re-ranking and reporting.

Main entry points:

- :func:`evaluate_rank` (distance matrix in) and :func:`evaluate_features` (features in,
  chunked, never the full ``Q x G`` matrix) return an :class:`EvalResult`;
- :func:`compute_distance` (``"euclidean"`` is the true, not squared, distance;
  ``"cosine"`` is ``1 - cos``);
- :func:`re_ranking` (k-reciprocal, dense, original semantics) and
  :func:`re_ranking_features` (sparse, for MSMT17-size sets);
  :func:`average_query_expansion` (alpha-QE);
- :func:`evaluate_market_official` (trapezoid AP, MATLAB numbers),
  :func:`evaluate_cuhk03_classic` (single-gallery-shot CMC, 10 seeded repeats);
- :func:`format_metrics_table`, :func:`plot_cmc`.
"""

from .cuhk03 import evaluate_cuhk03_classic
from .distance import METRICS, Metric, compute_distance, l2_normalize
from .market_official import evaluate_market_official
from .plot import plot_cmc
from .rank import APMode, EvalResult, RankAccumulator, evaluate_features, evaluate_rank
from .rerank import (
    average_query_expansion,
    iter_re_ranking_features,
    re_ranking,
    re_ranking_features,
)
from .table import format_metrics_table

__all__ = [
    "APMode",
    "EvalResult",
    "METRICS",
    "Metric",
    "RankAccumulator",
    "average_query_expansion",
    "compute_distance",
    "evaluate_cuhk03_classic",
    "evaluate_features",
    "evaluate_market_official",
    "evaluate_rank",
    "format_metrics_table",
    "iter_re_ranking_features",
    "l2_normalize",
    "plot_cmc",
    "re_ranking",
    "re_ranking_features",
]
