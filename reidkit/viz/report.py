"""Explainable ranking report: a self-contained HTML page of ranking lists with RAMs.

For each chosen query the page shows the query and its top-k gallery images (green
border: same identity, red: different), each with its ranking activation map overlay
(CAMA Eq. 10): the aggregate map of the test feature and, for multi-branch models, one
map per branch, plus any views the method adds through its ``report_views`` hook (CAN: where
the query and each ranked item attend given the other), switchable with buttons (plain JS,
no network). The page also carries the
summary metrics and the CMC curve (inline SVG). Images are embedded as base64 JPEG data
URIs, so the single file can be mailed or archived.

Queries are chosen to include rank-1 failures (``failure_fraction`` of them), since those
are what users inspect.

Entry points: :func:`build_ranking_report` (model + records + distance matrix -> file)
and the lower-level :func:`render_report_html` (rows of already-encoded images -> HTML).
Extra per-image views (``extra_views``: e.g. Grad-CAM of a part or of the query-gallery
similarity, :mod:`reidkit.viz.explain`) and extra page sections (``sections``: e.g.
IANet's receptive fields) plug into both.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from reidkit.metrics.table import format_percent
from reidkit.viz.ram import feature_maps, ranking_activation_map

__all__ = [
    "ExtraView",
    "ReportImage",
    "ReportRow",
    "jet",
    "overlay_heatmap",
    "to_data_uri",
    "cmc_svg",
    "select_queries",
    "ranked_gallery",
    "render_report_html",
    "build_ranking_report",
    "draw_boxes",
    "region_legend_html",
]

IMAGE_VIEW = "image"
AGGREGATE_VIEW = "aggregate"
REGIONS_VIEW = "regions"
KEYPOINT_REGIONS_VIEW = "keypoint_regions"


@dataclass
class ExtraView:
    """An extra overlay of every image of a ranking row.

    ``compute(batch, gallery)`` gets the row's images ``(1 + k, 3, H, W)`` (the query
    first, then its ranked gallery images, on the model's device) and the gallery indices,
    and returns maps ``(1 + k, h, w)`` in [0, 1].
    """

    key: str
    label: str
    compute: Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


@dataclass
class ReportImage:
    """One thumbnail: ``views`` maps a view key (``image``, ``aggregate``, ``branch1``...)
    to a data URI; ``kind`` is ``query``, ``match`` or ``nonmatch``."""

    views: dict[str, str]
    caption: str
    kind: str


@dataclass
class ReportRow:
    """A query and its ranked gallery images."""

    title: str
    query: ReportImage
    gallery: list[ReportImage]
    failure: bool
    extra: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------- images
def jet(values: np.ndarray) -> np.ndarray:
    """The jet colormap: ``values`` in [0, 1] of any shape -> uint8 RGB ``(..., 3)``."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * v - c), 0.0, 1.0) for c in (3.0, 2.0, 1.0)], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def overlay_heatmap(
    image: np.ndarray,
    heat: np.ndarray,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a jet heatmap over an image.

    ``image`` uint8 ``(H, W, 3)``, ``heat`` float ``(H, W)`` (same size); ``heat`` is
    scaled to [0, 1] with ``vmin``/``vmax`` (default: its own min/max). Returns uint8
    ``(H, W, 3)``.
    """
    if image.shape[:2] != heat.shape:
        raise ValueError(f"heatmap {heat.shape} must match the image size {image.shape[:2]}")
    lo = float(heat.min()) if vmin is None else vmin
    hi = float(heat.max()) if vmax is None else vmax
    scaled = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * jet(scaled).astype(np.float32)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def to_data_uri(image: np.ndarray, fmt: str = "JPEG", quality: int = 88) -> str:
    """uint8 ``(H, W, 3)`` -> ``data:image/jpeg;base64,...`` (or PNG)."""
    buf = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(image))
    if fmt.upper() == "JPEG":
        pil.save(buf, format="JPEG", quality=quality)
        mime = "image/jpeg"
    else:
        pil.save(buf, format="PNG")
        mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def draw_boxes(
    image: np.ndarray,
    boxes: np.ndarray | torch.Tensor,
    colors: Sequence[tuple[int, int, int]],
    width: int = 2,
) -> np.ndarray:
    """Outline normalised boxes on an image.

    ``image`` uint8 ``(H, W, 3)``; ``boxes`` ``(R, 4)`` ``(x_min, y_min, x_max, y_max)`` in
    [0, 1] image coordinates (rows with NaN are skipped; boxes reaching outside the image
    are drawn clipped); ``colors`` one RGB colour per box. Returns a new uint8 image.
    """
    arr = boxes.detach().float().cpu().numpy() if isinstance(boxes, torch.Tensor) else boxes
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4 or len(colors) != arr.shape[0]:
        raise ValueError(
            f"draw_boxes: expected (R, 4) boxes and R colours, got {arr.shape} and {len(colors)}"
        )
    h, w = image.shape[:2]
    pil = Image.fromarray(np.ascontiguousarray(image))
    draw = ImageDraw.Draw(pil)
    for box, color in zip(arr, colors):
        if not np.isfinite(box).all():
            continue
        x0, y0 = np.clip(box[0] * w, 0, w - 1), np.clip(box[1] * h, 0, h - 1)
        x1, y1 = np.clip(box[2] * w - 1, 0, w - 1), np.clip(box[3] * h - 1, 0, h - 1)
        if x1 < x0 or y1 < y0:
            continue
        draw.rectangle(
            [float(x0), float(y0), float(x1), float(y1)], outline=tuple(color), width=width
        )
    return np.asarray(pil)


def region_legend_html(
    names: Sequence[str],
    stages: Sequence[int],
    colors: dict[int, tuple[int, int, int]],
    iou: dict[int, float] | None = None,
) -> str:
    """The "Regions" section: one coloured entry per stage listing its regions and, when
    given, the mean IoU of the predicted with the keypoint boxes on the shown images."""
    items = []
    for stage in sorted(set(stages)):
        r, g, b = colors[stage]
        regions = ", ".join(n.replace("_", " ") for n, s in zip(names, stages) if s == stage)
        mean = ""
        if iou and stage in iou and not math.isnan(iou[stage]):
            mean = f" &nbsp;IoU {iou[stage]:.2f}"
        items.append(
            f"<li><span class='swatch' style='background:rgb({r},{g},{b})'></span>"
            f"stage {stage}: {html.escape(regions)}{mean}</li>"
        )
    note = (
        "Views <b>regions (predicted)</b>: the boxes the model located; <b>regions "
        "(keypoints)</b>: the keypoint boxes (visible keypoints + margin) they are trained "
        "towards. IoU: mean over the images shown, regions with visible keypoints."
    )
    return f"<div class='regions'><h2>Regions</h2><ul class='legend'>{''.join(items)}</ul><small>{note}</small></div>"


def cmc_svg(cmc: Sequence[float], max_rank: int = 20, width: int = 380, height: int = 240) -> str:
    """An inline SVG line chart of the CMC curve (ranks 1..``max_rank``, accuracy in %)."""
    values = [float(v) for v in list(cmc)[:max_rank]]
    if not values:
        return "<svg class='cmc' xmlns='http://www.w3.org/2000/svg'></svg>"
    if max(values) <= 1.0 + 1e-9:
        values = [100.0 * v for v in values]
    left, right, top, bottom = 44, 12, 12, 34
    pw, ph = width - left - right, height - top - bottom
    n = len(values)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (pw * i / (n - 1) if n > 1 else pw / 2)
        return x, top + ph * (1 - v / 100.0)

    parts = [
        f"<svg class='cmc' xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='CMC curve'>",
        f"<rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='#fafafa' stroke='#999'/>",
    ]
    for tick in range(0, 101, 20):
        _, y = xy(0, tick)
        parts.append(
            f"<line x1='{left}' x2='{left + pw}' y1='{y:.1f}' y2='{y:.1f}' stroke='#ddd'/>"
        )
        parts.append(
            f"<text x='{left - 6}' y='{y + 4:.1f}' font-size='11' text-anchor='end'>{tick}</text>"
        )
    for i in range(n):
        if i in (0, n - 1) or (i + 1) % 5 == 0:
            x, _ = xy(i, 0)
            parts.append(
                f"<text x='{x:.1f}' y='{top + ph + 16}' font-size='11' text-anchor='middle'>{i + 1}</text>"
            )
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(values)))
    parts.append(f"<polyline fill='none' stroke='#2b6cb0' stroke-width='2' points='{points}'/>")
    for i, v in enumerate(values):
        x, y = xy(i, v)
        parts.append(
            f"<circle cx='{x:.1f}' cy='{y:.1f}' r='2.5' fill='#2b6cb0'><title>rank {i + 1}: {format_percent(v / 100)}%</title></circle>"
        )
    parts.append(
        f"<text x='{left + pw / 2}' y='{height - 4}' font-size='12' text-anchor='middle'>rank</text>"
    )
    parts.append(
        f"<text x='12' y='{top + ph / 2}' font-size='12' text-anchor='middle' "
        f"transform='rotate(-90 12 {top + ph / 2})'>matching rate (%)</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- ranking
def _as_tensor(x, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(dtype) if dtype is not None else t


def _masked_distances(
    distmat: torch.Tensor,
    q_pids: torch.Tensor,
    g_pids: torch.Tensor,
    q_camids: torch.Tensor,
    g_camids: torch.Tensor,
) -> torch.Tensor:
    """Distances with the protocol's junk (same identity seen by the same camera) at +inf."""
    junk = (q_pids[:, None] == g_pids[None]) & (q_camids[:, None] == g_camids[None])
    return distmat.float().masked_fill(junk, float("inf"))


