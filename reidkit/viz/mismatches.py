"""Rank-1 mismatch browser (SCR supplementary, Sec. 2).

The SCR authors looked at every rank-1 mismatch of their model on Market-1501 and sorted
them into misalignment, annotation error, detector false positive (distractor), occlusion,
very similar clothes and unsure. This module makes that a tool:

- :func:`rank1_mismatches` finds every valid query whose nearest gallery image has another
  identity, with its wrong rank-1, its best true match and both distances (vectorised per
  chunk of queries, from a distance matrix or from features; the evaluation protocol of
  :mod:`reidkit.metrics.rank`: same-identity same-camera gallery images are junk, ties go to
  the lower gallery index).
- :func:`write_mismatch_browser` writes one self-contained HTML page (thumbnails embedded as
  JPEG data URIs, as the ranking report) where a user tags each mismatch with a category:
  keys 1-6, 0 / Backspace to clear, j / k to move, n to the next untagged one; running
  counts per category; a filter; tags kept in the browser's ``localStorage`` (they survive
  a reload), a button that saves them to a JSON file, and a button that loads such a file.
  Tags saved by an earlier run can also be embedded by the Python side (``tags=``); the
  newer of two tags for the same mismatch wins, and tags of mismatches that are not on the
  page are carried over into the next save, so nothing is lost between runs.
- :func:`load_mismatch_tags` / :func:`tag_counts` read a saved file back (the counts are
  the paper's list).

A mismatch is identified by ``"<query name>|<wrong rank-1 name>"`` (image file names when
paths are given, else ``q<index>``/``g<index>``), so a tag follows the mismatch across runs
and models; a query tagged earlier against another rank-1 shows that earlier tag as a hint.
"""

from __future__ import annotations

import hashlib
import html
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from reidkit.metrics.distance import GalleryDistance, Metric, as_tensor
from reidkit.viz.report import to_data_uri

__all__ = [
    "MISMATCH_CATEGORIES",
    "TAGS_FORMAT",
    "Mismatch",
    "RankOneMismatches",
    "rank1_mismatches",
    "mismatch_key",
    "load_mismatch_tags",
    "tag_counts",
    "render_mismatch_page",
    "write_mismatch_browser",
]

#: ``(id, label)`` of the categories, in the order of the SCR supplementary; keys 1-6.
MISMATCH_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("misalignment", "misalignment"),
    ("annotation_error", "annotation error"),
    ("distractor", "detector false positive (distractor)"),
    ("occlusion", "occlusion"),
    ("similar_clothes", "very similar clothes"),
    ("unsure", "unsure"),
)
TAGS_FORMAT = "reidkit-mismatch-tags"
TAGS_VERSION = 1

_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------- computing
@dataclass(frozen=True)
class Mismatch:
    """One rank-1 mismatch: gallery indices and distances.

    ``true_rank`` is the 1-based rank of the best true match (>= 2 by definition).
    """

    query: int
    wrong: int
    true: int
    wrong_dist: float
    true_dist: float
    true_rank: int


@dataclass
class RankOneMismatches:
    """All rank-1 mismatches of an evaluation (query order) and the number of valid
    queries, so ``1 - len(m) / m.num_valid`` is the rank-1 accuracy."""

    items: list[Mismatch]
    num_valid: int
    num_query: int

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def __getitem__(self, i: int) -> Mismatch:
        return self.items[i]

    @property
    def rank1(self) -> float:
        """Rank-1 accuracy over the valid queries."""
        return 1.0 - len(self.items) / self.num_valid if self.num_valid else 0.0


