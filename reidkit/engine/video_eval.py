"""Video re-ID evaluation: tracklet features from chunked clips, and the four modes.

A tracklet's feature is the temporal pooling (average by default, ``max`` as an option) of
the features of *all* its frames. The clip test loader (:mod:`reidkit.data.clips`) cuts
every tracklet into consecutive ``data.test_chunk_len``-frame chunks; each chunk goes
through the method's ``encode(batch, role)`` and is pooled into its tracklet's running
sum (or maximum) by ``batch["index"]``, honouring ``clip_mask``, so a 900-frame tracklet
never sits in memory at once and the result does not depend on how chunks are batched.

``encode`` on a clip batch (``{"clips": (B, T, 3, H, W), "clip_mask": (B, T), ...}``)
returns, per feature name, either per-frame features ``(B, T, D)`` (pooled here over the
real frames: exactly the temporal average of frame features) or one feature per clip
``(B, D)`` (a method that aggregates time itself; chunks are then combined weighted by
their number of real frames). A method that only encodes images (``"clips"`` in neither
``requires`` nor ``eval_requires``) gets every frame as an image batch instead, which
makes "image model + temporal average pooling" available for every image method.

Modes (``test.video_mode``; ``query -> gallery``): ``v2v`` (query tracklets against
gallery tracklets), ``i2v`` (the query is one frame of each query tracklet,
``test.image_frame``: the first by default), ``v2i`` (query tracklets against one frame of
each gallery tracklet) and ``i2i``. Images go through the standard image test loader and
``encode({"images": ...}, role)``; the method decides how it encodes images and clips in
each role (TKP: images through its image network, clips through its video network).
Every mode is scored by the standard metrics (same identity and same camera excluded);
queries left without a true match (MARS: 140 query tracklets whose identity is in the
gallery only under their own camera) are skipped and counted in the result.
``test.query_in_gallery`` is the TKP code's protocol: the gallery is the query tracklets
followed by the gallery tracklets.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.config import Config
from reidkit.data.records import ImageRecord, TrackletRecord
from reidkit.engine import distributed as dist_utils
from reidkit.engine.evaluator import EvalResult, evaluate_feature_sets, extract_records
from reidkit.engine.extract import FeatureSet, _concat, _pick, autocast_context, flip_batch

__all__ = [
    "VIDEO_MODES",
    "MODE_TITLES",
    "VideoEvalResult",
    "accepts_clips",
    "encode_clips",
    "evaluate_video",
    "extract_tracklet_features",
    "format_split_summary",
    "frame_index",
    "is_video_dataset",
    "resolve_video_modes",
    "summarize_splits",
    "tracklet_images",
]

#: the four evaluation modes, ``<query kind>2<gallery kind>``
VIDEO_MODES: tuple[str, ...] = ("v2v", "i2v", "v2i", "i2i")
MODE_TITLES: dict[str, str] = {
    "v2v": "V2V (video -> video)",
    "i2v": "I2V (image -> video)",
    "v2i": "V2I (video -> image)",
    "i2i": "I2I (image -> image)",
}
#: metric keys summarised per mode and over splits
SUMMARY_KEYS = ("mAP", "rank1", "rank5", "rank10", "mINP")


def is_video_dataset(dataset: Any) -> bool:
    """True when the dataset's splits hold :class:`TrackletRecord` s."""
    for split in ("query", "gallery", "train"):
        records = getattr(dataset, split, None) or []
        if records:
            return isinstance(records[0], TrackletRecord)
    return False


