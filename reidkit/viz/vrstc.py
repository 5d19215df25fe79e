"""VRSTC's visual page: occluded frames, the detected regions, STCnet's ``x1`` and ``x2``
and (on the synthetic video set) the ground truth, side by side; one self-contained HTML
file (every image embedded as a PNG data URI, no network).

Each sample tracklet shows a strip of all its frames (detected occluded regions tinted
red, truly occluded ones framed in blue) and, for its occluded frames (detected, or truly
occluded and missed), one row per frame::

    occluded frame | detected regions (scores) | x1 (spatial) | x2 (temporal) | ground truth
    | previous / next unoccluded frame

A control enlarges the images and hides rows without ground truth. The page sets
``body[data-ready="1"]`` once its script has run (for browser tests).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from reidkit.methods.vrstc import region_bounds
from reidkit.viz.report import to_data_uri

__all__ = ["PageFrame", "PageTracklet", "outline_regions", "render_vrstc_page", "to_uint8_image"]


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in ``[-1, 1]`` (STCnet's range) or uint8 -> ``(H, W, 3)`` uint8."""
    x = x.detach().cpu()
    if x.dtype != torch.uint8:
        x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(1, 2, 0).contiguous().numpy()


def outline_regions(
    image: np.ndarray,
    flags: Sequence[bool],
    num_regions: int,
    tint: float = 0.35,
    truth: Sequence[bool] | None = None,
) -> np.ndarray:
    """``image (H, W, 3)`` with the flagged horizontal regions tinted red and outlined;
    ``truth``: the truly occluded regions get a blue frame one pixel inside."""
    out = image.astype(np.float32).copy()
    h, w = out.shape[:2]
    red = np.array([230.0, 30.0, 30.0])
    blue = np.array([30.0, 90.0, 240.0])
    for r, (a, b) in enumerate(region_bounds(h, num_regions)):
        if flags[r]:
            out[a:b] = (1 - tint) * out[a:b] + tint * red
            out[a, :] = out[b - 1, :] = red
            out[a:b, 0] = out[a:b, w - 1] = red
        if truth is not None and truth[r] and b - a > 2 and w > 2:
            out[a + 1, 1 : w - 1] = out[b - 2, 1 : w - 1] = blue
            out[a + 1 : b - 1, 1] = out[a + 1 : b - 1, w - 2] = blue
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@dataclass
class PageFrame:
    """One occluded frame's row. Images are ``(H, W, 3)`` uint8; ``x1`` / ``x2`` are None
    for a truly occluded frame the detector missed (nothing is completed); ``truth`` is
    None without ground truth; ``prev`` / ``next`` None when the tracklet has no
    unoccluded frame."""

    t: int
    name: str
    frame: np.ndarray
    regions: np.ndarray
    x1: np.ndarray | None
    x2: np.ndarray | None
    scores: Sequence[float]
    flags: Sequence[bool]
    truth: np.ndarray | None = None
    prev: np.ndarray | None = None
    next: np.ndarray | None = None
    prev_t: int = -1
    next_t: int = -1
    truth_regions: Sequence[bool] | None = None


@dataclass
class PageTracklet:
    """A sample tracklet: its title, the strip of all frames (outlined) and the rows."""

    title: str
    strip: list[np.ndarray]
    strip_flags: list[bool]
    frames: list[PageFrame] = field(default_factory=list)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:16px;color:#222;--h:128px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 6px}
