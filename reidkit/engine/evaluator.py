"""Model evaluation: extract query/gallery features (sharded over ranks under DDP) and
compute CMC / mAP / mINP with :mod:`reidkit.metrics`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reidkit.config import Config
from reidkit.data.records import ImageRecord, ReIDDataset
from reidkit.engine import distributed as dist_utils
from reidkit.engine.extract import FeatureSet, extract_features

__all__ = [
    "EvalResult",
    "evaluate_model",
    "evaluate_feature_sets",
    "extract_records",
    "result_distances",
]


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
    notes: list[str] = field(default_factory=list)
    dataset: str = ""  # name of the evaluated dataset (the table's row label)

    def label(self) -> str:
        """What was evaluated: the dataset name, plus ``re-ranked`` when it was."""
        return (self.dataset or "result") + (" re-ranked" if self.rerank else "")

    def table(self, title: str = "") -> str:
        """The metrics as a printable table (``reidkit.metrics.format_metrics_table``)
        with one row labelled ``title`` (default: :meth:`label`, the same for ``reidkit
        train``, ``eval``, ``report`` and the Python API); a result without ranking (a
        method that is not a re-ID model) lists its metrics."""
        from reidkit.metrics.table import format_metrics_table

        if self.raw is None:
            rows = [f"{k}: {v:.4f}" for k, v in self.metrics.items()]
            return "\n".join([title or self.label(), *("  " + r for r in rows)])
        return format_metrics_table({title or self.label(): self.raw}, name_header="dataset")


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
    distance_fn: Callable[[FeatureSet, FeatureSet], torch.Tensor] | None = None,
    chunk_size: int = 256,
) -> EvalResult:
    """Metrics of ``query`` against ``gallery`` features (optionally k-reciprocal re-ranked,
    with ``metric`` as the base distance).

    ``distance_fn(query_chunk, gallery) -> (q, G)`` replaces the vector distance (a
    method's own pairwise score, e.g. CAN's cross-attention re-scoring); it is called for
    ``chunk_size`` queries at a time and each block is ranked at once, so memory stays
    ``O(chunk_size * G)``.
    """
    from reidkit.metrics.rank import RankAccumulator, evaluate_features, evaluate_rank
    from reidkit.metrics.rerank import re_ranking_features

    q_camids, g_camids = query.camids, gallery.camids
    if bool((q_camids < 0).all()) and bool((g_camids < 0).all()):
        # No camera ids (e.g. a custom dataset without them): filtering "same pid and same
        # camera" would drop every true match, so evaluate without camera filtering.
        q_camids = g_camids = None
    if distance_fn is not None:
        if rerank:
            raise ValueError(
                "test.rerank: k-reciprocal re-ranking needs vector distances; this method "
                "scores query-gallery pairs itself (set test.rerank=false)"
            )
        acc = RankAccumulator(
            gallery.pids, g_camids, max_rank, "standard", None, torch.device("cpu")
        )
        for s in range(0, len(query), chunk_size):
            block = distance_fn(query[s : s + chunk_size], gallery).detach().float().cpu()
            expected = (min(chunk_size, len(query) - s), len(gallery))
            if tuple(block.shape) != expected:
                raise ValueError(
                    f"pairwise_distance returned {tuple(block.shape)}, expected {expected}"
                )
            acc.update(
                block,
                query.pids[s : s + chunk_size],
                None if q_camids is None else q_camids[s : s + chunk_size],
            )
        raw = acc.result()
        metrics, cmc = _summary(raw)
        return EvalResult(metrics, cmc, query, gallery, raw, False)
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
    role: str = "gallery",
    occlusion_p: float = 0.0,
) -> FeatureSet:
    """Features of ``records`` in order, encoded in ``role`` (``query`` / ``gallery``);
    under DDP each rank extracts a contiguous shard and the shards are all-gathered, so
    every rank returns the full set. ``occlusion_p``: seeded random erasing of the test
    images (the occlusion test)."""
    from reidkit.data.loader import build_test_loader

    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    shard = records
    if world > 1 and len(records) >= world:
        start, end = dist_utils.shard_bounds(len(records), rank, world)
        shard = records[start:end]
    from reidkit.engine.trainer import use_device_transforms

    loader = build_test_loader(
        cfg,
        shard,
        occlusion_p=occlusion_p,
        device_transforms=use_device_transforms(cfg, torch.device(device)),
    )
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
        role=role,
    )
    feats, extras = fs.feats, fs.extras
    if world > 1 and len(records) >= world:
        feats = dist_utils.all_gather_variable(feats.to(device)).cpu()
        extras = {k: dist_utils.all_gather_variable(v.to(device)).cpu() for k, v in extras.items()}
    if feats.shape[0] != len(records):
        raise RuntimeError(
            f"extract_records: got {feats.shape[0]} features for {len(records)} images "
            "(the test loader must yield every record exactly once, in order)"
        )
    return FeatureSet(
        feats,
        torch.tensor([r.pid for r in records], dtype=torch.long),
        torch.tensor([r.camid for r in records], dtype=torch.long),
        [_record_path(r) for r in records],
        extras,
    )


def _record_path(record: Any) -> str:
    path = getattr(record, "path", None)
    if path is None:  # a tracklet: named by its first frame
        frames = getattr(record, "paths", None) or getattr(record, "frames", None) or [""]
        path = frames[0]
    return str(path)


def evaluate_model(
    cfg: Config,
    model: nn.Module,
    dataset: ReIDDataset,
    device: str | torch.device | None = None,
    rerank: bool | None = None,
    progress: bool = False,
    occlusion_p: float = 0.0,
) -> EvalResult | None:
    """Extract ``dataset.query`` (role ``query``) and ``dataset.gallery`` (role
    ``gallery``) with ``cfg.test`` options and evaluate them: with the method's own
    ``pairwise_distance`` when it has one, else ``test.metric`` on the vectors. The
    method's ``eval_extras`` are added to ``metrics`` and ``notes`` (for the caller to
    print). Under DDP every rank must call this; rank 0 gets the result, the other ranks
    ``None``. ``rerank`` defaults to ``cfg.test.rerank``; ``occlusion_p`` erases a random
    box of each test image with that probability (seeded; MGRe's occlusion test).

    A video (tracklet) dataset is evaluated by
    :func:`reidkit.engine.video_eval.evaluate_video` in the modes of ``test.video_mode``
    (a :class:`~reidkit.engine.video_eval.VideoEvalResult`)."""
    from reidkit.engine.video_eval import evaluate_video, is_video_dataset

    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if not getattr(type(model), "evaluates_reid", True):
        return _evaluate_extras_only(cfg, model, dataset, device)
    if is_video_dataset(dataset):
        if occlusion_p > 0:
            raise ValueError("the occlusion test (occlusion_p) is defined for image datasets")
        return evaluate_video(cfg, model, dataset, device, rerank=rerank, progress=progress)
    if not dataset.query or not dataset.gallery:
        raise ValueError(
            f"dataset '{dataset.name}' at {dataset.root}: empty query ({len(dataset.query)}) "
            f"or gallery ({len(dataset.gallery)}) split"
        )
    query = extract_records(cfg, model, dataset.query, device, progress, "query", occlusion_p)
    gallery = extract_records(cfg, model, dataset.gallery, device, progress, "gallery", occlusion_p)
    if dist_utils.get_rank() != 0:
        return None
    distance_fn = None
    has_pairwise = getattr(type(model), "has_pairwise_score", None)
    if has_pairwise is not None and has_pairwise():
        was_training = model.training
        model.eval()

        def distance_fn(q: FeatureSet, g: FeatureSet) -> torch.Tensor:
            with torch.no_grad():
                return model.pairwise_distance(q, g)

    try:
        result = evaluate_feature_sets(
            query,
            gallery,
            metric=cfg.test.metric,
            max_rank=cfg.test.max_rank,
            rerank=cfg.test.rerank if rerank is None else rerank,
            k1=cfg.test.rerank_k1,
            k2=cfg.test.rerank_k2,
            lambda_value=cfg.test.rerank_lambda,
            distance_fn=distance_fn,
        )
    finally:
        if distance_fn is not None:
            model.train(was_training)
    extras_fn = getattr(model, "eval_extras", None)
    if extras_fn is not None:
        extras = extras_fn(cfg, dataset, device)
        if extras is not None:
            result.metrics.update(extras.metrics)
            result.notes.extend(extras.notes)
    result.dataset = str(getattr(dataset, "name", "") or "")
    return result


def _evaluate_extras_only(
    cfg: Config, model: nn.Module, dataset: ReIDDataset, device: torch.device
) -> EvalResult | None:
    """Evaluation of a method that is not a re-ID model (``evaluates_reid = False``): its
    ``eval_extras`` on rank 0 (e.g. VRSTC's completion quality), no ranking."""
    if dist_utils.get_rank() != 0:
        return None
    extras = model.eval_extras(cfg, dataset, device)
    if extras is None or not extras.metrics:
        raise ValueError(
            f"{type(model).__name__} is not a re-ID model (evaluates_reid=False) and its "
            "eval_extras returned no metric"
        )
    return EvalResult(dict(extras.metrics), torch.zeros(0), notes=list(extras.notes))


def result_distances(cfg: Config, model: nn.Module, result: EvalResult) -> torch.Tensor:
    """The full ``(Q, G)`` distance matrix behind ``result`` (for reports and plots):
    the method's own pairwise score, the re-ranked or the plain ``test.metric`` distance."""
    from reidkit import metrics as M

    q, g = result.query, result.gallery
    has_pairwise = getattr(type(model), "has_pairwise_score", None)
    if has_pairwise is not None and has_pairwise():
        with torch.no_grad():
            blocks = [model.pairwise_distance(q[s : s + 256], g) for s in range(0, len(q), 256)]
        return torch.cat(blocks).float().cpu()
    if result.rerank:
        dist = M.re_ranking(
            q.feats,
            g.feats,
            k1=cfg.test.rerank_k1,
            k2=cfg.test.rerank_k2,
            lambda_value=cfg.test.rerank_lambda,
        )
    else:
        dist = M.compute_distance(q.feats, g.feats, cfg.test.metric)
    return torch.as_tensor(dist).float().cpu()
