"""Rank-1 mismatch list against a naive loop and the evaluator, the tag files, and the
tagging page in headless Chromium (real key events, counts, reload, a second browser run
on the same profile, the save button's download, tags embedded from an earlier run, the
load-file input). A screenshot is kept in /tmp/reidkit_artifacts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from chromium_cdp import Chromium
from PIL import Image

from reidkit.metrics import evaluate_rank
from reidkit.metrics.distance import compute_distance
from reidkit.viz.mismatches import (
    MISMATCH_CATEGORIES,
    TAGS_FORMAT,
    load_mismatch_tags,
    rank1_mismatches,
    tag_counts,
    write_mismatch_browser,
)

torch.set_num_threads(1)
ARTIFACTS = Path("/tmp/reidkit_artifacts")


def naive_mismatches(dist, qp, gp, qc, gc, ignore=()):
    out, valid = [], 0
    for q in range(dist.shape[0]):
        keep = [
            j
            for j in range(dist.shape[1])
            if gp[j] not in ignore and not (qc is not None and gp[j] == qp[q] and gc[j] == qc[q])
        ]
        order = sorted(keep, key=lambda j: (dist[q, j], j))
        ranks_true = [r for r, j in enumerate(order) if gp[j] == qp[q]]
        if not ranks_true:
            continue
        valid += 1
        if gp[order[0]] != qp[q]:
            t = order[ranks_true[0]]
            out.append(
                (q, order[0], t, float(dist[q, order[0]]), float(dist[q, t]), ranks_true[0] + 1)
            )
    return out, valid


@pytest.mark.parametrize("cams", [True, False])
def test_rank1_mismatches_against_loop_and_evaluator(cams: bool) -> None:
    rng = np.random.default_rng(0)
    nq, ng = 40, 60
    qp, gp = rng.integers(0, 10, nq), rng.integers(-1, 10, ng)
    qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    dist = rng.integers(0, 12, (nq, ng)).astype(np.float32) / 4  # many ties
    kw = dict(q_camids=qc, g_camids=gc) if cams else {}
    got = rank1_mismatches(qp, gp, **kw, distmat=dist, ignore_gallery_pids=[-1], chunk_size=7)
    want, valid = naive_mismatches(dist, qp, gp, qc if cams else None, gc, ignore=(-1,))
    assert [(m.query, m.wrong, m.true, m.wrong_dist, m.true_dist, m.true_rank) for m in got] == want
    assert got.num_valid == valid and len(got) > 5
    res = evaluate_rank(dist, qp, gp, **kw, ignore_gallery_pids=[-1])
    assert got.rank1 == pytest.approx(res.cmc[0])
    first_hit = dict(zip(np.flatnonzero(res.valid).tolist(), res.first_hit.tolist()))
    assert all(first_hit[m.query] + 1 == m.true_rank for m in got)


def test_rank1_mismatches_from_features() -> None:
    g = torch.Generator().manual_seed(1)
    qf, gf = torch.randn(30, 8, generator=g), torch.randn(50, 8, generator=g)
    qp, gp = torch.arange(30) % 7, torch.arange(50) % 7
    qc, gc = torch.zeros(30, dtype=torch.long), torch.ones(50, dtype=torch.long)
    for metric in ("cosine", "euclidean"):
        a = rank1_mismatches(qp, gp, qc, gc, qf=qf, gf=gf, metric=metric, chunk_size=4)
        b = rank1_mismatches(qp, gp, qc, gc, distmat=compute_distance(qf, gf, metric))
        assert a.items == b.items and a.num_valid == b.num_valid == 30
    with pytest.raises(ValueError, match="either distmat or both"):
        rank1_mismatches(qp, gp, distmat=torch.zeros(30, 50), qf=qf, gf=gf)


def test_tag_files_and_errors(tmp_path: Path) -> None:
    good = {
        "format": TAGS_FORMAT,
        "tags": {"a|b": {"tag": "occlusion", "updated": 5}, "c|d": {"tag": "unsure"}},
    }
    tags = load_mismatch_tags(good)
    assert tags["c|d"]["updated"] == 0
    assert tag_counts(tags)["occlusion"] == 1
    assert tag_counts(tags, keys=["a|b", "x|y"]) == {
        **{c: 0 for c, _ in MISMATCH_CATEGORIES}, "occlusion": 1, "untagged": 1,
    }  # fmt: skip
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({**good, "tags": {"a|b": {"tag": "blur"}}}))
    with pytest.raises(ValueError, match=r"t\.json: tags\['a\|b'\]\.tag is 'blur'"):
        load_mismatch_tags(bad)
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="t.json: not valid JSON"):
        load_mismatch_tags(bad)
    bad.write_text(json.dumps({"tags": {}}))
    with pytest.raises(ValueError, match="field 'format'"):
        load_mismatch_tags(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_mismatch_tags(tmp_path / "missing.json")


# ------------------------------------------------------------------------ the page
COLOURS = np.array([[200, 40, 40], [40, 160, 60], [40, 60, 200], [220, 200, 40], [140, 60, 160]])


def _write_images(root: Path, pids, cams, prefix: str, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i, (pid, cam) in enumerate(zip(pids, cams)):
        img = np.zeros((64, 32, 3), dtype=np.uint8)
        img[:32] = COLOURS[pid % 5]
        img[32:] = COLOURS[(pid * 2 + 1) % 5]
        img = np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        path = root / f"{pid:04d}_c{cam + 1}s1_{i:06d}_{prefix}.jpg"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def mismatch_set(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mm")
    rng = np.random.default_rng(3)
    q_pids, g_pids = np.arange(12) % 6, np.arange(30) % 6
    q_cams, g_cams = np.zeros(12, dtype=int), rng.integers(1, 3, 30)
    qf = torch.randn(12, 16, generator=torch.Generator().manual_seed(0))
    gf = qf[torch.as_tensor(g_pids)] * 0 + torch.randn(
        30, 16, generator=torch.Generator().manual_seed(1)
    )
    gf[: len(q_pids)] += 0.6 * qf  # some true matches are close: a mix of hits and misses
    q_paths = _write_images(root, q_pids, q_cams, "q", 0)
    g_paths = _write_images(root, g_pids, g_cams, "g", 1)
    mm = rank1_mismatches(q_pids, g_pids, q_cams, g_cams, qf=qf, gf=gf)
    assert 5 <= len(mm) < 12
    return root, mm, (q_paths, g_paths, q_pids, g_pids, q_cams, g_cams)


def _write(mismatch_set, out: Path, **kw) -> Path:
    _, mm, (q_paths, g_paths, q_pids, g_pids, q_cams, g_cams) = mismatch_set
    return write_mismatch_browser(
        mm,
        q_paths,
        g_paths,
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        out_path=out,
        subtitle="synthetic test",
        **kw,
    )


def test_page_structure(mismatch_set, tmp_path: Path) -> None:
    _, mm, (q_paths, g_paths, *_rest) = mismatch_set
    page = _write(mismatch_set, tmp_path / "mm.html").read_text()
    assert len(re.findall(r"<div class='item' ", page)) == len(mm)
    assert page.count("data:image/jpeg;base64,") == 3 * len(mm)
    first = mm[0]
    assert f"data-key='{q_paths[first.query].name}|{g_paths[first.wrong].name}'" in page
    assert f"d={first.wrong_dist:.4f}" in page and f"rank {first.true_rank}" in page
    assert "http://" not in page and "https://" not in page
    assert f"{len(mm)} rank-1 mismatches among 12 valid queries" in page
    with pytest.raises(ValueError, match=r"must end in \.html"):
        _write(mismatch_set, tmp_path / "mm.json")


def _counts(b: Chromium) -> dict:
    return json.loads(b.evaluate("document.body.getAttribute('data-counts')"))


def _current(b: Chromium) -> int:
    return b.evaluate(
        "[...document.querySelectorAll('.item')].findIndex(e => e.classList.contains('current'))"
    )


def _goto(b: Chromium, i: int) -> None:
    for _ in range(20):
        cur = _current(b)
        if cur == i:
            return
        b.press("j" if cur < i else "k")
    raise AssertionError(f"could not move to item {i}")


def _tag_of(b: Chromium, i: int) -> str:
    return b.evaluate(f"document.querySelectorAll('.item')[{i}].getAttribute('data-tag')")


@pytest.mark.chromium
def test_tagging_in_headless_chromium(mismatch_set, tmp_path: Path) -> None:
    _, mm, (q_paths, g_paths, *_rest) = mismatch_set
    n = len(mm)
    page = _write(mismatch_set, tmp_path / "page" / "mm.html")
    url = page.resolve().as_uri()
    profile, downloads = tmp_path / "profile", tmp_path / "downloads"
    downloads.mkdir()
    zero = {c: 0 for c, _ in MISMATCH_CATEGORIES}

    with Chromium(profile, download_dir=downloads) as b:
        b.open(url)
        assert _counts(b) == {**zero, "untagged": n}
        assert b.evaluate("document.querySelectorAll('.item.current').length") == 1
        for key in ("1", "5", "5"):  # tag items 0, 1, 2 (the page moves on after each)
            b.press(key)
        assert [_tag_of(b, i) for i in range(3)] == [
            "misalignment",
            "similar_clothes",
            "similar_clothes",
        ]
        assert _current(b) == 3
        b.press("k")  # back to item 2
        b.press("4")  # re-tag it: occlusion, then on to item 3
        b.press("j")  # item 4
        b.press("3")  # distractor on item 4 (then item 5, or stays on the last one)
        _goto(b, 3)
        b.press("6")  # unsure on item 3, moves to item 4
        assert _current(b) == 4
        b.press("k")  # item 3
        b.press("Backspace")  # clear item 3
        want = {**zero, "misalignment": 1, "similar_clothes": 1, "occlusion": 1, "distractor": 1}
        want["untagged"] = n - 4
        assert _counts(b) == want
        assert b.evaluate("document.getElementById('count-similar_clothes').textContent") == "1"
        # the filter chip hides the other items
        b.evaluate("document.querySelector(\".count[data-filter='occlusion']\").click()")
        shown = b.evaluate(
            "[...document.querySelectorAll('.item')].filter(e => e.style.display !== 'none').length"
        )
        assert shown == 1
        b.evaluate("document.querySelector(\".count[data-filter='occlusion']\").click()")
        b.press("n")  # next untagged: item 3
        assert b.evaluate("document.body.getAttribute('data-current')") == b.evaluate(
            "document.querySelectorAll('.item')[3].getAttribute('data-key')"
        )
        # a reload keeps the tags (localStorage)
        b.reload()
        assert _counts(b) == want
        assert [_tag_of(b, i) for i in range(5)] == [
            "misalignment",
            "similar_clothes",
            "occlusion",
            "",
            "distractor",
        ]
        # the save button downloads the tags file
        b.evaluate("document.getElementById('save').click()")
        b.wait_event("Browser.downloadProgress", lambda p: p.get("state") == "completed")
        saved = downloads / "mismatch_tags.json"
        assert saved.is_file()
        tags = load_mismatch_tags(saved)
        keys = b.evaluate(
            "[...document.querySelectorAll('.item')].map(e => e.getAttribute('data-key'))"
        )
        assert tag_counts(tags, keys) == want
        saved_obj = json.loads(saved.read_text())
        assert saved_obj["counts"] == want and saved_obj["num_mismatches"] == n
        assert tags[keys[0]]["query"] == q_paths[mm[0].query].name
        b.screenshot(tmp_path / "mismatches.png")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "mismatches.png", ARTIFACTS / "mismatches_screenshot.png")

    # a second browser run on the same profile still has them
    with Chromium(profile) as b:
        b.open(url)
        assert _counts(b) == want

    # a second run of the tool: a new page (new profile) embeds the saved file; a tag for
    # another rank-1 of the same query shows as a hint; tags not on the page are kept
    obj = json.loads(saved.read_text())
    other = f"{q_paths[mm[3].query].name}|some_other_rank1.jpg"  # item 3 is untagged
    obj["tags"][other] = {"tag": "annotation_error", "updated": 1}
    obj["tags"]["gone.jpg|also_gone.jpg"] = {"tag": "unsure", "updated": 1}
    older = tmp_path / "earlier_tags.json"
    older.write_text(json.dumps(obj))
    page2 = _write(mismatch_set, tmp_path / "run2" / "mm.html", tags=older, page_id="run2")
    with Chromium(tmp_path / "profile2") as b:
        b.open(page2.resolve().as_uri())
        assert _counts(b) == want
        hint = b.evaluate(
            "document.querySelectorAll('.item')[3].querySelector('.hint').textContent"
        )
        assert hint == "earlier run: annotation error (other rank-1)"
        assert (
            b.evaluate("document.querySelectorAll('.item')[2].querySelector('.hint').textContent")
            == ""
        )
        exported = b.evaluate("window.reidkitMismatches.exportObject()")
        assert "gone.jpg|also_gone.jpg" in exported["tags"]
        # loading a file through the page's own input: a newer tag wins
        newer = {
            "format": TAGS_FORMAT,
            "tags": {keys[3]: {"tag": "occlusion", "updated": 4102444800000}},
        }
        newer_path = tmp_path / "newer.json"
        newer_path.write_text(json.dumps(newer))
        root = b.send("DOM.getDocument", session=True)["root"]["nodeId"]
        node = b.send("DOM.querySelector", {"nodeId": root, "selector": "#load"}, session=True)[
            "nodeId"
        ]
        b.send("DOM.setFileInputFiles", {"files": [str(newer_path)], "nodeId": node}, session=True)
        b.wait_for(
            "document.getElementById('status').textContent.indexOf('loaded 1 newer tag') >= 0"
        )
        assert _tag_of(b, 3) == "occlusion" and _counts(b)["occlusion"] == 2