.sub{color:#555;font-size:13px;margin-bottom:10px}
table.summary{border-collapse:collapse;font-size:13px} table.summary td,table.summary th{border:1px solid #ccc;padding:2px 8px;text-align:left}
.strip{display:flex;gap:2px;flex-wrap:wrap;margin:4px 0 8px}
.strip img{height:calc(var(--h) * .5);image-rendering:pixelated;border:2px solid transparent}
.strip img.occ{border-color:#d7191c}
.row{display:flex;gap:8px;align-items:flex-start;margin:4px 0;padding:4px;border-top:1px solid #eee}
.cell{text-align:center;font-size:11px;color:#444}
.cell img{height:var(--h);image-rendering:pixelated;display:block;margin:0 auto 2px}
.label{width:110px;font-size:11px;color:#333;overflow-wrap:anywhere}
.missed .x1,.missed .x2{color:#d7191c}
.cols{display:flex;gap:8px;font-size:12px;font-weight:600;margin-left:118px;color:#333}
.cols span{display:inline-block;text-align:center}
#controls{font-size:13px;margin:8px 0}
.tracklet{margin-bottom:18px}
"""

_JS = """
(function(){
  var size = document.getElementById('size');
  function apply(){ document.body.style.setProperty('--h', size.value + 'px'); }
  size.addEventListener('input', apply); apply();
  var only = document.getElementById('only-truth');
  only.addEventListener('change', function(){
    document.querySelectorAll('.row').forEach(function(r){
      r.style.display = (only.checked && r.dataset.truth !== '1') ? 'none' : '';
    });
  });
  document.body.dataset.ready = '1';
})();
"""


def _cell(image: np.ndarray | None, caption: str, cls: str) -> str:
    if image is None:
        return (
            f"<div class='cell {cls}'><div style='height:var(--h);width:calc(var(--h) / 2)'>"
            f"</div>{caption}</div>"
        )
    return (
        f"<div class='cell {cls}'><img src='{to_data_uri(image, 'PNG')}' "
        f"alt='{html.escape(cls)}'>{caption}</div>"
    )


def render_vrstc_page(
    tracklets: Sequence[PageTracklet],
    title: str = "VRSTC: occlusion detection and completion",
    subtitle: str = "",
    summary: dict[str, object] | None = None,
) -> str:
    """The whole page as a string."""
    rows_html = []
    n_rows = n_truth = 0
    for tr in tracklets:
        strip = "".join(
            f"<img class='{'occ' if occ else 'ok'}' src='{to_data_uri(img, 'PNG')}' "
            f"title='frame {i}{' (detected)' if occ else ''}'>"
            for i, (img, occ) in enumerate(zip(tr.strip, tr.strip_flags))
        )
        frames = []
        for fr in tr.frames:
            n_rows += 1
            has_truth = fr.truth is not None
            n_truth += has_truth
            scores = " ".join(
                f"<b style='color:#d7191c'>{s:.2f}</b>" if f else f"{s:.2f}"
                for s, f in zip(fr.scores, fr.flags)
            )
            truth_caption = "ground truth"
            if fr.truth_regions is not None:
                truth_caption += (
                    " (true: "
                    + (", ".join(str(r + 1) for r, f in enumerate(fr.truth_regions) if f) or "none")
                    + ")"
                )
            cells = [
                _cell(fr.frame, f"frame {fr.t}", "frame"),
                _cell(fr.regions, f"scores {scores}", "regions"),
                _cell(fr.x1, "x1 (spatial)" if fr.x1 is not None else "missed: kept", "x1"),
                _cell(fr.x2, "x2 (temporal)" if fr.x2 is not None else "missed: kept", "x2"),
                _cell(fr.truth, truth_caption if has_truth else "no ground truth", "truth"),
                _cell(fr.prev, f"prev {fr.prev_t}" if fr.prev is not None else "no prev", "prev"),
                _cell(fr.next, f"next {fr.next_t}" if fr.next is not None else "no next", "next"),
            ]
            missed = " missed" if fr.x1 is None else ""
            frames.append(
                f"<div class='row{missed}' data-truth='{int(has_truth)}'>"
                f"<div class='label'>{html.escape(fr.name)}</div>{''.join(cells)}</div>"
            )
        rows_html.append(
            f"<div class='tracklet'><h2>{html.escape(tr.title)}</h2>"
            f"<div class='strip'>{strip}</div>{''.join(frames)}</div>"
        )
    summary_rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in (summary or {}).items()
    )
    meta = json.dumps({"tracklets": len(tracklets), "rows": n_rows, "with_truth": n_truth})
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        "<body data-ready='0'>"
        f"<h1>{html.escape(title)}</h1><div class='sub'>{html.escape(subtitle)}</div>"
        f"<table class='summary'>{summary_rows}</table>"
        "<div id='controls'><label>image height <input type='range' id='size' min='64' "
        "max='384' step='16' value='128'></label> &nbsp; <label><input type='checkbox' "
        "id='only-truth'> only frames with ground truth</label> &nbsp;<small>strip: every "
        "frame of the tracklet, red border = a detected occluded region; rows: the occluded "
        "frames. Red bands = detected regions (score &lt; tau, in red); blue frames = truly "
        "occluded regions (ground truth).</small></div>"
        f"<div id='tracklets'>{''.join(rows_html)}</div>"
        f"<script type='application/json' id='page-meta'>{meta}</script>"
        f"<script>{_JS}</script></body></html>"
    )


def write_vrstc_page(path: str | Path, page: str) -> Path:
    """Write the page (UTF-8), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