def select_queries(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    num: int,
    failure_fraction: float = 0.5,
    seed: int = 0,
    chunk: int = 512,
) -> tuple[list[int], list[bool]]:
    """Pick ``num`` queries, about ``failure_fraction`` of them rank-1 failures.

    Ranking follows the Market-1501 protocol (gallery images of the query's identity from
    the query's camera are ignored); queries without any valid true match are skipped.
    Returns (query indices, failure flags), failures first; if one group is short the
    other fills in. Deterministic given ``seed``.
    """
    dist = _as_tensor(distmat)
    qp, gp = _as_tensor(q_pids).long(), _as_tensor(g_pids).long()
    qc, gc = _as_tensor(q_camids).long(), _as_tensor(g_camids).long()
    fails, valid = [], []
    for s in range(0, dist.shape[0], chunk):
        sl = slice(s, s + chunk)
        d = _masked_distances(dist[sl], qp[sl], gp, qc[sl], gc)
        top1 = d.argmin(dim=1)
        fails.append(gp[top1] != qp[sl])
        has_match = ((qp[sl, None] == gp[None]) & (qc[sl, None] != gc[None])).any(dim=1)
        valid.append(has_match)
    fail = torch.cat(fails) if fails else torch.zeros(0, dtype=torch.bool)
    ok = torch.cat(valid) if valid else torch.zeros(0, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    fail_idx = torch.nonzero(fail & ok).flatten()
    succ_idx = torch.nonzero(~fail & ok).flatten()
    fail_idx = fail_idx[torch.randperm(len(fail_idx), generator=gen)]
    succ_idx = succ_idx[torch.randperm(len(succ_idx), generator=gen)]
    n_fail = min(len(fail_idx), math.ceil(num * failure_fraction))
    n_succ = min(len(succ_idx), num - n_fail)
    n_fail = min(len(fail_idx), num - n_succ)
    chosen = [int(i) for i in fail_idx[:n_fail]] + [int(i) for i in succ_idx[:n_succ]]
    return chosen, [True] * n_fail + [False] * n_succ


def ranked_gallery(
    distmat, q_index: int, q_pids, g_pids, q_camids, g_camids, topk: int
) -> list[int]:
    """Indices of the ``topk`` nearest valid gallery images of query ``q_index``."""
    dist = _as_tensor(distmat)[q_index : q_index + 1]
    qp, gp = _as_tensor(q_pids).long(), _as_tensor(g_pids).long()
    qc, gc = _as_tensor(q_camids).long(), _as_tensor(g_camids).long()
    d = _masked_distances(dist, qp[q_index : q_index + 1], gp, qc[q_index : q_index + 1], gc)[0]
    k = min(topk, int(torch.isfinite(d).sum()))
    return [int(i) for i in torch.topk(d, k, largest=False).indices]


# ---------------------------------------------------------------------------- render
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:18px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 6px} h2{font-size:16px;margin:18px 0 8px}
.summary{display:flex;gap:28px;align-items:flex-start;flex-wrap:wrap}
table.metrics{border-collapse:collapse} table.metrics td,table.metrics th{border:1px solid #ccc;padding:4px 10px;text-align:right}
#controls{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd;z-index:2}
#controls button{margin-right:6px;padding:4px 10px;border:1px solid #888;background:#f4f4f4;border-radius:4px;cursor:pointer}
#controls button.active{background:#2b6cb0;color:#fff;border-color:#2b6cb0}
.row{display:flex;gap:6px;align-items:flex-start;padding:8px 0;border-bottom:1px solid #eee}
.row .label{flex:0 0 96px;font-size:12px;color:#555}
.row .cells{display:flex;flex-wrap:wrap;gap:6px;align-items:flex-start;flex:1 1 0;min-width:0}
.row.failure .label b{color:#c53030}
.cell{display:flex;flex-direction:column;align-items:center;font-size:11px;width:min-content}
.cell img{height:160px;width:auto;border:4px solid #bbb;image-rendering:auto}
.cell.query img{border-color:#3182ce}
.cell.match img{border-color:#1a9641}
.cell.nonmatch img{border-color:#d7191c}
.cell .cap{max-width:120px;text-align:center;line-height:1.25;margin-top:2px}
.cap .nw{white-space:nowrap}
.sep{width:10px}
img.v{display:none} img.v.v-default{display:block}
ul.legend{list-style:none;padding:0;margin:4px 0} ul.legend li{margin:2px 0}
.swatch{display:inline-block;width:14px;height:10px;margin-right:6px;border-radius:2px}
"""

_JS = """
(function () {
  var views = JSON.parse(document.getElementById('report-views').textContent);
  var bar = document.getElementById('view-buttons');
  function show(key) {
    var imgs = document.querySelectorAll('img.v');
    for (var i = 0; i < imgs.length; i++) {
      imgs[i].style.display = imgs[i].getAttribute('data-view') === key ? 'block' : 'none';
    }
    var buttons = bar.querySelectorAll('button');
    for (var j = 0; j < buttons.length; j++) {
      buttons[j].classList.toggle('active', buttons[j].getAttribute('data-view') === key);
    }
    document.body.setAttribute('data-view', key);
  }
  views.keys.forEach(function (key, i) {
    var b = document.createElement('button');
    b.type = 'button';
    b.setAttribute('data-view', key);
    b.textContent = views.labels[i];
    b.addEventListener('click', function () { show(key); });
    bar.appendChild(b);
  });
  var onlyFail = document.getElementById('only-failures');
  onlyFail.addEventListener('change', function () {
    var rows = document.querySelectorAll('.row');
    for (var i = 0; i < rows.length; i++) {
      rows[i].style.display = (onlyFail.checked && !rows[i].classList.contains('failure')) ? 'none' : '';
    }
  });
  show(views.default);
  document.body.setAttribute('data-ready', '1');
})();
"""


def _id_caption(pid: int, camid: int) -> str:
    """``pid 12 · cam 3`` for a caption: cameras 1-based as in the file names (``c3``),
    ``?`` when unknown; each label stays on one line with its number."""
    cam = str(camid + 1) if camid >= 0 else "?"
    return f"<span class='nw'>pid {pid}</span> · <span class='nw'>cam {cam}</span>"


def _img_html(img: ReportImage, view_keys: Sequence[str], default: str) -> str:
    tags = []
    for key in view_keys:
        uri = img.views.get(key)
        if uri is None:
            raise ValueError(f"report image '{img.caption}' has no '{key}' view")
        cls = "v v-default" if key == default else "v"
        tags.append(
            f"<img class='{cls}' data-view='{html.escape(key)}' src='{uri}' alt='{html.escape(key)}'>"
        )
    return (
        f"<div class='cell {html.escape(img.kind)}'>"
        + "".join(tags)
        + f"<div class='cap'>{img.caption}</div></div>"
    )


def render_report_html(
    rows: Sequence[ReportRow],
    views: Sequence[tuple[str, str]],
    metrics: dict[str, float],
    cmc: Sequence[float],
    title: str = "reidkit ranking report",
    subtitle: str = "",
    default_view: str | None = None,
    summary_blocks: Sequence[str] = (),
    sections: Sequence[tuple[str, str]] = (),
    legend: str = "maps: ranking activation maps (Eq. 10)",
) -> str:
    """The whole page as a string.

    ``views`` is a list of ``(key, label)`` pairs (every image must carry every key);
    ``metrics`` are shown as a table (values in [0, 1] are printed as %); ``cmc`` is the
    CMC curve (fractions or %); ``summary_blocks`` are HTML blocks shown next to the
    metrics (e.g. :func:`region_legend_html`); ``sections`` are ``(title, html)`` blocks
    added after the ranking lists (the html is inserted as is); ``legend`` explains the
    overlays.
    """
    if not views:
        raise ValueError("render_report_html: at least one view is needed")
    keys = [k for k, _ in views]
    default = default_view or (AGGREGATE_VIEW if AGGREGATE_VIEW in keys else keys[0])
    metric_rows = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{format_percent(v)}%</td></tr>"
        if 0 <= v <= 1
        else f"<tr><th>{html.escape(name)}</th><td>{v:.4g}</td></tr>"
        for name, v in metrics.items()
    )
    n_fail = sum(r.failure for r in rows)
    body_rows = []
    for row in rows:
        cls = "row failure" if row.failure else "row success"
        status = "<b>rank-1 miss</b>" if row.failure else "rank-1 hit"
        cells = [_img_html(row.query, keys, default), "<div class='sep'></div>"]
        cells += [_img_html(g, keys, default) for g in row.gallery]
        body_rows.append(
            # the cells wrap inside their own box: wide cells (a view with a partner map shows
            # two images per cell) go to a second line instead of squeezing the label
            f"<div class='{cls}'><div class='label'>{html.escape(row.title)}<br>{status}</div>"
            f"<div class='cells'>{''.join(cells)}</div></div>"
        )
    view_json = json.dumps({"keys": keys, "labels": [lbl for _, lbl in views], "default": default})
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        "<body data-ready='0'>"
        f"<h1>{html.escape(title)}</h1><div class='sub'>{html.escape(subtitle)}</div>"
        "<div class='summary'><div><h2>Metrics</h2>"
        f"<table class='metrics'>{metric_rows}</table></div>"
        f"<div><h2>CMC</h2>{cmc_svg(cmc)}</div>{''.join(summary_blocks)}</div>"
        f"<h2>Ranking lists ({len(rows)} queries, {n_fail} rank-1 misses)</h2>"
        "<div id='controls'>Overlay: <span id='view-buttons'></span> "
        "<label><input type='checkbox' id='only-failures'> only rank-1 misses</label>"
        " &nbsp;<small>border: <span style='color:#1a9641'>green</span> same identity, "
        f"<span style='color:#d7191c'>red</span> different; {html.escape(legend)}</small></div>"
        f"<div id='rows'>{''.join(body_rows)}</div>"
        + "".join(
            f"<h2>{html.escape(t)}</h2><div class='section'>{body}</div>" for t, body in sections
        )
        + f"<script type='application/json' id='report-views'>{view_json}</script>"
        f"<script>{_JS}</script></body></html>"
    )


# ----------------------------------------------------------------------------- build
def _to_uint8_images(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Undo the input normalisation: ``(B, 3, H, W)`` -> uint8 ``(B, H, W, 3)``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (images.detach().float().cpu() * s + m).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


@dataclass
class _MethodView:
    """A method's :class:`~reidkit.methods.base.ReportView`, upsampled to the image size."""

    key: str
    label: str
    heat: np.ndarray  # (1 + k, H, W)
    partner: np.ndarray | None  # (1 + k, H, W) over the query image
    vmin: float | None
    vmax: float | None

    def cell(self, pixels: np.ndarray, j: int, alpha: float) -> np.ndarray:
        """The overlay of cell ``j`` (``pixels`` uint8 ``(1 + k, H, W, 3)``, query first):
        with a partner map, the query's overlay, a white gap, then the item's overlay."""
        own = overlay_heatmap(pixels[j], self.heat[j], alpha, self.vmin, self.vmax)
        if self.partner is None or j == 0:
            return own
        query = overlay_heatmap(pixels[0], self.partner[j], alpha, self.vmin, self.vmax)
        gap = np.full((own.shape[0], max(2, own.shape[1] // 16), 3), 255, dtype=np.uint8)
        return np.concatenate([query, gap, own], axis=1)


def _method_views(model: nn.Module, batch: torch.Tensor) -> list[_MethodView]:
    """The views of the model's ``report_views(images)`` hook (none without it)."""
    hook = getattr(model, "report_views", None)
    if not callable(hook):
        return []
    size = batch.shape[-2:]
    n = batch.shape[0]

    def up(heat: torch.Tensor, what: str, key: str) -> np.ndarray:
        if heat.dim() != 3 or heat.shape[0] != n:
            raise ValueError(
                f"{type(model).__name__}.report_views: view '{key}' {what} must be "
                f"({n}, h, w) for {n} images, got {tuple(heat.shape)}"
            )
        big = F.interpolate(heat[:, None].float(), size=size, mode="bilinear", align_corners=False)
        return big[:, 0].cpu().numpy()

    out = []
    for view in hook(batch):
        partner = (
            None if view.partner_heat is None else up(view.partner_heat, "partner_heat", view.key)
        )
        out.append(
            _MethodView(
                view.key, view.label, up(view.heat, "heat", view.key), partner, view.vmin, view.vmax
            )
        )
    return out


@torch.no_grad()
def build_ranking_report(
    model: nn.Module,
    load_images: Callable[[Sequence[int], Sequence[int]], tuple[torch.Tensor, torch.Tensor]],
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    metrics: dict[str, float],
    cmc: Sequence[float],
    out_path: str | Path,
    num_queries: int = 12,
    topk: int = 10,
    failure_fraction: float = 0.5,
    feature: str = "post_bn",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    device: torch.device | str | None = None,
    seed: int = 0,
    title: str = "reidkit ranking report",
    subtitle: str = "",
    alpha: float = 0.5,
    load_keypoints: Callable[
        [Sequence[int], Sequence[int]], tuple[torch.Tensor | None, torch.Tensor | None]
    ]
    | None = None,
    extra_views: Sequence[ExtraView] = (),
    sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the HTML report for a trained model.

    Args:
        model: a model with ``forward_maps`` (CAMA: per-branch views) or a single-head
            baseline (``backbone`` + BN/Linear head). A model with a
            ``report_views(images)`` hook (:class:`reidkit.methods.base.ReportView`) adds
            its own views, e.g. CAN's cross-attention maps of each (query, item) pair.
        load_images: ``(query indices, gallery indices) -> (query images, gallery images)``,
            normalised ``(n, 3, H, W)`` tensors as the test loader produces them.
        distmat: ``(num_query, num_gallery)`` distances used for the ranking.
        q_pids, g_pids, q_camids, g_camids: identities and cameras (evaluation protocol).
        metrics, cmc: summary numbers and the CMC curve shown at the top.
        out_path: the ``.html`` file to write (its folder is created).
        num_queries, topk, failure_fraction, seed: which queries and how many results.
        feature: ``post_bn`` or ``pre_bn`` maps (match the test feature).
        mean, std: input normalisation, to show the images as the model saw them.
        load_keypoints: ``(query indices, gallery indices) -> (query, gallery)`` pixel
            keypoints ``(n, 17, 3)`` of the loaded images (``None`` where a split has
            none). For models that locate body regions (``predict_boxes``, MGRe) the page
            gets a "regions (predicted)" view (the seven boxes coloured by stage) and, with
            keypoints, a "regions (keypoints)" view of the keypoint boxes they are trained
            towards, plus a Regions section (legend, mean IoU over the shown images).
        extra_views: more overlays per image (:class:`ExtraView`, e.g. Grad-CAM).
        sections: ``(title, html)`` blocks appended to the page.

    Returns:
        The path written.
    """
    device = device if device is not None else next(model.parameters()).device
    chosen, failures = select_queries(
        distmat, q_pids, g_pids, q_camids, g_camids, num_queries, failure_fraction, seed
    )
    if not chosen:
        raise ValueError("ranking report: no query has a valid true match in the gallery")
    gp = _as_tensor(g_pids).long()
    qp = _as_tensor(q_pids).long()
    qc, gc = _as_tensor(q_camids).long(), _as_tensor(g_camids).long()
    dist = _as_tensor(distmat)
    n_test = int(getattr(model, "test_branches", getattr(model, "num_branches", 1)))
    views: list[tuple[str, str]] | None = None
    method_keys: list[str] = []
    rows: list[ReportRow] = []
    regions = _RegionViews(model, load_keypoints) if hasattr(model, "predict_boxes") else None
    for qi, failed in zip(chosen, failures):
        gal = ranked_gallery(dist, qi, qp, gp, qc, gc, topk)
        q_img, g_img = load_images([qi], gal)
        batch = torch.cat([q_img, g_img]).to(device)
        fmaps = feature_maps(model, batch, feature=feature)  # (N, 1+k, d, h, w)
        f_q = fmaps[:, 0].mean(dim=(-2, -1))  # (N, d)
        branch_rams = ranking_activation_map(f_q, fmaps, normalize_query=True)  # (N, 1+k, h, w)
        aggregate = branch_rams[:n_test].mean(dim=0, keepdim=True)
        stack = torch.cat([aggregate, branch_rams]) if branch_rams.shape[0] > 1 else aggregate
        maps = [stack]
        for view in extra_views:  # each at its own resolution, straight to the image size
            maps.append(view.compute(batch, gal)[None])
        up = np.concatenate(
            [
                F.interpolate(
                    m.float(), size=batch.shape[-2:], mode="bilinear", align_corners=False
                )
                .cpu()
                .numpy()
                for m in maps
            ]
        )
        n_maps = up.shape[0]
        if views is None:
            views = [(IMAGE_VIEW, "image"), (AGGREGATE_VIEW, "aggregate")]
            if branch_rams.shape[0] > 1:
                views += [
                    (f"branch{i + 1}", f"branch {i + 1}") for i in range(branch_rams.shape[0])
                ]
            views += [(v.key, v.label) for v in extra_views]
        pixels = _to_uint8_images(batch, mean, std)
        region_uris: dict[str, list[str]] = {}
        if regions is not None:
            region_uris = regions.views(batch, pixels, [qi], gal)
            known = {k for k, _ in views}
            views += [(k, lbl) for k, lbl in regions.labels if k in region_uris and k not in known]
        method_views = _method_views(model, batch)
        if not rows:
            method_keys = [mv.key for mv in method_views]
            known = {k for k, _ in views}
            clash = [k for k in method_keys if k in known]
            if clash:
                raise ValueError(
                    f"{type(model).__name__}.report_views: view key(s) {clash} are taken by the "
                    f"report's own views {sorted(known)}; use other keys"
                )
            views += [(mv.key, mv.label) for mv in method_views]
        elif [mv.key for mv in method_views] != method_keys:
            raise ValueError(
                f"{type(model).__name__}.report_views gave views "
                f"{[mv.key for mv in method_views]} for query {qi}, {method_keys} before"
            )
        cells = []
        for j in range(batch.shape[0]):
            uris = {IMAGE_VIEW: to_data_uri(pixels[j])}
            for key, images in region_uris.items():
                uris[key] = images[j]
            for v, (key, _) in enumerate(views[1 : 1 + n_maps]):
                uris[key] = to_data_uri(overlay_heatmap(pixels[j], up[v, j], alpha=alpha))
            for mv in method_views:
                uris[mv.key] = to_data_uri(mv.cell(pixels, j, alpha))
            if j == 0:
                cap = f"query<br>{_id_caption(int(qp[qi]), int(qc[qi]))}"
                cells.append(ReportImage(uris, cap, "query"))
            else:
                g = gal[j - 1]
                match = bool(gp[g] == qp[qi])
                cap = f"#{j} · {_id_caption(int(gp[g]), int(gc[g]))}<br>d={float(dist[qi, g]):.3f}"
                cells.append(ReportImage(uris, cap, "match" if match else "nonmatch"))
        rows.append(ReportRow(f"query {qi}", cells[0], cells[1:], failed))
    summary_blocks = [regions.section()] if regions is not None else []
    legend = "maps: ranking activation maps (Eq. 10)"
    extra_labels = [v.label for v in extra_views]
    if views:
        extra_labels += [lbl for k, lbl in views if k in method_keys]
    if extra_labels:
        legend += "; " + ", ".join(extra_labels)
    page = render_report_html(
        rows,
        views or [],
        metrics,
        cmc,
        title=title,
        subtitle=subtitle,
        summary_blocks=summary_blocks,
        sections=sections,
        legend=legend,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


class _RegionViews:
    """The region views of a model with ``predict_boxes`` (MGRe): predicted boxes and the
    keypoint boxes they are trained towards, drawn per stage colour; IoU accumulated over
    the images shown."""

    labels = (
        (REGIONS_VIEW, "regions (predicted)"),
        (KEYPOINT_REGIONS_VIEW, "regions (keypoints)"),
    )

    def __init__(self, model: nn.Module, load_keypoints: Callable | None) -> None:
        from reidkit.methods.mgre import REGION_NAMES, REGION_STAGE, STAGE_COLORS

        self.model = model
        self.load_keypoints = load_keypoints
        self.names = REGION_NAMES
        self.stages = [REGION_STAGE[n] for n in REGION_NAMES]
        self.colors = STAGE_COLORS
        self.colours = [STAGE_COLORS[s] for s in self.stages]
        self.iou_sum: dict[int, float] = {}
        self.iou_count: dict[int, int] = {}

    def _keypoints(self, q_idx: list[int], g_idx: list[int]) -> torch.Tensor | None:
        if self.load_keypoints is None:
            return None
        kq, kg = self.load_keypoints(q_idx, g_idx)
        if kq is None or kg is None:
            return None
        return torch.cat([kq, kg]).float()

    def views(
        self, batch: torch.Tensor, pixels: np.ndarray, q_idx: list[int], g_idx: list[int]
    ) -> dict[str, list[str]]:
        from reidkit.data.keypoints import normalize_keypoints
        from reidkit.methods.mgre import REGION_NAMES, STAGE_REGIONS, keypoint_boxes, region_iou

        kp = self._keypoints(q_idx, g_idx)
        kp_dev = kp.to(batch.device) if kp is not None else None
        was_training = self.model.training
        self.model.eval()
        try:
            boxes = self.model.predict_boxes(batch, kp_dev).float().cpu()  # (n, 7, 4)
        finally:
            self.model.train(was_training)
        out = {
            REGIONS_VIEW: [
                to_data_uri(draw_boxes(p, b, self.colours)) for p, b in zip(pixels, boxes)
            ]
        }
        if kp is None:
            return out
        kp_norm = normalize_keypoints(kp, *batch.shape[-2:])
        targets = torch.full_like(boxes, float("nan"))
        margin = float(getattr(getattr(self.model, "opts", None), "loc_margin", 0.05))
        for stage, region_kps in self.model.located_region_keypoints().items():
            idx = [REGION_NAMES.index(n) for n in STAGE_REGIONS[stage]]
            target, valid = keypoint_boxes(kp_norm, region_kps, margin)
            targets[:, idx] = torch.where(valid[..., None], target, float("nan"))
            iou, valid = region_iou(boxes[:, idx], kp_norm, region_kps, margin)
            self.iou_sum[stage] = self.iou_sum.get(stage, 0.0) + float(iou[valid].sum())
            self.iou_count[stage] = self.iou_count.get(stage, 0) + int(valid.sum())
        out[KEYPOINT_REGIONS_VIEW] = [
            to_data_uri(draw_boxes(p, b, self.colours)) for p, b in zip(pixels, targets)
        ]
        return out

    def section(self) -> str:
        iou = {s: self.iou_sum[s] / self.iou_count[s] for s in self.iou_sum if self.iou_count[s]}
        return region_legend_html(self.names, self.stages, self.colors, iou)