def rank1_mismatches(
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    *,
    distmat: np.ndarray | torch.Tensor | None = None,
    qf: np.ndarray | torch.Tensor | None = None,
    gf: np.ndarray | torch.Tensor | None = None,
    metric: Metric = "cosine",
    ignore_gallery_pids: Sequence[int] | None = None,
    chunk_size: int | None = None,
) -> RankOneMismatches:
    """Every valid query whose rank-1 gallery image has another identity.

    Give either ``distmat (Q, G)`` or query/gallery features ``qf (Q, D)``, ``gf (G, D)``
    with ``metric`` (``cosine``: ``1 - cos``, ``euclidean``, ``sqeuclidean``; computed per
    chunk of queries, never the whole matrix). ``q_camids``/``g_camids`` ``None`` is the
    no-camera mode (nothing is junk); ``ignore_gallery_pids`` removes gallery pids for
    every query, as in :func:`reidkit.metrics.evaluate_rank`.
    """
    if (distmat is None) == (qf is None or gf is None):
        raise ValueError("rank1_mismatches: give either distmat or both qf and gf")
    if (q_camids is None) != (g_camids is None):
        raise ValueError("rank1_mismatches: give both q_camids and g_camids, or neither")
    dist_fn = None
    if distmat is not None:
        dist = as_tensor(distmat, "distmat")
        if dist.dim() != 2:
            raise ValueError(f"distmat: expected (Q, G), got shape {tuple(dist.shape)}")
        num_q, num_g = dist.shape
        device = dist.device
    else:
        dist_fn = GalleryDistance(gf, metric)
        q_feats = as_tensor(qf, "qf")
        num_q, num_g = q_feats.shape[0], dist_fn.g.shape[0]
        device = dist_fn.g.device
    qp = as_tensor(q_pids, "q_pids", device).long().flatten()
    gp = as_tensor(g_pids, "g_pids", device).long().flatten()
    if qp.numel() != num_q or gp.numel() != num_g:
        raise ValueError(
            f"rank1_mismatches: {num_q} queries x {num_g} gallery images, but q_pids has "
            f"{qp.numel()} and g_pids {gp.numel()} entries"
        )
    qc = gc = None
    if q_camids is not None:
        qc = as_tensor(q_camids, "q_camids", device).long().flatten()
        gc = as_tensor(g_camids, "g_camids", device).long().flatten()
        if qc.numel() != num_q or gc.numel() != num_g:
            raise ValueError(
                "rank1_mismatches: camids must have one entry per query / gallery image"
            )
    keep_g = torch.ones(num_g, dtype=torch.bool, device=device)
    if ignore_gallery_pids:
        keep_g &= ~torch.isin(gp, torch.as_tensor(list(ignore_gallery_pids), device=device))
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(num_g, 1))
    arange_g = torch.arange(num_g, device=device)
    found: list[torch.Tensor] = []
    num_valid = 0
    for s in range(0, num_q, chunk):
        e = min(s + chunk, num_q)
        block = dist[s:e] if dist_fn is None else dist_fn(q_feats[s:e])
        d = block.float() if block.dtype in (torch.float16, torch.bfloat16) else block
        same = qp[s:e, None] == gp[None]
        junk = same & (qc[s:e, None] == gc[None]) if qc is not None else torch.zeros_like(same)
        usable = keep_g[None] & ~junk
        d = d.masked_fill(~usable, float("inf"))
        is_true = same & usable
        valid = is_true.any(dim=1)
        num_valid += int(valid.sum())
        top1 = d.argmin(dim=1)  # first index among ties = stable order
        miss = valid & (gp[top1] != qp[s:e])
        rows = torch.nonzero(miss).flatten()
        if rows.numel() == 0:
            continue
        d_rows = d[rows]
        d_true = d_rows.masked_fill(~is_true[rows], float("inf"))
        best = d_true.argmin(dim=1)
        best_d = d_true.gather(1, best[:, None])
        ahead = (d_rows < best_d) | ((d_rows == best_d) & (arange_g[None] < best[:, None]))
        rank = ahead.sum(dim=1) + 1
        wrong = top1[rows]
        found.append(
            torch.stack(
                [
                    (rows + s).double(),
                    wrong.double(),
                    best.double(),
                    d_rows.gather(1, wrong[:, None]).squeeze(1).double(),
                    best_d.squeeze(1).double(),
                    rank.double(),
                ],
                dim=1,
            ).cpu()
        )
    table = torch.cat(found).tolist() if found else []
    items = [
        Mismatch(int(q), int(w), int(t), float(dw), float(dt), int(r))
        for q, w, t, dw, dt, r in table
    ]
    return RankOneMismatches(items=items, num_valid=num_valid, num_query=num_q)


