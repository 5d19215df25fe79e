"""Model evaluation: extract query/gallery features (sharded over ranks under DDP) and
compute CMC / mAP / mINP with :mod:`reidkit.metrics`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reidkit.config import Config
from reidkit.data.records import ImageRecord, ReIDDataset
from reidkit.engine import distributed as dist_utils
from reidkit.engine.extract import FeatureSet, extract_features

__all__ = ["EvalResult", "evaluate_model", "evaluate_feature_sets", "extract_records"]


@dataclass
class EvalResult:
    """Metrics of one evaluation.

    ``metrics``: ``{"mAP", "mINP", "rank1", "rank5", "rank10"}`` as fractions in [0, 1];
    ``cmc``: (max_rank,) CMC curve; ``query`` / ``gallery``: the features evaluated;
    ``raw``: the :class:`reidkit.metrics.rank.EvalResult` of the evaluation.
    """

    metrics: dict[str, float]
    cmc: torch.Tensor
    query: FeatureSet | None = None
    gallery: FeatureSet | None = None
    raw: Any = field(default=None, repr=False)
    rerank: bool = False

    def table(self, title: str = "") -> str:
        """The metrics as a printable table (``reidkit.metrics.format_metrics_table``)."""
        from reidkit.metrics.table import format_metrics_table

        return format_metrics_table({title or "result": self.raw})


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu()
    return torch.as_tensor(x, dtype=torch.float32)


def _summary(raw: Any) -> tuple[dict[str, float], torch.Tensor]:
    cmc = _to_tensor(raw.cmc).flatten()
    metrics = {"mAP": float(raw.mAP), "mINP": float(raw.mINP)}
    for k in (1, 5, 10):
        if cmc.numel() >= k:
            metrics[f"rank{k}"] = float(cmc[k - 1])
    return metrics, cmc


def evaluate_feature_sets(
    query: FeatureSet,
    gallery: FeatureSet,
    metric: str = "cosine",
    max_rank: int = 50,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> EvalResult:
    """Metrics of ``query`` against ``gallery`` features (optionally k-reciprocal re-ranked,
    with ``metric`` as the base distance)."""
    from reidkit.metrics.rank import evaluate_features, evaluate_rank
    from reidkit.metrics.rerank import re_ranking_features

    q_camids, g_camids = query.camids, gallery.camids
    if bool((q_camids < 0).all()) and bool((g_camids < 0).all()):
        # No camera ids (e.g. a custom dataset without them): filtering "same pid and same
        # camera" would drop every true match, so evaluate without camera filtering.
        q_camids = g_camids = None
    if rerank:
        distmat = re_ranking_features(
            query.feats, gallery.feats, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric
        )
        raw = evaluate_rank(
            distmat, query.pids, gallery.pids, q_camids, g_camids, max_rank=max_rank
        )
    else:
        raw = evaluate_features(
            query.feats,
            gallery.feats,
            query.pids,
            gallery.pids,
            q_camids,
            g_camids,
            metric=metric,
            max_rank=max_rank,
        )
    metrics, cmc = _summary(raw)
    return EvalResult(metrics, cmc, query, gallery, raw, rerank)


def extract_records(
    cfg: Config,
    model: nn.Module,
    records: list[ImageRecord],
    device: torch.device,
    progress: bool = False,
) -> FeatureSet:
    """Features of ``records`` in order; under DDP each rank extracts a contiguous shard
    and the shards are all-gathered, so every rank returns the full set."""
    from reidkit.data.loader import build_test_loader

    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    shard = records
    if world > 1 and len(records) >= world:
        start, end = dist_utils.shard_bounds(len(records), rank, world)
        shard = records[start:end]
    loader = build_test_loader(cfg, shard)
    fs = extract_features(
        model,
        loader,
        device,
        flip=cfg.test.flip,
        feature=cfg.test.feature,
        normalize=cfg.test.normalize,
        amp=cfg.amp,
        channels_last=cfg.channels_last,
        progress=progress,
    )
    feats = fs.feats
    if world > 1 and len(records) >= world:
        feats = dist_utils.all_gather_variable(feats.to(device)).cpu()
    if feats.shape[0] != len(records):
        raise RuntimeError(
            f"extract_records: got {feats.shape[0]} features for {len(records)} images "
            "(the test loader must yield every record exactly once, in order)"
        )
    return FeatureSet(
        feats,
        torch.tensor([r.pid for r in records], dtype=torch.long),
        torch.tensor([r.camid for r in records], dtype=torch.long),
        [r.path for r in records],
    )


def evaluate_model(
    cfg: Config,
    model: nn.Module,
    dataset: ReIDDataset,
    device: str | torch.device | None = None,
    rerank: bool | None = None,
    progress: bool = False,
) -> EvalResult | None:
    """Extract ``dataset.query`` / ``dataset.gallery`` features with ``cfg.test`` options and
    evaluate them. Under DDP every rank must call this; rank 0 gets the result, the other
    ranks ``None``. ``rerank`` defaults to ``cfg.test.rerank``."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if not dataset.query or not dataset.gallery:
        raise ValueError(
            f"dataset '{dataset.name}' at {dataset.root}: empty query ({len(dataset.query)}) "
            f"or gallery ({len(dataset.gallery)}) split"
        )
    query = extract_records(cfg, model, dataset.query, device, progress)
    gallery = extract_records(cfg, model, dataset.gallery, device, progress)
    if dist_utils.get_rank() != 0:
        return None
    result = evaluate_feature_sets(
        query,
        gallery,
        metric=cfg.test.metric,
        max_rank=cfg.test.max_rank,
        rerank=cfg.test.rerank if rerank is None else rerank,
        k1=cfg.test.rerank_k1,
        k2=cfg.test.rerank_k2,
        lambda_value=cfg.test.rerank_lambda,
    )
    if int(getattr(model, "num_branches", 1)) > 1 and hasattr(model, "forward_maps"):
        result.metrics["branch_overlap"] = _branch_overlap(cfg, model, dataset.query, device)
    return result


def _branch_overlap(cfg: Config, model: nn.Module, records: list[ImageRecord], device) -> float:
    """Mean top-k CAM IoU between branches on (up to 4 batches of) the query set, printed so
    a multi-branch run shows whether its branches look at different regions (CAMA's OAP)."""
    from reidkit.data.loader import build_test_loader
    from reidkit.viz.overlap import (
        branch_overlap_matrix,
        format_branch_overlap,
        mean_pairwise_overlap,
    )

    mat = branch_overlap_matrix(
        model, build_test_loader(cfg, records), max_batches=4, device=device
    )
    print(format_branch_overlap(mat, getattr(model, "oap_k", None)))
    return mean_pairwise_overlap(mat)
