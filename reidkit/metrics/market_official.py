"""The official Market-1501 evaluation (Zheng et al., ICCV 2015, MATLAB ``compute_AP.m``).

Differences from the standard Python evaluators (torchreid / fast-reid):

- AP uses the trapezoid rule: for the ``i``-th hit (1-based) at rank ``r_i`` among kept
  images, ``AP += (1/ngood) * (p_{i-1} + p_i) / 2`` with ``p_i = i / r_i`` and
  ``p_{i-1} = (i-1) / (r_i - 1)`` (1 when ``r_i = 1``). It is never below the standard AP.
- Gallery images of pid ``-1`` ("junk", the ``-1_c*`` files) are removed for every
  query, besides same-pid same-camera images. Distractors (pid 0) are negatives.

Use this to compare with numbers published from the MATLAB code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .rank import EvalResult, evaluate_rank

__all__ = ["evaluate_market_official", "MARKET_JUNK_PID"]

MARKET_JUNK_PID = -1


def evaluate_market_official(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    junk_pid: int | None = MARKET_JUNK_PID,
) -> EvalResult:
    """Market-1501 official protocol: trapezoid AP, pid ``junk_pid`` gallery ignored.

    Args:
        distmat: ``(Q, G)`` distances.
        q_pids, g_pids: ``(Q,)`` / ``(G,)`` identity labels.
        q_camids, g_camids: ``(Q,)`` / ``(G,)`` camera ids (required by this protocol).
        max_rank: CMC length.
        junk_pid: gallery pid treated as junk (None: none).
    """
    if q_camids is None or g_camids is None:
        raise ValueError("the Market-1501 official protocol needs q_camids and g_camids")
    ignore = () if junk_pid is None else (junk_pid,)
    return evaluate_rank(
        distmat,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank,
        ap_mode="trapezoid",
        ignore_gallery_pids=ignore,
    )