# ------------------------------------------------------------------------- tags
def mismatch_key(query_name: str, wrong_name: str) -> str:
    """The id of a mismatch in the tag files: ``"<query>|<wrong rank-1>"``."""
    return f"{query_name}|{wrong_name}"


def _tags_error(path: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {msg}")


def _validate_tags(data: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(data, Mapping):
        raise _tags_error(where, f"expected a JSON object, got {type(data).__name__}")
    fmt = data.get("format")
    if fmt != TAGS_FORMAT:
        raise _tags_error(
            where, f"field 'format' must be '{TAGS_FORMAT}', got {fmt!r} (not a mismatch tag file?)"
        )
    tags = data.get("tags")
    if not isinstance(tags, Mapping):
        raise _tags_error(where, "field 'tags' must be an object mapping mismatch ids to tags")
    known = {cid for cid, _ in MISMATCH_CATEGORIES}
    out: dict[str, dict[str, Any]] = {}
    for key, entry in tags.items():
        if not isinstance(entry, Mapping):
            raise _tags_error(where, f"tags['{key}'] must be an object with 'tag' and 'updated'")
        tag = entry.get("tag")
        if tag not in known:
            raise _tags_error(
                where, f"tags['{key}'].tag is {tag!r}; expected one of {', '.join(sorted(known))}"
            )
        updated = entry.get("updated", 0)
        if not isinstance(updated, (int, float)) or isinstance(updated, bool):
            raise _tags_error(
                where, f"tags['{key}'].updated must be a number (ms since 1970), got {updated!r}"
            )
        out[str(key)] = {**dict(entry), "tag": tag, "updated": updated}
    return out


def load_mismatch_tags(source: str | Path | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Read the tags saved by the page: ``{mismatch id: {"tag", "updated", ...}}``.

    ``source`` is the JSON file (or its already-parsed content). Errors name the file and
    the field.
    """
    if isinstance(source, Mapping):
        return _validate_tags(source, "tags")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"mismatch tags file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _tags_error(str(path), f"not valid JSON: {exc}") from exc
    return _validate_tags(data, str(path))


def tag_counts(
    tags: Mapping[str, Mapping[str, Any]], keys: Sequence[str] | None = None
) -> dict[str, int]:
    """Mismatches per category (all categories, in order), over ``keys`` when given
    (then also ``untagged``)."""
    counts = {cid: 0 for cid, _ in MISMATCH_CATEGORIES}
    chosen = tags if keys is None else {k: tags[k] for k in keys if k in tags}
    for entry in chosen.values():
        counts[entry["tag"]] += 1
    if keys is not None:
        counts["untagged"] = len(keys) - len(chosen)
    return counts


# ---------------------------------------------------------------------------- page
@dataclass
class _Cell:
    uri: str
    caption: str


def _thumbnail(image: Any, height: int) -> str:
    if isinstance(image, (str, Path)):
        path = Path(image)
        try:
            with Image.open(path) as im:
                pil = im.convert("RGB")
        except (OSError, ValueError) as exc:
            raise ValueError(f"mismatch browser: cannot read image {path}: {exc}") from exc
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(
                f"mismatch browser: images must be paths or uint8 (H, W, 3), got {arr.dtype} {arr.shape}"
            )
        pil = Image.fromarray(arr)
    if pil.height != height:
        width = max(1, round(pil.width * height / pil.height))
        pil = pil.resize((width, height), Image.Resampling.BICUBIC)
    return to_data_uri(np.asarray(pil))


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fff}
header{padding:14px 18px 4px} h1{font-size:20px;margin:0 0 4px} .sub{color:#555;font-size:13px}
#bar{position:sticky;top:0;z-index:3;background:#fff;border-bottom:1px solid #ccc;padding:8px 18px;display:flex;flex-wrap:wrap;gap:6px;align-items:center}
.count{display:inline-flex;align-items:center;gap:4px;padding:3px 8px;border-radius:12px;font-size:13px;border:1px solid #bbb;background:#f6f6f6;cursor:pointer}
.count b{font-variant-numeric:tabular-nums}
.count.active{outline:2px solid #2b6cb0}
#bar button,#bar label.btn{padding:4px 10px;border:1px solid #888;background:#f4f4f4;border-radius:4px;cursor:pointer;font-size:13px}
#help{font-size:12px;color:#555;padding:4px 18px}
#status{font-size:12px;color:#2f855a;margin-left:8px}
#status.warn{color:#c05621}
.item{display:flex;gap:14px;align-items:flex-start;padding:10px 18px;border-bottom:1px solid #eee;border-left:5px solid transparent;scroll-margin-top:96px}
.item.current{background:#eef5ff;border-left-color:#2b6cb0}
.item .num{width:54px;font-size:12px;color:#555}
.cell{display:flex;flex-direction:column;align-items:center;font-size:11px;width:min-content}
.cell img{height:128px;width:auto;border:4px solid #bbb}
.cell.query img{border-color:#3182ce} .cell.wrong img{border-color:#d7191c} .cell.true img{border-color:#1a9641}
.cell .cap{text-align:center;line-height:1.3;margin-top:2px;white-space:nowrap}
.tags{display:flex;flex-direction:column;gap:3px;font-size:12px;margin-left:8px}
.tags button{text-align:left;padding:2px 8px;border:1px solid #bbb;background:#fafafa;border-radius:4px;cursor:pointer;font-size:12px}
.tags button.on{color:#fff;border-color:transparent}
.hint{font-size:11px;color:#805ad5}
.gap{font-size:12px;color:#555;max-width:120px}
"""

_COLOURS = ["#dd6b20", "#c53030", "#6b46c1", "#2c7a7b", "#2b6cb0", "#718096"]

_JS = r"""
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('mismatch-data').textContent);
  var cats = data.categories;            // [{id, label, colour}]
  var byId = {};
  cats.forEach(function (c, i) { c.index = i; byId[c.id] = c; });
  var items = Array.prototype.slice.call(document.querySelectorAll('.item'));
  var storageKey = 'reidkit.mismatches.' + data.page_id;
  var status = document.getElementById('status');
  var tags = {};                          // key -> {tag, updated, query, wrong, true}
  var storageOk = true;

  function newer(a, b) { return !b || (a && (a.updated || 0) >= (b.updated || 0)); }
  function merge(source) {
    var n = 0;
    Object.keys(source || {}).forEach(function (k) {
      var t = source[k];
      if (!t || !byId[t.tag]) { return; }
      if (newer(t, tags[k])) { tags[k] = t; n++; }
    });
    return n;
  }
  function readStorage() {
    try {
      var raw = window.localStorage.getItem(storageKey);
      return raw ? JSON.parse(raw) : {};
    } catch (e) { storageOk = false; return {}; }
  }
  function writeStorage() {
    try { window.localStorage.setItem(storageKey, JSON.stringify(tags)); }
    catch (e) {
      storageOk = false;
      setStatus('this browser does not keep the tags (localStorage unavailable): save them to a file', true);
    }
  }
  function setStatus(msg, warn) {
    status.textContent = msg;
    status.className = warn ? 'warn' : '';
  }

  // the query's earlier tag against another rank-1 (from a previous run), as a hint
  function earlierHint(item) {
    var q = item.getAttribute('data-query');
    var own = item.getAttribute('data-key');
    var best = null;
    Object.keys(tags).forEach(function (k) {
      if (k !== own && k.split('|')[0] === q && newer(tags[k], best)) { best = tags[k]; }
    });
    return best;
  }

  function render(item) {
    var t = tags[item.getAttribute('data-key')];
    item.setAttribute('data-tag', t ? t.tag : '');
    var buttons = item.querySelectorAll('.tags button');
    for (var i = 0; i < buttons.length; i++) {
      var c = byId[buttons[i].getAttribute('data-cat')];
      var on = !!t && t.tag === c.id;
      buttons[i].classList.toggle('on', on);
      buttons[i].style.background = on ? c.colour : '';
    }
    var hint = item.querySelector('.hint');
    var h = t ? null : earlierHint(item);
    hint.textContent = h ? 'earlier run: ' + byId[h.tag].label + ' (other rank-1)' : '';
  }

  var filter = 'all';
  function visible(item) {
    if (filter === 'all') { return true; }
    var tag = item.getAttribute('data-tag');
    return filter === 'untagged' ? !tag : tag === filter;
  }
  function refresh() {
    var counts = {untagged: 0};
    cats.forEach(function (c) { counts[c.id] = 0; });
    items.forEach(function (item) {
      render(item);
      var tag = item.getAttribute('data-tag');
      counts[tag || 'untagged'] += 1;
      item.style.display = visible(item) ? '' : 'none';
    });
    Object.keys(counts).forEach(function (k) {
      document.getElementById('count-' + k).textContent = counts[k];
    });
    var chips = document.querySelectorAll('.count');
    for (var i = 0; i < chips.length; i++) {
      chips[i].classList.toggle('active', chips[i].getAttribute('data-filter') === filter);
    }
    document.body.setAttribute('data-counts', JSON.stringify(counts));
  }

  var current = -1;
  function setCurrent(i, scroll) {
    if (i < 0 || i >= items.length) { return; }
    if (current >= 0) { items[current].classList.remove('current'); }
    current = i;
    items[i].classList.add('current');
    document.body.setAttribute('data-current', items[i].getAttribute('data-key'));
    if (scroll && items[i].scrollIntoView) { items[i].scrollIntoView({block: 'nearest'}); }
  }
  function step(dir, pred) {
    for (var i = current + dir; i >= 0 && i < items.length; i += dir) {
      if (visible(items[i]) && (!pred || pred(items[i]))) { setCurrent(i, true); return true; }
    }
    return false;
  }
  function tag(i, catId) {
    var item = items[i];
    var key = item.getAttribute('data-key');
    if (catId) {
      tags[key] = {tag: catId, updated: Date.now(), query: item.getAttribute('data-query'),
                   wrong: item.getAttribute('data-wrong'), 'true': item.getAttribute('data-true')};
    } else {
      delete tags[key];
    }
    writeStorage();
    refresh();
  }

  function exportObject() {
    var keys = items.map(function (it) { return it.getAttribute('data-key'); });
    var counts = {};
    cats.forEach(function (c) { counts[c.id] = 0; });
    var onPage = 0;
    keys.forEach(function (k) { if (tags[k]) { counts[tags[k].tag] += 1; onPage++; } });
    counts.untagged = keys.length - onPage;
    return {format: data.format, version: data.version, page_id: data.page_id, title: data.title,
            saved: new Date().toISOString(), categories: cats.map(function (c) { return c.id; }),
            num_mismatches: keys.length, counts: counts, tags: tags};
  }
  function saveFile() {
    var text = JSON.stringify(exportObject(), null, 1);
    var blob = new Blob([text], {type: 'application/json'});
    var a = document.createElement('a');
    a.href = URL.createObjectURL(blob);
    a.download = data.download_name;
    document.body.appendChild(a);
    a.click();
    setTimeout(function () { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
    setStatus('saved ' + Object.keys(tags).length + ' tag(s) to ' + data.download_name);
  }
  function loadText(text, name) {
    var obj;
    try { obj = JSON.parse(text); } catch (e) { setStatus(name + ': not valid JSON', true); return; }
    if (!obj || obj.format !== data.format || typeof obj.tags !== 'object') {
      setStatus(name + ': not a reidkit mismatch tag file', true);
      return;
    }
    var n = merge(obj.tags);
    writeStorage();
    refresh();
    setStatus('loaded ' + n + ' newer tag(s) from ' + name);
  }

  // tags: those embedded by the Python side (an earlier run), then this browser's own
  var fromFile = merge(data.saved_tags);
  var fromBrowser = merge(readStorage());
  writeStorage();

  document.addEventListener('keydown', function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var t = ev.target && ev.target.tagName;
    if (t === 'INPUT' || t === 'SELECT' || t === 'TEXTAREA') { return; }
    var k = ev.key;
    if (k >= '1' && k <= String(cats.length) && k.length === 1) {
      if (current < 0) { step(1); }
      if (current < 0) { return; }
      var i = current;
      tag(i, cats[Number(k) - 1].id);
      // move on (or away, when the filter now hides the item)
      if (document.getElementById('advance').checked || !visible(items[i])) {
        if (!step(1) && !visible(items[i])) { step(-1); }
      }
      ev.preventDefault();
    } else if (k === '0' || k === 'Backspace' || k === 'Delete') {
      if (current >= 0) { tag(current, null); ev.preventDefault(); }
    } else if (k === 'j') { step(1); ev.preventDefault(); }
    else if (k === 'k') { step(-1); ev.preventDefault(); }
    else if (k === 'n') {
      step(1, function (it) { return !it.getAttribute('data-tag'); });
      ev.preventDefault();
    }
  });
  items.forEach(function (item, i) {
    item.addEventListener('click', function (ev) {
      setCurrent(i, false);
      var b = ev.target.closest && ev.target.closest('.tags button');
      if (b) { tag(i, b.classList.contains('on') ? null : b.getAttribute('data-cat')); }
    });
  });
  var chips = document.querySelectorAll('.count');
  for (var c = 0; c < chips.length; c++) {
    chips[c].addEventListener('click', function () {
      var f = this.getAttribute('data-filter');
      filter = filter === f ? 'all' : f;
      refresh();
      if (current >= 0 && !visible(items[current])) { step(1) || step(-1); }
    });
  }
  document.getElementById('save').addEventListener('click', saveFile);
  document.getElementById('load').addEventListener('change', function () {
    var f = this.files && this.files[0];
    if (!f) { return; }
    var r = new FileReader();
    r.onload = function () { loadText(String(r.result), f.name); };
    r.readAsText(f);
    this.value = '';
  });

  window.reidkitMismatches = {tags: function () { return tags; }, exportObject: exportObject,
                              loadText: loadText, storageKey: storageKey};
  refresh();
  if (items.length) { setCurrent(0, false); }
  if (storageOk) {
    setStatus(fromFile + ' tag(s) from the earlier run, ' + fromBrowser + ' kept by this browser');
  } else {
    setStatus('this browser does not keep the tags (localStorage unavailable): save them to a file', true);
  }
  document.body.setAttribute('data-ready', '1');
})();
"""


def render_mismatch_page(
    rows: Sequence[dict[str, Any]],
    *,
    title: str = "reidkit rank-1 mismatches",
    subtitle: str = "",
    saved_tags: Mapping[str, Mapping[str, Any]] | None = None,
    page_id: str | None = None,
    download_name: str = "mismatch_tags.json",
) -> str:
    """The page as a string.

    ``rows``: one dict per mismatch with ``key``, ``query_name``, ``wrong_name``,
    ``true_name`` and the three cells ``query``, ``wrong``, ``true`` (each
    ``{"uri", "caption"}``; captions are HTML), ``gap`` (HTML). ``saved_tags``: tags of an
    earlier run (:func:`load_mismatch_tags`). ``page_id`` namespaces the browser storage
    (default: a hash of the mismatch ids).
    """
    keys = [r["key"] for r in rows]
    if len(set(keys)) != len(keys):
        raise ValueError("render_mismatch_page: mismatch keys must be unique")
    if page_id is None:
        page_id = hashlib.sha1("\n".join(keys).encode("utf-8")).hexdigest()[:16]
    cats = [
        {"id": cid, "label": label, "colour": _COLOURS[i % len(_COLOURS)]}
        for i, (cid, label) in enumerate(MISMATCH_CATEGORIES)
    ]
    chips = "".join(
        f"<span class='count' data-filter='{c['id']}' title='show only these'>"
        f"<span style='color:{c['colour']}'>&#9632;</span>{i + 1} {html.escape(c['label'])} "
        f"<b id='count-{c['id']}'>0</b></span>"
        for i, c in enumerate(cats)
    )
    chips += (
        "<span class='count' data-filter='untagged'>untagged <b id='count-untagged'>0</b></span>"
    )
    buttons = "".join(
        f"<button type='button' data-cat='{c['id']}'>{i + 1} {html.escape(c['label'])}</button>"
        for i, c in enumerate(cats)
    )
    body = []
    for n, row in enumerate(rows):
        cells = "".join(
            f"<div class='cell {role}'><img src='{row[role]['uri']}' alt='{role}'>"
            f"<div class='cap'>{row[role]['caption']}</div></div>"
            for role in ("query", "wrong", "true")
        )
        body.append(
            f"<div class='item' data-key='{html.escape(row['key'], quote=True)}' "
            f"data-query='{html.escape(row['query_name'], quote=True)}' "
            f"data-wrong='{html.escape(row['wrong_name'], quote=True)}' "
            f"data-true='{html.escape(row['true_name'], quote=True)}' data-tag=''>"
            f"<div class='num'>#{n + 1}</div>{cells}<div class='gap'>{row.get('gap', '')}</div>"
            f"<div class='tags'>{buttons}<div class='hint'></div></div></div>"
        )
    payload = {
        "format": TAGS_FORMAT,
        "version": TAGS_VERSION,
        "page_id": page_id,
        "title": title,
        "categories": cats,
        "saved_tags": dict(saved_tags or {}),
        "download_name": download_name,
    }
    # "</" must not end the JSON <script> early
    data_json = json.dumps(payload).replace("</", "<\\/")
    help_text = (
        "keys: <b>1</b>-<b>6</b> tag the highlighted mismatch (then move on) &middot; "
        "<b>0</b>/Backspace clear &middot; <b>j</b>/<b>k</b> next/previous &middot; "
        "<b>n</b> next untagged &middot; click a count to show only that category. "
        "Tags are kept by this browser; <i>Save tags</i> writes them to a JSON file that "
        "<code>--tags FILE</code> (or <i>Load tags</i>) brings back."
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        "<body data-ready='0'>"
        f"<header><h1>{html.escape(title)}</h1><div class='sub'>{subtitle}</div></header>"
        f"<div id='bar'>{chips}"
        "<button type='button' id='save'>Save tags (JSON)</button>"
        "<label class='btn'>Load tags&hellip;<input type='file' id='load' accept='.json,application/json' hidden></label>"
        "<label><input type='checkbox' id='advance' checked> move on after tagging</label>"
        "<span id='status'></span></div>"
        f"<div id='help'>{help_text}</div>"
        f"<div id='items'>{''.join(body)}</div>"
        f"<script type='application/json' id='mismatch-data'>{data_json}</script>"
        f"<script>{_JS}</script></body></html>"
    )


def _names(images: Sequence[Any] | None, prefix: str, index: int) -> str:
    if images is not None and isinstance(images[index], (str, Path)):
        return Path(images[index]).name
    return f"{prefix}{index}"


def write_mismatch_browser(
    mismatches: RankOneMismatches,
    query_images: Sequence[str | Path | np.ndarray],
    gallery_images: Sequence[str | Path | np.ndarray],
    q_pids: Any,
    g_pids: Any,
    q_camids: Any = None,
    g_camids: Any = None,
    *,
    out_path: str | Path,
    tags: str | Path | Mapping[str, Any] | None = None,
    title: str = "reidkit rank-1 mismatches",
    subtitle: str = "",
    thumb_height: int = 128,
    page_id: str | None = None,
) -> Path:
    """Write the tagging page for ``mismatches`` (from :func:`rank1_mismatches`).

    Args:
        mismatches: the mismatch list and the number of valid queries.
        query_images, gallery_images: per index, an image path or a uint8 ``(H, W, 3)``
            array (only the indices used are read; paths also name the mismatches).
        q_pids, g_pids, q_camids, g_camids: identities and cameras shown in the captions.
        out_path: the ``.html`` file (its folder is created). It must not be one of the
            input images or the tags file.
        tags: a tags JSON saved by an earlier run (or its parsed content), embedded so the
            page starts from it.
        title, subtitle: page header (``subtitle`` is escaped).
        thumb_height: thumbnail height in pixels.
        page_id: browser-storage namespace (default: a hash of the mismatch ids).

    Returns:
        The path written.
    """
    out = Path(out_path)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"write_mismatch_browser: out_path {out} must end in .html")
    if isinstance(tags, (str, Path)) and Path(tags).resolve() == out.resolve():
        raise ValueError(f"write_mismatch_browser: out_path {out} would overwrite the tags file")
    saved = load_mismatch_tags(tags) if tags is not None else {}
    qp, gp = np.asarray(as_tensor(q_pids, "q_pids")), np.asarray(as_tensor(g_pids, "g_pids"))
    qc = np.asarray(as_tensor(q_camids, "q_camids")) if q_camids is not None else None
    gc = np.asarray(as_tensor(g_camids, "g_camids")) if g_camids is not None else None

    def who(pids: np.ndarray, cams: np.ndarray | None, i: int) -> str:
        cam = f" &middot; cam {int(cams[i])}" if cams is not None else ""
        return f"pid {int(pids[i])}{cam}"

    rows = []
    for m in mismatches:
        q_name = _names(query_images, "q", m.query)
        w_name = _names(gallery_images, "g", m.wrong)
        t_name = _names(gallery_images, "g", m.true)
        rows.append(
            {
                "key": mismatch_key(q_name, w_name),
                "query_name": q_name,
                "wrong_name": w_name,
                "true_name": t_name,
                "query": {
                    "uri": _thumbnail(query_images[m.query], thumb_height),
                    "caption": f"query {m.query}<br>{who(qp, qc, m.query)}<br>{html.escape(q_name)}",
                },
                "wrong": {
                    "uri": _thumbnail(gallery_images[m.wrong], thumb_height),
                    "caption": f"wrong rank-1 &middot; d={m.wrong_dist:.4f}<br>{who(gp, gc, m.wrong)}"
                    f"<br>{html.escape(w_name)}",
                },
                "true": {
                    "uri": _thumbnail(gallery_images[m.true], thumb_height),
                    "caption": f"best true match &middot; rank {m.true_rank}<br>d={m.true_dist:.4f}"
                    f" &middot; {who(gp, gc, m.true)}<br>{html.escape(t_name)}",
                },
                "gap": f"d(true) - d(rank-1)<br><b>{m.true_dist - m.wrong_dist:+.4f}</b>",
            }
        )
    sub = html.escape(subtitle)
    stats = (
        f"{len(mismatches)} rank-1 mismatches among {mismatches.num_valid} valid queries "
        f"(rank-1 {100 * mismatches.rank1:.1f}%)"
    )
    page = render_mismatch_page(
        rows,
        title=title,
        subtitle=f"{sub}{' &middot; ' if sub else ''}{stats} &middot; written {time.strftime('%Y-%m-%d %H:%M')}",
        saved_tags=saved,
        page_id=page_id,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
