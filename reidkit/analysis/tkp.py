"""TKP's analyses (the slides' visualisation): are image and video features consistent,
and does the image network look at the person?

- :func:`modality_features`: image features (one frame of each tracklet through the
  image network) and video features (the tracklet through the video network) of the same
  tracklets, as the evaluator computes them.
- :func:`modality_gap`: numbers for "the two modalities become consistent": the mean
  distance between an identity's image features and its video feature (the mean of its
  tracklets' video features), the same to other identities' video features, their ratio,
  and the distance between a tracklet's image feature and its own video feature.
- :func:`project_2d`: image and video features in one 2-D projection (PCA; t-SNE when
  scikit-learn is installed); :func:`plot_projection` draws them coloured by identity,
  one marker per modality, one panel per model (with / without TKP).
- :func:`image_cams`: class activation maps of the image network (the shared classifier
  applied at every position of its last map: ``mean(map) = logit``, reidkit.viz.cam);
  :func:`foreground_share`: the share of a map's mass inside the person's box (from the
  keypoints, where the dataset has them: the synthetic set does), the number behind "the
  image features focus more on the foreground".
- :func:`analyze_tkp_runs`: all of it for trained runs (``reidkit analyze tkp``), written
  as PNG figures, ``summary.json`` and a self-contained ``index.html``.
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reidkit.engine.extract import FeatureSet

__all__ = [
    "ModalityFeatures",
    "analyze_tkp_runs",
    "foreground_share",
    "image_cams",
    "keypoint_boxes",
    "modality_features",
    "modality_gap",
    "plot_projection",
    "project_2d",
    "tsne_available",
]


@dataclass
class ModalityFeatures:
    """Image and video features of the same tracklets (row ``n`` of both is tracklet
    ``n``)."""

    image: FeatureSet
    video: FeatureSet


def modality_features(
    cfg: Any,
    model: nn.Module,
    tracklets: list[Any],
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ModalityFeatures:
    """Image features of one frame per tracklet (``test.image_frame``, role ``query``)
    and video features of the tracklets (role ``gallery``), L2-normalised as
    ``test.normalize`` says: exactly what the I2V evaluation compares."""
    from reidkit.engine.evaluator import extract_records
    from reidkit.engine.video_eval import extract_tracklet_features, tracklet_images

    device = torch.device(device)
    images = tracklet_images(tracklets, cfg.test.image_frame)
    image = extract_records(cfg, model, images, device, progress, "query")
    video = extract_tracklet_features(cfg, model, tracklets, device, "gallery", progress=progress)
    return ModalityFeatures(image, video)


def modality_gap(image: FeatureSet, video: FeatureSet) -> dict[str, float]:
    """How far apart the two modalities are (Euclidean distances).

    With ``c_p`` the video centre of identity ``p`` (the mean of its tracklets' video
    features) and ``i_k`` the image features of its tracklets:

    - ``same_id``: mean over identities of ``mean_k ||i_k - c_p||``;
    - ``other_id``: mean over identities of ``mean_k mean_{q != p} ||i_k - c_q||``;
    - ``ratio``: ``same_id / other_id`` (scale-free: lower = the image feature sits closer
      to its own identity's video feature than to the others');
    - ``paired``: mean over tracklets of ``||i_n - v_n||`` (a frame vs its own tracklet).

    Rows of ``image`` and ``video`` must be the same tracklets (same pids). Needs at
    least two identities.
    """
    if len(image) != len(video) or not torch.equal(image.pids, video.pids):
        raise ValueError("modality_gap: image and video features must describe the same tracklets")
    pids = video.pids
    ids, inverse = torch.unique(pids, return_inverse=True)
    if len(ids) < 2:
        raise ValueError("modality_gap: needs at least two identities")
    v, i = video.feats.double(), image.feats.double()
    counts = torch.bincount(inverse, minlength=len(ids)).double()
    centres = torch.zeros(len(ids), v.shape[1], dtype=torch.float64).index_add_(0, inverse, v)
    centres = centres / counts.unsqueeze(1)
    dist = torch.cdist(i, centres)  # (N, P)
    own = dist.gather(1, inverse.unsqueeze(1)).squeeze(1)
    others = (dist.sum(1) - own) / (len(ids) - 1)
    per_id_same = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, own) / counts
    per_id_other = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, others)
    per_id_other = per_id_other / counts
    same, other = float(per_id_same.mean()), float(per_id_other.mean())
    return {
        "same_id": same,
        "other_id": other,
        "ratio": same / other if other > 0 else float("nan"),
        "paired": float((i - v).norm(dim=1).mean()),
        "identities": float(len(ids)),
        "tracklets": float(len(pids)),
    }


def tsne_available() -> bool:
    """True when scikit-learn (for t-SNE) is installed."""
    return importlib.util.find_spec("sklearn") is not None


def project_2d(feats: torch.Tensor, method: str = "pca", seed: int = 0) -> torch.Tensor:
    """``(N, D)`` -> ``(N, 2)``: the first two principal components (``pca``, centred, via
    SVD; signs fixed so the largest loading is positive) or a t-SNE embedding (``tsne``,
    scikit-learn, PCA-initialised, seeded)."""
    x = feats.detach().double().cpu()
    if x.dim() != 2 or x.shape[0] < 3:
        raise ValueError(f"project_2d: need (N >= 3, D) features, got {tuple(x.shape)}")
    if method == "pca":
        x = x - x.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        comps = vh[:2]
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        return (x @ (comps * signs).t()).float()
    if method == "tsne":
        if not tsne_available():
            raise ImportError(
                "project_2d(method='tsne') needs scikit-learn (pip install scikit-learn)"
            )
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (x.shape[0] - 1) / 3)))
        emb = TSNE(2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(x.numpy())
        return torch.from_numpy(np.asarray(emb)).float()
    raise ValueError(f"project_2d: method must be 'pca' or 'tsne', got {method!r}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_projection(
    panels: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Scatter plots, one panel per model: ``{name: (xy (N, 2), pids (N,), is_image (N,))}``;
    colour = identity, ``o`` = video feature, ``x`` = image feature, a thin line joins an
    image feature to its identity's video features' centre."""
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5), squeeze=False)
    for ax, (name, (xy, pids, is_image)) in zip(axes[0], panels.items()):
        xy, pids, is_image = xy.numpy(), pids.numpy(), is_image.numpy().astype(bool)
        ids = sorted(set(pids.tolist()))
        colour = {p: cmap(k % 20) for k, p in enumerate(ids)}
        for p in ids:
            vid = (pids == p) & ~is_image
            img = (pids == p) & is_image
            c = colour[p]
            if vid.any():
                centre = xy[vid].mean(0)
                for q in xy[img]:
                    ax.plot([q[0], centre[0]], [q[1], centre[1]], color=c, lw=0.5, alpha=0.4)
            ax.scatter(xy[vid, 0], xy[vid, 1], color=c, marker="o", s=22, edgecolors="k", lw=0.3)
            ax.scatter(xy[img, 0], xy[img, 1], color=c, marker="x", s=26, lw=1.2)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [
        plt.Line2D([], [], color="gray", marker="o", ls="", label="video (tracklet)"),
        plt.Line2D([], [], color="gray", marker="x", ls="", label="image (first frame)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------ CAMs
@torch.no_grad()
def image_cams(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Class activation maps ``(B, H, W)`` of TKP's image network for the ``targets``
    classes: the shared classifier (with its bias) applied at every position of the image
    network's last map, upsampled to the image. Raw values (``mean`` over the grid of the
    un-upsampled map = the logit)."""
    from reidkit.viz.cam import class_activation_map

    net = getattr(model, "image_net", None)
    classifier = getattr(model, "classifier", None)
    if net is None or classifier is None:
        raise ValueError(
            f"{type(model).__name__}: image CAMs need an image network and a classifier (TKP)"
        )
    return class_activation_map(
        model, images, targets, feature_fn=net, classifier=classifier, bn=None
    )


def keypoint_boxes(
    keypoints: torch.Tensor, height: int, width: int, margin: float = 0.1
) -> torch.Tensor:
    """Person boxes ``(B, 4)`` ``[x0, y0, x1, y1)`` in pixels from COCO keypoints
    ``(B, 17, 3)`` (those with ``v > 0``), widened by ``margin`` of the box size on each
    side and clipped to the image. An image without a visible keypoint gets the whole
    image."""
    kp = keypoints.float()
    vis = kp[..., 2] > 0
    big = torch.tensor(1e9)
    x0 = torch.where(vis, kp[..., 0], big).amin(1)
    y0 = torch.where(vis, kp[..., 1], big).amin(1)
    x1 = torch.where(vis, kp[..., 0], -big).amax(1)
    y1 = torch.where(vis, kp[..., 1], -big).amax(1)
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    boxes = torch.stack([x0 - mx, y0 - my, x1 + mx + 1, y1 + my + 1], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    none = ~vis.any(1)
    boxes[none] = torch.tensor([0.0, 0.0, float(width), float(height)])
    return boxes


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map ``(..., H, W)`` scaled to [0, 1] by its own minimum and maximum (CAMs can
    be negative)."""
    flat = maps.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp(min=1e-12)).view_as(maps)


def foreground_share(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Share of each map's mass inside its box: ``maps (B, H, W)`` (min-max normalised per
    map first, so the share is of the map's relative activation), ``boxes (B, 4)``
    ``[x0, y0, x1, y1)`` in pixels. Returns ``(B,)`` in ``[0, 1]``."""
    if maps.dim() != 3 or boxes.shape != (maps.shape[0], 4):
        raise ValueError(
            f"foreground_share: maps (B, H, W) and boxes (B, 4), got {maps.shape}, {boxes.shape}"
        )
    b, h, w = maps.shape
    norm = _minmax(maps.double())
    ys = torch.arange(h, dtype=torch.float64).view(1, h, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float64).view(1, 1, w) + 0.5
    bx = boxes.double()
    inside = (
        (xs >= bx[:, 0, None, None])
        & (xs < bx[:, 2, None, None])
        & (ys >= bx[:, 1, None, None])
        & (ys < bx[:, 3, None, None])
    )
    total = norm.sum((1, 2)).clamp(min=1e-12)
    return ((norm * inside).sum((1, 2)) / total).float()


# ---------------------------------------------------------------------------- runs
def _find_checkpoint(run_dir: Path, which: str) -> Path:
    ckpt = run_dir / "checkpoints"
    order = ["best.pt", "last.pt"] if which == "best" else ["last.pt", "best.pt"]
    for name in order:
        if (ckpt / name).is_file():
            return ckpt / name
    raise FileNotFoundError(f"{ckpt}: no best.pt or last.pt (is {run_dir} a run folder?)")


def _load_run(run_dir: Path, checkpoint: str, device: torch.device) -> tuple[Any, nn.Module]:
    from reidkit.config import load_config
    from reidkit.engine import load_model

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (is {run_dir} a run folder?)")
    cfg = load_config(cfg_path)
    if cfg.model.name != "tkp":
        raise ValueError(
            f"{run_dir}: a '{cfg.model.name}' run; the TKP analysis needs TKP runs (with TKP, "
            "and without: configs/tkp/*_joint.yaml or *_image_only.yaml)"
        )
    model = load_model(cfg, _find_checkpoint(run_dir, checkpoint), device=device).eval()
    return cfg, model


def _png_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def _first_frames(cfg: Any, tracklets: list[Any], limit: int) -> tuple[torch.Tensor, list[Any]]:
    """The first frame of one tracklet per identity (up to ``limit`` identities), loaded
    by the image test loader: ``(images (B, 3, H, W), records)``."""
    from reidkit.data.loader import build_test_loader

    seen: set[int] = set()
    records = []
    for t in tracklets:
        if t.pid not in seen:
            seen.add(t.pid)
            records.append(t.frame(0))
        if len(records) >= limit:
            break
    images = torch.cat([b["images"] for b in build_test_loader(cfg, records)])
    return images, records


def analyze_tkp_runs(
    run: str | Path,
    baseline_run: str | Path,
    out_dir: str | Path,
    *,
    names: tuple[str, str] = ("with TKP", "without TKP"),
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
    projection: str = "auto",
    max_ids: int = 20,
    num_cams: int = 8,
    num_foreground: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """TKP's analyses for a run with TKP and one without (joint training or the image
    network alone), on the query tracklets of the run's dataset.

    Writes ``projection_pca.png`` (and ``projection_tsne.png`` with ``projection`` =
    ``tsne`` / ``auto`` when scikit-learn is installed), ``cams.png`` (first frames of
    training tracklets of ``num_cams`` identities, the image network's CAM of their true
    class in each run), ``summary.json`` and ``index.html`` to ``out_dir``. The
    projection shows the first ``max_ids`` query identities; the numbers use all query
    tracklets. Returns the summary (modality gaps per run, foreground shares).
    """
    if projection not in ("auto", "pca", "tsne", "both"):
        raise ValueError(f"projection: expected auto, pca, tsne or both, got {projection!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    runs = {names[0]: Path(run), names[1]: Path(baseline_run)}
    methods = ["pca"]
    if projection in ("tsne", "both") or (projection == "auto" and tsne_available()):
        if not tsne_available():
            raise ImportError("--projection tsne needs scikit-learn (pip install scikit-learn)")
        methods = ["tsne"] if projection == "tsne" else ["pca", "tsne"]
    from reidkit.data.datasets import dataset_from_config

    summary: dict[str, Any] = {"runs": {k: str(v) for k, v in runs.items()}, "gap": {}}
    panels: dict[str, dict[str, Any]] = {m: {} for m in methods}
    cam_columns: dict[str, torch.Tensor] = {}
    fg: dict[str, float] = {}
    frames = records = None
    for name, run_dir in runs.items():
        cfg, model = _load_run(run_dir, checkpoint, device)
        dataset = dataset_from_config(cfg.data)
        feats = modality_features(cfg, model, list(dataset.query), device, progress)
        summary["gap"][name] = modality_gap(feats.image, feats.video)
        ids = sorted(set(feats.video.pids.tolist()))[:max_ids]
        keep = torch.isin(feats.video.pids, torch.tensor(ids))
        both = torch.cat([feats.video.feats[keep], feats.image.feats[keep]])
        pids = torch.cat([feats.video.pids[keep], feats.image.pids[keep]])
        is_image = torch.cat([torch.zeros(int(keep.sum())), torch.ones(int(keep.sum()))]).bool()
        for m in methods:
            panels[m][name] = (project_2d(both, m), pids, is_image)
        if frames is None:
            frames, records = _first_frames(cfg, list(dataset.train), max(num_cams, num_foreground))
        targets = torch.tensor([r.pid for r in records])
        cams = image_cams(model, frames.to(device), targets.to(device)).cpu()
        cam_columns[name] = cams[:num_cams]
        if all(r.extras.get("keypoints") is not None for r in records):
            from reidkit.data.loader import build_test_loader

            kps = torch.cat([b["keypoints"] for b in build_test_loader(cfg, records)])
            boxes = keypoint_boxes(kps, frames.shape[-2], frames.shape[-1])
            fg[name] = float(foreground_share(cams, boxes).mean())
    summary["foreground_share"] = fg or None
    summary["projections"] = []
    for m in methods:
        path = plot_projection(
            panels[m], out / f"projection_{m}.png", f"image and video features ({m.upper()})"
        )
        summary["projections"].append(path.name)
    from reidkit.viz.grid import overlay_maps, save_image_grid, to_uint8_images

    assert frames is not None and records is not None
    shown = frames[:num_cams]
    scale = max(1, -(-112 // shown.shape[-1]))  # cells at least 112 pixels wide: readable
    if scale > 1:
        shown = torch.nn.functional.interpolate(
            shown, scale_factor=scale, mode="bilinear", align_corners=False
        )
    pixels = to_uint8_images(shown)
    columns = [overlay_maps(shown, _minmax(c)) for c in cam_columns.values()]
    rows = [[pixels[i], *[col[i] for col in columns]] for i in range(len(shown))]
    save_image_grid(
        rows,
        out / "cams.png",
        row_labels=[f"id {r.pid}" for r in records[: len(shown)]],
        col_labels=["image", *cam_columns],
    )
    summary["cams"] = "cams.png"
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_index(out, summary)
    return summary


def _write_index(out: Path, summary: dict[str, Any]) -> None:
    rows = []
    for name, g in summary["gap"].items():
        share = (summary.get("foreground_share") or {}).get(name)
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{g['same_id']:.3f}</td>"
            f"<td>{g['other_id']:.3f}</td><td>{g['ratio']:.3f}</td><td>{g['paired']:.3f}</td>"
            f"<td>{'-' if share is None else f'{100 * share:.1f}%'}</td></tr>"
        )
    figures = [*summary["projections"], summary["cams"]]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>TKP analysis</title>",
        "<style>body{font-family:sans-serif;margin:20px}td,th{padding:4px 10px;"
        "border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child"
        "{text-align:left}img{max-width:100%;margin:8px 0}</style></head>",
        "<body data-ready='0'><h1>TKP analysis</h1>",
        "<p>Runs: "
        + ", ".join(
            f"<b>{html.escape(k)}</b> <code>{html.escape(v)}</code>"
            for k, v in summary["runs"].items()
        )
        + "</p>",
        "<h2>Image vs video features</h2><p>Euclidean distances between L2-normalised "
        "features of the query tracklets: an identity's image features (first frames, image "
        "network) to its video feature (mean of its tracklets, video network), to the other "
        "identities' video features, their ratio (lower: modalities more consistent), and a "
        "frame to its own tracklet. Foreground: share of the image network's CAM inside the "
        "person's box (from keypoints).</p>",
        "<table><tr><th>model</th><th>same identity</th><th>other identities</th>"
        "<th>ratio</th><th>frame to own tracklet</th><th>CAM on the person</th></tr>",
        *rows,
        "</table>",
        *[f"<h2>{html.escape(f)}</h2>{_png_tag(out / f)}" for f in figures],
        # after the load event every embedded figure is decoded: count the ones that show
        "<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
        "document.body.dataset.images=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;"
        "document.body.dataset.ready='1'});</script>",
        "</body></html>",
    ]
    (out / "index.html").write_text("\n".join(parts))