def resolve_video_modes(mode: str | Sequence[str], model: Any = None) -> list[str]:
    """The modes to evaluate, the primary one first.

    ``mode``: one of :data:`VIDEO_MODES`, ``"auto"`` (the method's own ``video_mode``
    class attribute: ``v2v`` for video methods, ``i2v`` for TKP), ``"all"`` (the method's
    mode, then the other three in :data:`VIDEO_MODES` order) or a list of modes.
    """
    own = str(getattr(model, "video_mode", "v2v") or "v2v")
    if own not in VIDEO_MODES:
        raise ValueError(f"{type(model).__name__}.video_mode must be one of {VIDEO_MODES}")
    if isinstance(mode, str):
        if mode == "auto":
            return [own]
        if mode == "all":
            return [own] + [m for m in VIDEO_MODES if m != own]
        mode = [mode]
    out: list[str] = []
    for m in mode:
        if m not in VIDEO_MODES:
            raise ValueError(
                f"video evaluation mode {m!r}: expected one of {', '.join(VIDEO_MODES)}, "
                "'all' or 'auto'"
            )
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("no video evaluation mode given")
    return out


def frame_index(num_frames: int, which: str = "first") -> int:
    """Index of the frame that stands for a tracklet as an image: ``first`` (0, the TKP
    protocol) or ``middle`` (``(n - 1) // 2``)."""
    if num_frames < 1:
        raise ValueError("a tracklet needs at least one frame")
    if which == "first":
        return 0
    if which == "middle":
        return (num_frames - 1) // 2
    raise ValueError(f"test.image_frame: expected 'first' or 'middle', got {which!r}")


def tracklet_images(tracklets: Sequence[TrackletRecord], which: str = "first") -> list[ImageRecord]:
    """One frame of every tracklet as an :class:`ImageRecord` (same pid and camera)."""
    return [t.frame(frame_index(len(t), which)) for t in tracklets]


def accepts_clips(model: nn.Module) -> bool:
    """True when the method encodes clip batches itself (``"clips"`` in its ``requires``
    or ``eval_requires``); otherwise frames are encoded as images."""
    keys = set(getattr(model, "eval_requires", ())) | set(getattr(model, "requires", ()))
    return "clips" in keys


def encode_clips(
    model: nn.Module, batch: Mapping[str, Any], role: str, feature: str
) -> torch.Tensor:
    """The ``feature`` of a clip batch: ``(B, T, D)`` per frame or ``(B, D)`` per clip.

    Methods that accept clips get the batch as is; image methods get the ``B * T`` frames
    as an image batch (pids / camids / index repeated per frame) and return ``(B, T, D)``.
    """
    clips = batch["clips"]
    if clips.dim() != 5:
        raise ValueError(f"clip batch: 'clips' must be (B, T, 3, H, W), got {tuple(clips.shape)}")
    if accepts_clips(model):
        out = model.encode(dict(batch), role)
        return _pick(out, feature, model)
    b, t = clips.shape[:2]
    images: dict[str, Any] = {
        "images": clips.flatten(0, 1),
        "pids": batch["pids"].repeat_interleave(t),
        "camids": batch["camids"].repeat_interleave(t),
        "index": batch["index"].repeat_interleave(t),
    }
    if isinstance(batch.get("keypoints"), torch.Tensor):
        images["keypoints"] = batch["keypoints"].flatten(0, 1)
    if hasattr(model, "encode"):
        out = model.encode(images, role)
    elif hasattr(model, "forward_features"):
        out = model.forward_features(images["images"])
        out = out if isinstance(out, dict) else {"feat": out}
    else:
        out = {"feat": model(images["images"])}
    f = _pick(out, feature, model)
    if f.dim() != 2 or f.shape[0] != b * t:
        raise ValueError(
            f"{type(model).__name__}.encode returned {tuple(f.shape)} for {b * t} frames, "
            "expected (frames, D)"
        )
    return f.view(b, t, -1)


