"""VRSTC's pipeline over a dataset: locate occlusion, measure it, complete it.

1. :func:`detect_dataset`: every frame of every tracklet through the trained re-ID
   network (the temporal baseline), region features (:func:`frame_region_features`),
   region scores against the tracklet's mean (:func:`~reidkit.methods.vrstc.occlusion_scores`),
   streamed tracklet by tracklet (a MARS tracklet never sits in memory as features of all
   the dataset). :func:`scores_document` / :func:`read_scores` are the ``scores.json`` of
   ``reidkit vrstc detect``.
2. On a dataset with ground truth (the synthetic video set): :func:`truth_coverage`
   (the share of each region's pixels the occluder covers), :func:`detection_report`
   (precision / recall of the detected occluded regions at ``tau``, the tau curve) and
   :func:`plot_tau_curve`.
3. :func:`complete_dataset`: a completed copy of the dataset in the same layout (only the
   occluded regions of the occluded frames are replaced, at the frames' own resolution;
   every other file is copied byte for byte), with ``vrstc_completion.json``.
4. :func:`completion_quality`: L1 / PSNR inside truly occluded regions against the
   ground-truth frames, for ``x1``, ``x2`` and simple references (the occluded input,
   copying the region from the nearest unoccluded frame, the tracklet's mean).

A region is *truly occluded* when the occluder covers at least ``coverage`` (default 0.2,
:data:`DEFAULT_COVERAGE`) of its pixels: a frame where the occluder clips a few pixels of
a region is not one a re-ID feature can notice, nor one worth completing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from reidkit.data.records import TrackletRecord
from reidkit.data.transforms import Resize
from reidkit.methods.vrstc import (
    DEFAULT_TAU,
    adjacent_unoccluded,
    occlusion_scores,
    region_bounds,
    region_errors,
    region_pool,
    regions_to_mask,
)

__all__ = [
    "DEFAULT_COVERAGE",
    "SPLITS",
    "CompletionTarget",
    "complete_dataset",
    "completion_quality",
    "completion_targets",
    "detect_dataset",
    "detection_report",
    "format_quality_table",
    "page_tracklets",
    "paste_completion",
    "run_completion",
    "output_dataset_dir",
    "frame_region_features",
    "plot_tau_curve",
    "read_frames",
    "read_scores",
    "scores_document",
    "truth_coverage",
    "write_json",
]

SPLITS = ("train", "query", "gallery")
#: a region counts as truly occluded when the occluder covers this share of its pixels
DEFAULT_COVERAGE = 0.2
SCORES_VERSION = 1


# ----------------------------------------------------------------------------- files
def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
    return path


def _read_rgb(path: str) -> torch.Tensor:
    """``(3, H, W)`` uint8 of an image file (RGB)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read frame {path}: {exc}") from exc
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def read_frames(paths: Sequence[str], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Frames as ``(N, 3, H, W)`` floats in ``[-1, 1]`` (STCnet's range), resized to
    ``size`` with the loaders' bilinear (antialiased) :class:`~reidkit.data.transforms.Resize`."""
    out = []
    for p in paths:
        x = _read_rgb(p)
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = Resize(size).apply(x)[0]
        out.append(x)
    return torch.stack(out).float() / 127.5 - 1


def _read_mask(path: str | None, size: tuple[int, int] | None = None) -> torch.Tensor | None:
    """An occluder mask ``(H, W)`` in ``[0, 1]`` (resized bilinearly to ``size``)."""
    if path is None:
        return None
    with Image.open(path) as im:
        m = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
    if size is not None and tuple(m.shape) != tuple(size):
        m = F.interpolate(m[None, None], size=size, mode="bilinear", antialias=True)[0, 0]
    return m


def _mask_or_zeros(path: str | None, size: tuple[int, int]) -> torch.Tensor:
    m = _read_mask(path, size)
    return torch.zeros(size) if m is None else m


# ----------------------------------------------------------------------------- detection
def _feature_bn(net: torch.nn.Module) -> torch.nn.Module:
    """The BatchNorm that turns the network's pooled feature into its post-BN test feature
    (BNNeck's ``neck.bn``; ``bottleneck`` / ``bn`` for other heads)."""
    for path in ("neck.bn", "bottleneck", "bn"):
        mod: Any = net
        for part in path.split("."):
            mod = getattr(mod, part, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise ValueError(
        f"{type(net).__name__} has no BNNeck BatchNorm (neck.bn): use region features "
        "'pre_bn' (--region-feature pre_bn)"
    )


def frame_region_features(
    net: torch.nn.Module,
    clips: torch.Tensor,
    num_regions: int = 3,
    aligned: bool = True,
    feature: str = "post_bn",
) -> torch.Tensor:
    """Region features of every frame: ``(B, T, 3, H, W)`` (normalised for ``net``) ->
    ``(B, T, R, D)``: the final feature map of each frame, average-pooled over ``R``
    horizontal regions (:func:`~reidkit.methods.vrstc.region_pool`; ``aligned``: the map
    rows weighted by their overlap with the pixel regions, ``image_height=H``), then, for
    ``feature="post_bn"``, through the network's BNNeck BatchNorm (eval mode), as its test
    feature is; ``"pre_bn"``: the pooled map as it is.

    The map comes from ``net.frame_maps(clips)`` (the temporal baseline), else from
    ``net.extract`` / ``net.backbone`` applied to the frames one by one.
    """
    if feature not in ("pre_bn", "post_bn"):
        raise ValueError(f"region feature must be 'pre_bn' or 'post_bn', got {feature!r}")
    b, t = clips.shape[:2]
    if hasattr(net, "frame_maps"):
        maps = net.frame_maps(clips).flatten(0, 1)
    else:
        frames = clips.flatten(0, 1)
        fn = getattr(net, "extract", None) or getattr(net, "backbone", None)
        if fn is None:
            raise ValueError(
                f"{type(net).__name__} has no frame_maps / extract / backbone: VRSTC needs the "
                "re-ID network's feature map of each frame"
            )
        maps = fn(frames)
    if maps.dim() != 4:
        raise ValueError(
            f"the re-ID network's frame maps must be (N, C, h, w), got {tuple(maps.shape)}"
        )
    height = clips.shape[-2] if aligned else None
    feats = region_pool(maps.float(), num_regions, height)  # (N, R, C)
    if feature == "post_bn":
        bn = _feature_bn(net)
        feats = bn(feats.flatten(0, 1)).unflatten(0, feats.shape[:2])
    return feats.unflatten(0, (b, t))


def resolve_region_feature(feature: str, net_cfg: Any) -> str:
    """``"test"`` -> the re-ID config's ``test.feature`` (``post_bn`` / ``pre_bn``)."""
    if feature == "test":
        feature = str(getattr(getattr(net_cfg, "test", None), "feature", "post_bn"))
        if feature not in ("pre_bn", "post_bn"):
            feature = "post_bn"
    return feature


@torch.no_grad()
def detect_dataset(
    net: torch.nn.Module,
    net_cfg: Any,
    dataset: Any,
    num_regions: int = 3,
    splits: Sequence[str] = SPLITS,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    progress: bool = False,
    aligned: bool = True,
    feature: str = "test",
) -> dict[str, list[torch.Tensor]]:
    """Region scores ``(T, R)`` of every tracklet of ``splits``: every frame through ``net``
    (its own input size and normalisation, ``net_cfg.data``) in consecutive chunks of
    ``net_cfg.data.test_chunk_len`` frames, region features of the tracklet's frames,
    :func:`~reidkit.methods.vrstc.occlusion_scores`. ``feature``: the region feature
    (:func:`frame_region_features`; ``"test"``: the re-ID config's ``test.feature``).
    Returns ``{split: [scores, ...]}`` in the split's tracklet order."""
    from reidkit.data.clips import ClipOptions, build_clip_test_loader

    device = torch.device(device)
    net = net.to(device).eval()
    feature = resolve_region_feature(feature, net_cfg)
    data = net_cfg.data.model_copy(update={"num_workers": num_workers})
    cfg = net_cfg.model_copy(update={"data": data})
    clip = ClipOptions(seq_len=1, test_sampling="chunks", chunk_len=data.test_chunk_len)
    out: dict[str, list[torch.Tensor]] = {}
    for split in splits:
        records = getattr(dataset, split)
        loader = build_clip_test_loader(cfg, records, clip) if records else []
        out[split] = _score_split(
            net, loader, records, num_regions, device, progress, split, aligned, feature
        )
    return out


def _score_split(
    net: torch.nn.Module,
    loader: Any,
    records: Sequence[TrackletRecord],
    num_regions: int,
    device: torch.device,
    progress: bool,
    split: str,
    aligned: bool = True,
    feature: str = "post_bn",
) -> list[torch.Tensor]:
    """Scores of one split from a chunk loader (chunks in tracklet order, then chunk
    order): a tracklet's scores are computed as soon as its last chunk has passed."""
    scores: list[torch.Tensor | None] = [None] * len(records)
    pending: list[torch.Tensor] = []
    current = -1

    def finish() -> None:
        feats = torch.cat(pending)  # (T, R, D)
        if feats.shape[0] != len(records[current]):
            raise RuntimeError(
                f"{split} tracklet {current}: {feats.shape[0]} frame features for "
                f"{len(records[current])} frames"
            )
        scores[current] = occlusion_scores(feats)

    for batch in _progress(loader, progress, f"detect {split}"):
        clips = batch["clips"].to(device)
        feats = frame_region_features(net, clips, num_regions, aligned, feature).cpu()
        for i, (index, mask) in enumerate(zip(batch["index"].tolist(), batch["clip_mask"])):
            if index != current:
                if current >= 0:
                    finish()
                pending, current = [], index
            pending.append(feats[i][mask.bool()])
    if current >= 0:
        finish()
    missing = [i for i, s in enumerate(scores) if s is None]
    if missing:
        raise RuntimeError(f"{split}: no scores for tracklets {missing[:5]}")
    return [s for s in scores if s is not None]


def _progress(iterable: Any, enabled: bool, desc: str) -> Any:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, dynamic_ncols=True, leave=False)


def _relative(path: str, base: str) -> str:
    rel = os.path.relpath(path, base)
    return Path(rel).as_posix()


def scores_document(
    dataset: Any,
    scores: dict[str, list[torch.Tensor]],
    tau: float = DEFAULT_TAU,
    num_regions: int = 3,
    reid_weights: str | None = None,
    **meta: Any,
) -> dict[str, Any]:
    """The ``scores.json`` of ``reidkit vrstc detect``: for every tracklet its ``pid``,
    ``camid``, frames (relative to the dataset folder) and region scores (4 decimals), with
    ``tau``, ``num_regions``, the dataset, the re-ID weights used and ``meta`` (e.g. the
    region feature and pooling)."""
    base = str(getattr(dataset, "dataset_dir", "") or dataset.root)
    doc: dict[str, Any] = {
        "version": SCORES_VERSION,
        "dataset": dataset.name,
        "dataset_dir": base,
        "tau": float(tau),
        "num_regions": int(num_regions),
        "reid_weights": str(reid_weights) if reid_weights else None,
        **meta,
        "tracklets": {},
    }
    for split, items in scores.items():
        records = getattr(dataset, split)
        doc["tracklets"][split] = [
            {
                "pid": int(r.pid),
                "camid": int(r.camid),
                "frames": [_relative(p, base) for p in r.paths],
                "scores": [[round(float(v), 4) for v in row] for row in s.tolist()],
            }
            for r, s in zip(records, items)
        ]
    return doc


def read_scores(
    path: str | os.PathLike, dataset: Any | None = None
) -> tuple[dict[str, Any], dict[str, list[torch.Tensor]]]:
    """Read a ``scores.json``: ``(document, {split: [(T, R) scores, ...]})``. With a
    ``dataset``, every split's tracklets must match the file's (same frames, in order)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        tracklets = doc["tracklets"]
        scores = {
            split: [torch.tensor(t["scores"], dtype=torch.float32) for t in items]
            for split, items in tracklets.items()
        }
    except FileNotFoundError:
        raise FileNotFoundError(f"scores file not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a scores file of `reidkit vrstc detect`: {exc}") from None
    if dataset is not None:
        base = str(getattr(dataset, "dataset_dir", "") or dataset.root)
        for split, items in tracklets.items():
            records = getattr(dataset, split)
            if len(records) != len(items):
                raise ValueError(
                    f"{path}: {split} has {len(items)} tracklets, the dataset {len(records)} "
                    "(written for another dataset or split?)"
                )
            for i, (r, item) in enumerate(zip(records, items)):
                frames = [_relative(p, base) for p in r.paths]
                if frames != item["frames"]:
                    raise ValueError(
                        f"{path}: {split} tracklet {i} lists other frames than the dataset "
                        f"({item['frames'][:1]} vs {frames[:1]})"
                    )
    return doc, scores


# ----------------------------------------------------------------------------- ground truth
def truth_coverage(record: TrackletRecord, num_regions: int = 3) -> torch.Tensor | None:
    """``(T, R)``: the share of each region's pixels covered by the occluder (the synthetic
    set's masks, pixels > 127), 0 for frames without a mask; ``None`` when the record has
    no ground truth (``extras["masks"]``)."""
    masks = record.extras.get("masks") if record.extras else None
    if masks is None:
        return None
    out = torch.zeros(len(record), num_regions)
    for t, path in enumerate(masks):
        if path is None:
            continue
        m = _read_mask(path)
        assert m is not None
        covered = (m > 0.5).float()
        for r, (a, b) in enumerate(region_bounds(m.shape[0], num_regions)):
            out[t, r] = covered[a:b].mean()
    return out


def _counts(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, Any]:
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "flagged": tp + fp,
        "occluded": tp + fn,
    }


def detection_report(
    scores: dict[str, list[torch.Tensor]],
    coverage: dict[str, list[torch.Tensor]],
    tau: float = DEFAULT_TAU,
    coverage_threshold: float = DEFAULT_COVERAGE,
    taus: Sequence[float] | None = None,
    other_coverages: Sequence[float] = (0.05, 0.5),
) -> dict[str, Any]:
    """Precision / recall of the detected occluded regions (``score < tau``) against the
    truly occluded ones (``coverage >= coverage_threshold``), over every (frame, region)
    of every tracklet: per split and over all, the tau curve and the result at ``tau`` for
    other coverage thresholds.

    ``taus`` default: -1.00 .. 1.00 in steps of 0.01 plus the score quantiles 0.001 ..
    0.999 (where the scores are dense, e.g. just below 1), so the curve shows the whole
    trade-off whatever the score range."""
    flat_s: dict[str, torch.Tensor] = {}
    flat_c: dict[str, torch.Tensor] = {}
    for split in scores:
        if split not in coverage or len(scores[split]) != len(coverage[split]):
            raise ValueError(f"detection_report: split {split!r} has no matching ground truth")
        if scores[split]:
            flat_s[split] = torch.cat([s.flatten() for s in scores[split]])
            flat_c[split] = torch.cat([c.flatten() for c in coverage[split]])
    all_s = torch.cat(list(flat_s.values()))
    all_c = torch.cat(list(flat_c.values()))
    truth = all_c >= coverage_threshold
    if taus is None:
        grid = {round(-1 + 0.01 * i, 4) for i in range(201)}
        qs = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
        grid |= {round(float(v), 5) for v in torch.quantile(all_s.double(), qs)}
        taus = sorted(grid | {float(tau)})
    score_q001 = float(torch.quantile(all_s.double(), 0.001))
    report: dict[str, Any] = {
        "tau": tau,
        "coverage_threshold": coverage_threshold,
        "regions": int(all_s.numel()),
        "score_q001": score_q001,
        "at_tau": _counts(all_s < tau, truth),
        "splits": {s: _counts(flat_s[s] < tau, flat_c[s] >= coverage_threshold) for s in flat_s},
        "other_coverages": {str(c): _counts(all_s < tau, all_c >= c) for c in other_coverages},
        "curve": {"tau": list(taus), "precision": [], "recall": [], "f1": [], "flagged": []},
    }
    for t in taus:
        c = _counts(all_s < t, truth)
        for key in ("precision", "recall", "f1", "flagged"):
            report["curve"][key].append(c[key])
    return report


def plot_tau_curve(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Precision and recall against tau (the chosen tau marked) and precision against
    recall, as a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = report["curve"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(curve["tau"], curve["precision"], label="precision")
    ax1.plot(curve["tau"], curve["recall"], label="recall")
    ax1.plot(curve["tau"], curve["f1"], label="F1", linestyle=":")
    rule = f" ({report['tau_rule']})" if report.get("tau_rule") else ""
    ax1.axvline(
        report["tau"], color="grey", linestyle="--", label=f"tau = {report['tau']:.4g}{rule}"
    )
    ax1.set_xlabel("tau (region score threshold)")
    scores_lo = report.get("score_q001", curve["tau"][0])
    ax1.set_xlim(min(scores_lo, report["tau"] - 0.02), 1.0)
    ax1.set_ylim(0, 1.02)
    ax1.set_title(
        f"occluded regions (coverage >= {report['coverage_threshold']:.0%}): "
        f"{report['at_tau']['occluded']} of {report['regions']}",
        fontsize=9,
    )
    ax1.legend(fontsize=8)
    ax2.plot(curve["recall"], curve["precision"], marker=".", markersize=3)
    at = report["at_tau"]
    ax2.scatter(
        [at["recall"]], [at["precision"]], color="red", zorder=3, label=f"tau = {report['tau']:.4g}"
    )
    ax2.set_xlabel("recall")
    ax2.set_ylabel("precision")
    ax2.set_xlim(0, 1.02)
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- completion
@dataclass(frozen=True)
class CompletionTarget:
    """An occluded frame to complete: ``split``, ``tracklet`` (index in the split), frame
    ``t``, its occluded ``regions``, the ``prev`` / ``next`` unoccluded frames (-1: the
    tracklet has none; STCnet then gives ``x1``) and the frame's region ``scores``."""

    split: str
    tracklet: int
    t: int
    regions: tuple[int, ...]
    prev: int
    next: int
    scores: tuple[float, ...] = field(default=(), compare=False)


def completion_targets(
    scores: dict[str, list[torch.Tensor]] | None = None,
    tau: float = DEFAULT_TAU,
    flags: dict[str, list[torch.Tensor]] | None = None,
) -> list[CompletionTarget]:
    """The frames to complete: those with a region scoring below ``tau`` (or flagged in
    ``flags``: ``{split: [(T, R) bool]}``, e.g. the ground truth), with the adjacent
    unoccluded frames of their tracklet (:func:`~reidkit.methods.vrstc.adjacent_unoccluded`)."""
    source = (
        flags if flags is not None else {k: [s < tau for s in v] for k, v in (scores or {}).items()}
    )
    out = []
    for split, items in source.items():
        for i, occ in enumerate(items):
            occ = occ.bool()
            any_occ = occ.any(dim=1)
            if not bool(any_occ.any()):
                continue
            prev, nxt = adjacent_unoccluded(~any_occ)
            rows = scores[split][i].tolist() if scores is not None else None
            for t in torch.nonzero(any_occ).flatten().tolist():
                regions = tuple(torch.nonzero(occ[t]).flatten().tolist())
                out.append(
                    CompletionTarget(
                        split,
                        i,
                        t,
                        regions,
                        int(prev[t]),
                        int(nxt[t]),
                        tuple(round(float(v), 4) for v in rows[t]) if rows else (),
                    )
                )
    return out


class _TargetFrames(Dataset):
    """Frames of completion targets: the occluded frame at STCnet's size and at its own
    size (uint8), and the references at STCnet's size."""

    def __init__(self, dataset: Any, targets: Sequence[CompletionTarget], size: tuple[int, int]):
        self.dataset, self.targets, self.size = dataset, list(targets), size

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict[str, Any]:
        tg = self.targets[i]
        rec = getattr(self.dataset, tg.split)[tg.tracklet]
        orig = _read_rgb(rec.paths[tg.t])
        resize = Resize(self.size)
        small = resize.apply(orig)[0] if tuple(orig.shape[-2:]) != self.size else orig
        item = {"i": i, "orig": orig, "x": small}
        if tg.prev >= 0:
            item["refs"] = torch.stack(
                [
                    resize.apply(x)[0] if tuple(x.shape[-2:]) != self.size else x
                    for x in (_read_rgb(rec.paths[tg.prev]), _read_rgb(rec.paths[tg.next]))
                ]
            )
        return item


def _collate_targets(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _to_gan(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1


def run_completion(
    stc: Any,
    dataset: Any,
    targets: Sequence[CompletionTarget],
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = False,
) -> Iterator[tuple[CompletionTarget, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Complete ``targets`` with the STCnet method ``stc`` at its input size
    (``stc.cfg.data``): yields ``(target, original uint8 (3, H0, W0), x (3, H, W), x1, x2)``
    with ``x``, ``x1``, ``x2`` in ``[-1, 1]`` at STCnet's size."""
    device = torch.device(device)
    size = (int(stc.cfg.data.height), int(stc.cfg.data.width))
    loader = DataLoader(
        _TargetFrames(dataset, targets, size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_targets,
    )
    stc = stc.to(device).eval()
    for items in _progress(loader, progress, "complete"):
        x = _to_gan(torch.stack([it["x"] for it in items])).to(device)
        regions = torch.zeros(len(items), stc.opts.num_regions, dtype=torch.bool)
        for j, it in enumerate(items):
            regions[j, list(targets[it["i"]].regions)] = True
        mask = regions_to_mask(regions, *size).to(device)
        with torch.no_grad():
            x1 = stc.stcnet.spatial(x, mask)
            x2 = x1.clone()
            has = [j for j, it in enumerate(items) if "refs" in it]
            if has:
                refs = _to_gan(torch.stack([items[j]["refs"] for j in has])).to(device)
                idx = torch.tensor(has, device=device)
                x2[idx] = stc.stcnet.temporal(
                    x1[idx], mask[idx], refs[:, 0], refs[:, 1], frame=x[idx]
                )
        for j, it in enumerate(items):
            yield targets[it["i"]], it["orig"], x[j].cpu(), x1[j].cpu(), x2[j].cpu()


def paste_completion(
    original: torch.Tensor, completion: torch.Tensor, regions: Sequence[int], num_regions: int
) -> torch.Tensor:
    """The original frame ``(3, H0, W0)`` uint8 with its ``regions`` replaced by the
    completion ``(3, H, W)`` (``[-1, 1]``), upsampled bilinearly to ``(H0, W0)``; every
    other pixel is the original's."""
    h0, w0 = original.shape[-2:]
    comp = (completion.float() + 1) * 127.5
    if tuple(comp.shape[-2:]) != (h0, w0):
        comp = F.interpolate(comp[None], size=(h0, w0), mode="bilinear", align_corners=False)[0]
    flags = torch.zeros(num_regions, dtype=torch.bool)
    flags[list(regions)] = True
    m = regions_to_mask(flags, h0, w0)[0]  # (1, H0, W0)
    out = torch.where(m > 0, comp.round().clamp(0, 255), original.float())
    return out.to(torch.uint8)


def _save_like(image: torch.Tensor, path: Path, jpeg_quality: int = 95) -> None:
    """Write ``(3, H, W)`` uint8 to ``path`` atomically in the file's own format (JPEG at
    ``jpeg_quality``, PNG lossless), replacing the directory entry (a hard-linked original
    is never written through)."""
    arr = image.permute(1, 2, 0).contiguous().numpy()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP"}.get(
        path.suffix.lower(), "PNG"
    )
    kwargs = {"quality": int(jpeg_quality)} if fmt == "JPEG" else {}
    Image.fromarray(arr).save(tmp, format=fmt, **kwargs)
    os.replace(tmp, path)


def _inside(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
        return True
    except ValueError:
        return False


def output_dataset_dir(dataset: Any, data_root: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Where the copy of the dataset folder goes under ``out``: at the same place relative
    to ``out`` as the original is relative to ``data_root``, so the same config with
    ``data.root=OUT`` reads the copy."""
    ddir = Path(getattr(dataset, "dataset_dir", "") or dataset.root).resolve()
    root = Path(data_root).expanduser().resolve()
    rel = Path(os.path.relpath(ddir, root))
    if rel.parts and rel.parts[0] == "..":
        rel = Path(ddir.name)
    return Path(out) / rel


def complete_dataset(
    stc: Any,
    dataset: Any,
    scores: dict[str, list[torch.Tensor]],
    out: str | os.PathLike,
    data_root: str | os.PathLike,
    *,
    tau: float = DEFAULT_TAU,
    output: str = "x2",
    overwrite: bool = False,
    link: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    num_workers: int = 0,
    progress: bool = False,
    meta: dict[str, Any] | None = None,
    jpeg_quality: int = 95,
) -> dict[str, Any]:
    """Write a completed copy of ``dataset`` under ``out`` (same layout; see
    :func:`output_dataset_dir`) and ``out/vrstc_completion.json``.

    Every file of the dataset folder is copied (``link=True``: hard links where possible),
    then each frame with a region scoring below ``tau`` gets its occluded regions replaced
    by STCnet's ``output`` (``x2``, or ``x1``) and is written again in its own format (JPEG
    at ``jpeg_quality``; atomic replace, so a hard link never writes through to the
    original). The copy is built in a temporary
    folder next to ``out`` and renamed at the end. An existing ``out`` is refused unless
    ``overwrite``; ``out`` may never be, contain or lie inside the dataset folder.

    Returns the summary written to ``vrstc_completion.json``.
    """
    if output not in ("x1", "x2"):
        raise ValueError(f"output must be 'x1' or 'x2', got {output!r}")
    src = Path(getattr(dataset, "dataset_dir", "") or dataset.root).resolve()
    out = Path(out).expanduser()
    out_abs = out.resolve()
    if out_abs == src or _inside(out_abs, src) or _inside(src, out_abs):
        raise ValueError(
            f"--out {out}: the completed copy must not be, contain or lie inside the dataset "
            f"folder {src} (the original is never modified)"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ValueError(
                f"--out {out} already exists: pass --overwrite to replace it, or choose "
                "another folder"
            )
    target_dir = output_dataset_dir(dataset, data_root, out)
    rel = target_dir.relative_to(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        copy = _link_or_copy if link else shutil.copy2
        shutil.copytree(src, tmp / rel, copy_function=copy, dirs_exist_ok=True)
        targets = completion_targets(scores, tau)
        num_regions = int(stc.opts.num_regions)
        replaced: dict[str, list[dict[str, Any]]] = {s: [] for s in scores}
        for tg, orig, _x, x1, x2 in run_completion(
            stc, dataset, targets, device, batch_size, num_workers, progress
        ):
            rec = getattr(dataset, tg.split)[tg.tracklet]
            frame_rel = Path(os.path.relpath(rec.paths[tg.t], src))
            image = paste_completion(orig, x2 if output == "x2" else x1, tg.regions, num_regions)
            _save_like(image, tmp / rel / frame_rel, jpeg_quality)
            replaced[tg.split].append(
                {
                    "tracklet": tg.tracklet,
                    "t": tg.t,
                    "frame": frame_rel.as_posix(),
                    "regions": list(tg.regions),
                    "scores": list(tg.scores),
                    "prev": _relative(rec.paths[tg.prev], str(src)) if tg.prev >= 0 else None,
                    "next": _relative(rec.paths[tg.next], str(src)) if tg.next >= 0 else None,
                }
            )
        counts = {
            split: {
                "tracklets": len(getattr(dataset, split)),
                "frames": sum(len(r) for r in getattr(dataset, split)),
                "replaced_frames": len(items),
                "replaced_regions": sum(len(e["regions"]) for e in items),
                "tracklets_with_replacements": len({e["tracklet"] for e in items}),
                "without_reference": sum(e["prev"] is None for e in items),
            }
            for split, items in replaced.items()
        }
        summary = {
            "version": 1,
            "dataset": dataset.name,
            "source": str(src),
            "dataset_dir": rel.as_posix(),
            "tau": float(tau),
            "num_regions": num_regions,
            "output": output,
            "jpeg_quality": int(jpeg_quality),
            "counts": counts,
            **(meta or {}),
            "replaced": replaced,
        }
        write_json(tmp / "vrstc_completion.json", summary)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# ----------------------------------------------------------------------------- quality
QUALITY_METHODS = ("occluded input", "copy nearest unoccluded", "tracklet mean", "x1", "x2")


@torch.no_grad()
def completion_quality(
    stc: Any,
    dataset: Any,
    splits: Sequence[str] = ("query", "gallery"),
    coverage_threshold: float = DEFAULT_COVERAGE,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_frame: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Completion quality inside truly occluded regions against the ground-truth frames
    (the synthetic video set), at STCnet's input size.

    Per tracklet with ground truth: the regions the occluder covers by at least
    ``coverage_threshold`` are masked (the detector's region shape, with the true regions:
    this measures the completion, not the detection); unoccluded frames are those with no
    such region; each occluded frame with an unoccluded frame in its tracklet is completed
    by ``x1``, ``x2``, copying the regions from the nearest unoccluded frame (the previous
    one on a tie), filling them with the mean of the tracklet's unoccluded frames, and left
    as the occluded input. L1 (0-255) and PSNR (dB) against the truth frame, over the
    masked regions and over the occluder's own pixels inside them (``hidden``).
    """
    size = (int(stc.cfg.data.height), int(stc.cfg.data.width))
    num_regions = int(stc.opts.num_regions)
    device = torch.device(device)
    stc = stc.to(device).eval()
    rows: dict[str, dict[str, list[torch.Tensor]]] = {
        m: {"l1": [], "psnr": [], "l1_hidden": [], "psnr_hidden": []} for m in QUALITY_METHODS
    }
    skipped = frames = tracklets = 0
    records = [(s, i, r) for s in splits for i, r in enumerate(getattr(dataset, s))]
    for split, index, rec in _progress(records, progress, "quality"):
        cov = truth_coverage(rec, num_regions)
        if cov is None:
            raise ValueError(
                f"{dataset.name}: {split} tracklet {index} has no ground-truth masks "
                "(completion quality needs the synthetic video set)"
            )
        flags = cov >= coverage_threshold
        occ = flags.any(dim=1)
        if not bool(occ.any()):
            continue
        unocc = ~occ
        if not bool(unocc.any()):
            skipped += int(occ.sum())
            continue
        tracklets += 1
        prev, nxt = adjacent_unoccluded(unocc)
        ts = torch.nonzero(occ).flatten().tolist()
        frames += len(ts)
        x = read_frames([rec.paths[t] for t in ts], size).to(device)
        truth_paths = [rec.extras["truth"][t] or rec.paths[t] for t in ts]
        truth = read_frames(truth_paths, size).to(device)
        hidden = torch.stack([_mask_or_zeros(rec.extras["masks"][t], size) for t in ts])
        hidden = hidden[:, None].to(device)
        refs_idx = sorted(set(torch.nonzero(unocc).flatten().tolist()))
        refs = read_frames([rec.paths[t] for t in refs_idx], size).to(device)
        pos = {t: k for k, t in enumerate(refs_idx)}
        x_prev = refs[[pos[int(prev[t])] for t in ts]]
        x_next = refs[[pos[int(nxt[t])] for t in ts]]
        nearest = [
            int(prev[t]) if abs(int(prev[t]) - t) <= abs(int(nxt[t]) - t) else int(nxt[t])
            for t in ts
        ]
        x_near = refs[[pos[n] for n in nearest]]
        mask = regions_to_mask(flags[ts], *size).to(device)
        x1, x2 = stc.complete(x, mask, x_prev, x_next)
        mean = refs.mean(dim=0, keepdim=True).expand_as(x)
        preds = {
            "occluded input": x,
            "copy nearest unoccluded": mask * x_near + (1 - mask) * x,
            "tracklet mean": mask * mean + (1 - mask) * x,
            "x1": x1,
            "x2": x2,
        }
        hidden_in = mask * (hidden > 0.5).to(mask.dtype)
        t01 = (truth + 1) / 2
        for name, pred in preds.items():
            p01 = (pred + 1) / 2
            l1, psnr = region_errors(p01, t01, mask)
            l1h, psnrh = region_errors(p01, t01, hidden_in)
            for key, v in (("l1", l1), ("psnr", psnr), ("l1_hidden", l1h), ("psnr_hidden", psnrh)):
                rows[name][key].append(v.cpu())
        if on_frame is not None:
            on_frame({"split": split, "tracklet": index, "frames": ts, "x": x, "truth": truth,
                      "mask": mask, **preds})  # fmt: skip
    table = {}
    for name, cols in rows.items():
        table[name] = {}
        for key, values in cols.items():
            v = torch.cat(values) if values else torch.zeros(0)
            v = v[~torch.isnan(v)]
            table[name][key] = float(v.mean()) if v.numel() else float("nan")
    return {
        "splits": list(splits),
        "coverage_threshold": coverage_threshold,
        "size": list(size),
        "tracklets": tracklets,
        "frames": frames,
        "skipped_frames_without_unoccluded_frame": skipped,
        "table": table,
    }


def format_quality_table(result: dict[str, Any]) -> str:
    """The completion-quality table as Markdown."""
    lines = [
        "| completion | L1 region | PSNR region (dB) | L1 hidden | PSNR hidden (dB) |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["table"].items():
        lines.append(
            f"| {name} | {row['l1']:.2f} | {row['psnr']:.2f} | {row['l1_hidden']:.2f} | "
            f"{row['psnr_hidden']:.2f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- page
def page_tracklets(
    stc: Any,
    dataset: Any,
    scores: dict[str, list[torch.Tensor]],
    tau: float = DEFAULT_TAU,
    num_tracklets: int = 8,
    frames_per_tracklet: int = 6,
    splits: Sequence[str] = ("query", "gallery"),
    coverage_threshold: float = DEFAULT_COVERAGE,
    device: str | torch.device = "cpu",
) -> list[Any]:
    """The sample tracklets of the visual page (:mod:`reidkit.viz.vrstc`): of ``splits``,
    those with the most detected occluded frames; with ground truth, three quarters are
    the tracklets with the most truly occluded frames and a quarter the most flagged others
    (where false alarms show). Up to ``frames_per_tracklet`` occluded frames each (detected
    or truly occluded; evenly spaced), the detected ones completed by STCnet."""
    from reidkit.viz.vrstc import PageFrame, PageTracklet, outline_regions, to_uint8_image

    size = (int(stc.cfg.data.height), int(stc.cfg.data.width))
    num_regions = int(stc.opts.num_regions)
    candidates = []
    coverages: dict[tuple[str, int], torch.Tensor | None] = {}
    for split in splits:
        for i, s in enumerate(scores.get(split, [])):
            rec = getattr(dataset, split)[i]
            cov = truth_coverage(rec, num_regions) if rec.extras.get("masks") is not None else None
            coverages[(split, i)] = cov
            n_det = int((s < tau).any(dim=1).sum())
            n_true = int((cov >= coverage_threshold).any(dim=1).sum()) if cov is not None else 0
            if n_det or n_true:
                candidates.append((n_det, n_true, split, i))
    by_truth = sorted(candidates, key=lambda c: (-c[1], -c[0], SPLITS.index(c[2]), c[3]))
    by_detection = sorted(candidates, key=lambda c: (-c[0], -c[1], SPLITS.index(c[2]), c[3]))
    if any(c[1] for c in candidates):
        # ground truth: mostly the truly occluded tracklets, plus the most flagged ones
        # (where the detector's false alarms show)
        n_det = num_tracklets // 4
        chosen = by_truth[: num_tracklets - n_det]
        chosen += [c for c in by_detection if c not in chosen][:n_det]
    else:
        chosen = by_detection[:num_tracklets]
    out = []
    for _, _, split, i in chosen:
        rec = getattr(dataset, split)[i]
        s = scores[split][i]
        flags = s < tau
        cov = coverages[(split, i)]
        true_flags = cov >= coverage_threshold if cov is not None else None
        strip = read_frames(rec.paths, size)
        strip_imgs = [
            outline_regions(
                to_uint8_image(x),
                flags[t].tolist(),
                num_regions,
                truth=true_flags[t].tolist() if true_flags is not None else None,
            )
            for t, x in enumerate(strip)
        ]
        title = (
            f"{split} tracklet {i}: pid {rec.pid}, camera {rec.camid + 1}, {len(rec)} frames, "
            f"{int(flags.any(dim=1).sum())} with detected occlusion"
        )
        if true_flags is not None:
            title += f", {int(true_flags.any(dim=1).sum())} truly occluded"
        tr = PageTracklet(title, strip_imgs, flags.any(dim=1).tolist())
        detected = {tg.t: tg for tg in completion_targets({split: [s]}, tau)}
        shown = set(detected)
        if true_flags is not None:
            shown |= set(torch.nonzero(true_flags.any(dim=1)).flatten().tolist())
        ts = sorted(shown)
        if len(ts) > frames_per_tracklet:
            step = len(ts) / frames_per_tracklet
            ts = [ts[int(k * step)] for k in range(frames_per_tracklet)]
        targets = [
            CompletionTarget(split, i, t, detected[t].regions, detected[t].prev, detected[t].next)
            for t in ts
            if t in detected
        ]
        done = {
            tg.t: (x1, x2) for tg, _o, _x, x1, x2 in run_completion(stc, dataset, targets, device)
        }
        truths = rec.extras.get("truth") if rec.extras else None
        for t in ts:
            tg = detected.get(t)
            truth = None
            if true_flags is not None:  # frames the occluder leaves alone are their own truth
                path = (truths[t] if truths is not None else None) or rec.paths[t]
                truth = to_uint8_image(read_frames([path], size)[0])
            x1, x2 = done.get(t, (None, None))
            frame = to_uint8_image(strip[t])
            tf = true_flags[t].tolist() if true_flags is not None else None
            tr.frames.append(
                PageFrame(
                    t=t,
                    name=Path(rec.paths[t]).name,
                    frame=frame,
                    regions=outline_regions(frame, flags[t].tolist(), num_regions, truth=tf),
                    x1=to_uint8_image(x1) if x1 is not None else None,
                    x2=to_uint8_image(x2) if x2 is not None else None,
                    scores=s[t].tolist(),
                    flags=flags[t].tolist(),
                    truth=truth,
                    prev=to_uint8_image(strip[tg.prev])
                    if tg is not None and tg.prev >= 0
                    else None,
                    next=to_uint8_image(strip[tg.next])
                    if tg is not None and tg.next >= 0
                    else None,
                    prev_t=tg.prev if tg is not None else -1,
                    next_t=tg.next if tg is not None else -1,
                    truth_regions=tf,
                )
            )
        out.append(tr)
    return out