def _pool_chunk(
    f: torch.Tensor, mask: torch.Tensor, pooling: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's contribution to its tracklet: ``(sum or max over real frames (B, D),
    number of real frames (B,))``."""
    weight = mask.to(f.dtype)
    count = weight.sum(1)
    if f.dim() == 3:
        if f.shape[:2] != mask.shape:
            raise ValueError(
                f"per-frame features {tuple(f.shape)} do not match clip_mask {tuple(mask.shape)}"
            )
        if pooling == "avg":
            return (f * weight.unsqueeze(-1)).sum(1), count
        return f.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1), count
    if f.dim() == 2:
        # a per-clip feature (the method pooled time itself): chunks weighted by frames
        return (f * count.unsqueeze(-1) if pooling == "avg" else f), count
    raise ValueError(f"clip features must be (B, T, D) or (B, D), got {tuple(f.shape)}")


@torch.no_grad()
def extract_tracklet_features(
    cfg: Config,
    model: nn.Module,
    records: Sequence[TrackletRecord],
    device: torch.device | str,
    role: str = "gallery",
    pooling: str | None = None,
    progress: bool = False,
    loader: Iterable[dict] | None = None,
) -> FeatureSet:
    """Features of ``records`` (tracklets) in order: every frame through ``encode`` in
    chunks (``data.test_chunk_len``; ``data.test_clip_sampling`` other than ``chunks``
    uses one sampled clip per tracklet instead), pooled per tracklet.

    ``pooling``: ``avg`` (default ``test.video_pooling``) or ``max`` over the real frames
    (``clip_mask``). Flip averaging (``test.flip``, per frame before pooling), the feature
    name (``test.feature``) and L2 normalisation (``test.normalize``, of the pooled
    feature) follow ``cfg.test``. Under DDP each rank extracts a contiguous shard of
    tracklets and all ranks get the whole set. ``loader``: an already built clip test
    loader over ``records`` (tests). Returns float32 CPU tensors.
    """
    from reidkit.data.clips import build_clip_test_loader

    pooling = pooling or cfg.test.video_pooling
    if pooling not in ("avg", "max"):
        raise ValueError(f"test.video_pooling: expected 'avg' or 'max', got {pooling!r}")
    device = torch.device(device)
    records = list(records)
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    shard = records
    sharded = world > 1 and len(records) >= world
    if sharded:
        start, end = dist_utils.shard_bounds(len(records), rank, world)
        shard = records[start:end]
    if loader is None:
        loader = build_clip_test_loader(cfg, shard)
    prepare = getattr(loader, "prepare", None)
    n = len(shard)
    sums: torch.Tensor | None = None
    counts = torch.zeros(n, device=device)
    was_training = model.training
    model.eval()
    iterator: Iterable[dict] = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc=f"extract {role} tracklets", leave=False, dynamic_ncols=True)
    try:
        for batch in iterator:
            if prepare is not None:
                batch = prepare(batch, device)
            else:
                batch = {
                    k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()
                }
            b = int(batch["pids"].shape[0])
            if b == 0:
                continue
            with autocast_context(device, cfg.amp):
                run = _concat(batch, flip_batch(batch), b) if cfg.test.flip else batch
                f = encode_clips(model, run, role, cfg.test.feature).float()
            if f.shape[0] != (2 * b if cfg.test.flip else b):
                raise ValueError(
                    f"{type(model).__name__}.encode returned {tuple(f.shape)} for a batch of "
                    f"{b} clips"
                )
            if cfg.test.flip:
                f = (f[:b] + f[b:]) / 2
            part, count = _pool_chunk(f, batch["clip_mask"].to(f.device), pooling)
            index = batch["index"].to(device)
            if sums is None:
                fill = 0.0 if pooling == "avg" else float("-inf")
                sums = torch.full((n, part.shape[1]), fill, device=device)
            if pooling == "avg":
                sums.index_add_(0, index, part.to(device))
            else:
                idx = index.unsqueeze(1).expand(-1, part.shape[1])
                sums.scatter_reduce_(0, idx, part.to(device), reduce="amax")
            counts.index_add_(0, index, count.to(device))
    finally:
        model.train(was_training)
    if sums is None:
        sums = torch.zeros(n, 0, device=device)
    empty = (counts <= 0).nonzero().flatten().tolist()
    if empty:
        first = shard[empty[0]]
        raise RuntimeError(
            f"extract_tracklet_features: {len(empty)} tracklet(s) produced no frame feature "
            f"(no readable frame), e.g. pid {first.pid} camera {first.camid + 1}: "
            f"{first.paths[0] if first.paths else '(no frames)'}"
        )
    feats = sums / counts.unsqueeze(1) if pooling == "avg" else sums
    if cfg.test.normalize and feats.numel():
        feats = F.normalize(feats, dim=1)
    if sharded:
        feats = dist_utils.all_gather_variable(feats)
    feats = feats.float().cpu()
    if feats.shape[0] != len(records):
        raise RuntimeError(
            f"extract_tracklet_features: {feats.shape[0]} features for {len(records)} tracklets"
        )
    return FeatureSet(
        feats,
        torch.tensor([r.pid for r in records], dtype=torch.long),
        torch.tensor([r.camid for r in records], dtype=torch.long),
        [str(r.paths[0]) if r.paths else "" for r in records],
    )


@dataclass
class VideoEvalResult(EvalResult):
    """An :class:`~reidkit.engine.evaluator.EvalResult` over several modes.

    ``metrics``: the primary mode's metrics under the plain names (``mAP``, ``rank1``...,
    what ``best.pt`` is chosen by) plus ``<mode>_<name>`` for every mode and
    ``<mode>_skipped`` (queries without a true match). ``modes``: ``{mode: EvalResult}``
    (each with its own ``query`` / ``gallery`` feature sets); ``query`` / ``gallery`` /
    ``raw`` / ``cmc`` are the primary mode's. ``skipped``: per mode, the number of queries
    without a true match (left out of the metrics).
    """

    modes: dict[str, EvalResult] = field(default_factory=dict)
    primary: str = "v2v"
    skipped: dict[str, int] = field(default_factory=dict)

    def table(self, title: str = "") -> str:
        """One row per mode (mAP, R1, R5, R10, mINP in percent)."""
        from reidkit.metrics.table import format_metrics_table

        prefix = f"{title} " if title else ""
        rows = {f"{prefix}{m.upper()}": r.raw for m, r in self.modes.items()}
        return format_metrics_table(rows, name_header="mode")


def _kind(letter: str) -> str:
    return "video" if letter == "v" else "image"


def _needed(modes: Sequence[str]) -> list[tuple[str, str]]:
    need: list[tuple[str, str]] = []
    for m in modes:
        for item in ((_kind(m[0]), "query"), (_kind(m[2]), "gallery")):
            if item not in need:
                need.append(item)
    return need


def evaluate_video(
    cfg: Config,
    model: nn.Module,
    dataset: Any,
    device: torch.device | str | None = None,
    modes: str | Sequence[str] | None = None,
    rerank: bool | None = None,
    progress: bool = False,
) -> VideoEvalResult | None:
    """Evaluate a method on a tracklet dataset in ``modes`` (default ``test.video_mode``;
    see :func:`resolve_video_modes`), each by the standard metrics.

    Extracts only what the modes need (video and / or image features of the query and of
    the gallery, the gallery being query + gallery with ``test.query_in_gallery``), then
    ranks each mode with ``test.metric`` (optionally re-ranked). Under DDP every rank must
    call this; rank 0 gets the result, the others ``None``. Notes (queries skipped for lack
    of a true match) come back in ``notes``.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    if not dataset.query or not dataset.gallery:
        raise ValueError(
            f"dataset '{dataset.name}' at {dataset.root}: empty query ({len(dataset.query)}) "
            f"or gallery ({len(dataset.gallery)}) split"
        )
    has_pairwise = getattr(type(model), "has_pairwise_score", None)
    if has_pairwise is not None and has_pairwise():
        raise ValueError(
            f"{type(model).__name__} scores query-gallery pairs itself (pairwise_distance); "
            "video evaluation needs vector features"
        )
    mode_list = resolve_video_modes(cfg.test.video_mode if modes is None else modes, model)
    query_records = list(dataset.query)
    gallery_records = list(dataset.gallery)
    if cfg.test.query_in_gallery:
        gallery_records = query_records + gallery_records
    sets: dict[tuple[str, str], FeatureSet] = {}
    show = progress and dist_utils.get_rank() == 0
    for kind, role in _needed(mode_list):
        records = query_records if role == "query" else gallery_records
        if kind == "video":
            sets[(kind, role)] = extract_tracklet_features(
                cfg, model, records, device, role, progress=show
            )
        else:
            images = tracklet_images(records, cfg.test.image_frame)
            sets[(kind, role)] = extract_records(cfg, model, images, device, show, role)
    if dist_utils.get_rank() != 0:
        return None
    do_rerank = cfg.test.rerank if rerank is None else rerank
    results: dict[str, EvalResult] = {}
    skipped: dict[str, int] = {}
    notes: list[str] = []
    for m in mode_list:
        q, g = sets[(_kind(m[0]), "query")], sets[(_kind(m[2]), "gallery")]
        r = evaluate_feature_sets(
            q,
            g,
            metric=cfg.test.metric,
            max_rank=cfg.test.max_rank,
            rerank=do_rerank,
            k1=cfg.test.rerank_k1,
            k2=cfg.test.rerank_k2,
            lambda_value=cfg.test.rerank_lambda,
        )
        r.dataset = str(getattr(dataset, "name", "") or "")
        results[m] = r
        skipped[m] = int(r.raw.num_query - r.raw.num_valid)
    if any(skipped.values()):
        counts = ", ".join(
            f"{m.upper()} {n} of {results[m].raw.num_query}" for m, n in skipped.items() if n
        )
        hint = "" if cfg.test.query_in_gallery else "; test.query_in_gallery=true: TKP's protocol"
        notes.append(
            f"queries without a true match in another camera, skipped (not in the metrics): "
            f"{counts}{hint}"
        )
    primary = mode_list[0]
    metrics = dict(results[primary].metrics)
    for m, r in results.items():
        for key, value in r.metrics.items():
            metrics[f"{m}_{key}"] = value
        metrics[f"{m}_skipped"] = float(skipped[m])
    head = results[primary]
    result = VideoEvalResult(
        metrics=metrics,
        cmc=head.cmc,
        query=head.query,
        gallery=head.gallery,
        raw=head.raw,
        rerank=do_rerank,
        notes=notes,
        modes=results,
        primary=primary,
        skipped=skipped,
        dataset=head.dataset,
    )
    result.dataset = str(getattr(dataset, "name", "") or "")
    extras_fn = getattr(model, "eval_extras", None)
    if extras_fn is not None:
        extras = extras_fn(cfg, dataset, device)
        if extras is not None:
            result.metrics.update(extras.metrics)
            result.notes.extend(extras.notes)
    return result


# --------------------------------------------------------------------- 10-split datasets
def summarize_splits(per_split: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation, min and max of every metric over splits.

    ``per_split``: one ``metrics`` dict per split (e.g. :attr:`EvalResult.metrics`).
    Returns ``{metric: {"mean", "std", "min", "max", "n"}}`` for the metrics every split
    has (``std`` is 0 for a single split).
    """
    if not per_split:
        raise ValueError("summarize_splits: no split results")
    keys = [k for k in per_split[0] if all(k in m for m in per_split)]
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [float(m[key]) for m in per_split]
        out[key] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
            "n": float(len(values)),
        }
    return out


def format_split_summary(
    summary: Mapping[str, Mapping[str, float]], modes: Sequence[str], title: str = ""
) -> str:
    """A Markdown table, one row per mode: ``mean ± std`` (percent) over the splits of mAP,
    R1, R5, R10 and mINP (keys ``<mode>_<metric>``)."""
    cols = (("mAP", "mAP"), ("R1", "rank1"), ("R5", "rank5"), ("R10", "rank10"), ("mINP", "mINP"))
    header = ["mode", *[c for c, _ in cols]]
    rows = []
    for m in modes:
        cells = [f"{title} {m.upper()}".strip()]
        for _, key in cols:
            s = summary.get(f"{m}_{key}")
            if s is None or any(math.isnan(s[x]) for x in ("mean", "std")):
                cells.append("-")
            else:
                cells.append(f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "| " + " | ".join(parts) + " |"

    sep = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    n = next(iter(summary.values()))["n"] if summary else 0
    return "\n".join([line(header), sep, *map(line, rows)]) + f"\n(mean ± std over {n:g} splits)"
