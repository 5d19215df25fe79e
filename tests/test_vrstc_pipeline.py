"""VRSTC's pipeline on the tiny synthetic video set: detection scores against a
frame-by-frame computation, ground-truth coverage and precision / recall against loops,
the completion plan, the completed copy (original untouched, same layout, refusal of an
existing folder), completion quality, the visual page in headless Chromium, and
``reidkit vrstc`` end to end (untrained tiny networks: the mechanics, not the numbers)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from chromium_cdp import BASE_FLAGS, require_chromium
from PIL import Image
from vrstc_fakes import save_tiny_clip_net

from reidkit.analysis.vrstc import (
    complete_dataset,
    completion_quality,
    completion_targets,
    detect_dataset,
    detection_report,
    format_quality_table,
    page_tracklets,
    paste_completion,
    read_scores,
    scores_document,
    truth_coverage,
    write_json,
)
from reidkit.cli import main
from reidkit.config import load_config
from reidkit.data.datasets.video import build_video_dataset
from reidkit.data.synth import generate_video
from reidkit.data.transforms import build_test_transforms
from reidkit.methods import build_method
from reidkit.methods.vrstc import (
    adjacent_unoccluded,
    load_reid_network,
    occlusion_scores,
    region_bounds,
    region_pool,
)
from reidkit.viz.vrstc import render_vrstc_page

torch.set_num_threads(1)
ARTIFACTS = Path("/tmp/reidkit_artifacts")
STC = [
    "model.name=stcnet",
    "data.dataset=synth_video",
    "data.synth_preset=tiny-video",
    "data.height=32",
    "data.width=16",
    "data.num_workers=0",
    "model.stcnet.width=4",
    "model.stcnet.disc_width=4",
    "model.stcnet.disc_layers=2",
    "model.stcnet.dilations=[2]",
    "model.stcnet.id_weight=0",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny-video set at 64x32, an untrained tiny re-ID net, an untrained tiny STCnet."""
    base = tmp_path_factory.mktemp("vrstc")
    root = base / "data"
    generate_video(root / "synth-tiny-video", "tiny-video", seed=0, workers=0, height=64,
                   width=32, progress=False)  # fmt: skip
    ds = build_video_dataset("synth_video", root, preset="tiny-video")
    reid_path = save_tiny_clip_net(base / "reid" / "best.pt", num_classes=ds.num_train_pids,
                                   height=32, width=16, test_chunk_len=4)  # fmt: skip
    cfg = load_config(None, [*STC, f"data.root={root}"])
    torch.manual_seed(0)
    stc = build_method(cfg, ds.num_train_pids).eval()
    stc_path = base / "stc.pt"
    torch.save({"model": stc.state_dict()}, stc_path)
    net = load_reid_network(reid_path)
    scores = detect_dataset(net.net, net.cfg, ds, 3)
    return {"base": base, "root": root, "ds": ds, "reid": reid_path, "net": net, "cfg": cfg,
            "stc": stc, "stc_path": stc_path, "scores": scores}  # fmt: skip


def _tau(world) -> float:
    """A threshold that flags some frames of the untrained net (its scores sit near 1)."""
    all_s = torch.cat([s.flatten() for v in world["scores"].values() for s in v])
    return float(all_s.quantile(0.05))


# ----------------------------------------------------------------------------- detection
def test_detection_scores_match_frame_by_frame_computation(world):
    ds, net = world["ds"], world["net"]
    transform = build_test_transforms(net.cfg.data)
    for split in ("train", "gallery"):
        assert len(world["scores"][split]) == len(getattr(ds, split))
        for i in (0, len(getattr(ds, split)) - 1):
            rec = getattr(ds, split)[i]
            feats = []
            for path in rec.paths:  # one frame at a time, no chunking
                img = transform.apply(Image.open(path).convert("RGB"))[0]
                with torch.no_grad():
                    fmap = net.net.frame_maps(img[None, None])[0]
                    region = region_pool(fmap, 3, image_height=img.shape[-2])[0]
                    feats.append(net.net.bn(region))  # post-BN: the test feature
            want = occlusion_scores(torch.stack(feats))
            torch.testing.assert_close(world["scores"][split][i], want, atol=1e-5, rtol=0)
    assert any(len(r) > 4 for r in ds.train)  # tracklets span several chunks of 4 frames


def test_truth_coverage_matches_loop(world):
    rec = next(r for r in world["ds"].gallery if r.extras["occluded"].any())
    cov = truth_coverage(rec, 3)
    for t, path in enumerate(rec.extras["masks"]):
        if path is None:
            assert cov[t].eq(0).all()
            continue
        m = np.asarray(Image.open(path).convert("L")) > 127
        for r, (a, b) in enumerate(region_bounds(m.shape[0], 3)):
            assert cov[t, r].item() == pytest.approx(m[a:b].mean(), abs=1e-6)


def test_detection_report_against_loops():
    g = torch.Generator().manual_seed(0)
    scores = {"train": [torch.rand(5, 3, generator=g) for _ in range(4)], "query": []}
    cov = {"train": [torch.rand(5, 3, generator=g) for _ in range(4)], "query": []}
    rep = detection_report(scores, cov, tau=0.4, coverage_threshold=0.3, taus=[0.2, 0.4, 0.9])
    pairs = [(float(s), float(c)) for S, C in zip(scores["train"], cov["train"])
             for s, c in zip(S.flatten(), C.flatten())]  # fmt: skip
    tp = sum(s < 0.4 and c >= 0.3 for s, c in pairs)
    fp = sum(s < 0.4 and c < 0.3 for s, c in pairs)
    fn = sum(s >= 0.4 and c >= 0.3 for s, c in pairs)
    at = rep["at_tau"]
    assert (at["tp"], at["fp"], at["fn"]) == (tp, fp, fn)
    assert at["precision"] == pytest.approx(tp / (tp + fp))
    assert at["recall"] == pytest.approx(tp / (tp + fn))
    assert rep["curve"]["precision"][1] == pytest.approx(at["precision"])
    assert rep["curve"]["recall"] == sorted(rep["curve"]["recall"])  # recall grows with tau
    assert rep["regions"] == 60 and rep["splits"]["train"]["tp"] == tp


def test_scores_file_round_trip_and_checks(world, tmp_path):
    ds = world["ds"]
    doc = scores_document(ds, world["scores"], 0.9, 3, "r.pt")
    path = write_json(tmp_path / "scores.json", doc)
    doc2, scores = read_scores(path, ds)
    assert doc2["tau"] == 0.9 and not doc2["tracklets"]["train"][0]["frames"][0].startswith("/")
    for split in scores:
        for a, b in zip(scores[split], world["scores"][split]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    doc["tracklets"]["query"] = doc["tracklets"]["query"][:-1]
    write_json(tmp_path / "bad.json", doc)
    with pytest.raises(ValueError, match="query has"):
        read_scores(tmp_path / "bad.json", ds)


def test_completion_targets_match_loop():
    scores = {"train": [torch.tensor([[0.9, 0.95, 0.99], [0.5, 0.99, 0.99], [0.99] * 3,
                                      [0.99, 0.1, 0.2], [0.95] * 3])]}  # fmt: skip
    targets = completion_targets(scores, tau=0.89)
    assert [(t.t, t.regions, t.prev, t.next) for t in targets] == [
        (1, (0,), 0, 2),
        (3, (1, 2), 2, 4),
    ]
    flags = {"query": [torch.ones(3, 3, dtype=torch.bool)]}
    assert [t.prev for t in completion_targets(flags=flags)] == [-1, -1, -1]
    prev, nxt = adjacent_unoccluded(torch.tensor([True, False, True, False, True]))
    assert prev.tolist()[1] == 0 and nxt.tolist()[3] == 4


# ----------------------------------------------------------------------------- completion
def test_paste_replaces_only_the_regions():
    g = torch.Generator().manual_seed(0)
    orig = torch.randint(0, 256, (3, 60, 20), generator=g, dtype=torch.uint8)
    comp = torch.rand(3, 32, 16, generator=g) * 2 - 1
    out = paste_completion(orig, comp, (1,), 3)
    a, b = region_bounds(60, 3)[1]
    assert torch.equal(out[:, :a], orig[:, :a]) and torch.equal(out[:, b:], orig[:, b:])
    up = torch.nn.functional.interpolate((comp[None] + 1) * 127.5, size=(60, 20), mode="bilinear")
    torch.testing.assert_close(out[:, a:b].float(), up[0, :, a:b].round().clamp(0, 255), atol=0,
                               rtol=0)  # fmt: skip


def _tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_completed_copy(world, tmp_path):
    ds, root = world["ds"], world["root"]
    before = _tree_hashes(root)
    tau = _tau(world)
    out = tmp_path / "done"
    summary = complete_dataset(world["stc"], ds, world["scores"], out, root, tau=tau, batch_size=5)
    assert _tree_hashes(root) == before  # the original is never modified
    copy_root = out / "synth-tiny-video"
    copied = _tree_hashes(copy_root)
    replaced = {Path(ds.dataset_dir, e["frame"]).relative_to(ds.dataset_dir).as_posix()
                for items in summary["replaced"].values() for e in items}  # fmt: skip
    targets = completion_targets(world["scores"], tau)
    assert len(replaced) == len(targets) > 0
    source = _tree_hashes(Path(ds.dataset_dir))
    assert set(copied) == set(source)  # same layout, every file
    for rel, digest in source.items():
        assert (copied[rel] != digest) == (rel in replaced), rel
    # the copy parses like the original, with the same tracklets
    ds2 = build_video_dataset("synth_video", out, preset="tiny-video")
    for split in ("train", "query", "gallery"):
        a, b = getattr(ds, split), getattr(ds2, split)
        assert [(r.pid, r.camid, len(r)) for r in a] == [(r.pid, r.camid, len(r)) for r in b]
    # a replaced frame changed inside its regions; outside only by JPEG coding
    entry = next(e for items in summary["replaced"].values() for e in items)
    new = np.asarray(Image.open(copy_root / entry["frame"]).convert("RGB")).astype(float)
    old = np.asarray(Image.open(Path(ds.dataset_dir) / entry["frame"]).convert("RGB")).astype(float)
    rows = np.zeros(new.shape[0], dtype=bool)
    for r in entry["regions"]:
        a, b = region_bounds(new.shape[0], 3)[r]
        rows[a:b] = True
    assert np.abs(new[~rows] - old[~rows]).mean() < 3 < np.abs(new[rows] - old[rows]).mean()
    doc = json.loads((out / "vrstc_completion.json").read_text())
    assert doc["tau"] == pytest.approx(tau) and doc["output"] == "x2"
    assert sum(c["replaced_frames"] for c in doc["counts"].values()) == len(targets)
    assert all(len(e["scores"]) == 3 and min(e["scores"]) < tau for e in doc["replaced"]["train"])
    # refusals: an existing folder without overwrite, a folder inside the dataset
    with pytest.raises(ValueError, match="already exists"):
        complete_dataset(world["stc"], ds, world["scores"], out, root, tau=tau)
    with pytest.raises(ValueError, match="must not be, contain or lie inside"):
        complete_dataset(world["stc"], ds, world["scores"], root / "synth-tiny-video" / "x", root)
    with pytest.raises(ValueError, match="must not be, contain or lie inside"):
        complete_dataset(world["stc"], ds, world["scores"], root, root, overwrite=True)
    complete_dataset(world["stc"], ds, world["scores"], out, root, tau=tau, overwrite=True,
                     link=True, output="x1")  # fmt: skip
    assert _tree_hashes(root) == before  # hard links are never written through
    assert not list(tmp_path.glob(".done.tmp-*"))


def test_completion_quality_references(world):
    res = completion_quality(world["stc"], world["ds"], ("query", "gallery"), 0.2)
    table = res["table"]
    assert res["frames"] > 0 and set(table) == {
        "occluded input", "copy nearest unoccluded", "tracklet mean", "x1", "x2"}  # fmt: skip
    # the occluder's own pixels are wrong in the occluded input, fixed by the references
    assert table["copy nearest unoccluded"]["l1_hidden"] < table["occluded input"]["l1_hidden"]
    assert all(np.isfinite(v) for row in table.values() for v in row.values())
    assert "| x2 |" in format_quality_table(res)


# ----------------------------------------------------------------------------- page
@pytest.fixture(scope="module")
def page_path(world, tmp_path_factory):
    tau = _tau(world)
    tracklets = page_tracklets(world["stc"], world["ds"], world["scores"], tau, num_tracklets=3,
                               frames_per_tracklet=2)  # fmt: skip
    path = tmp_path_factory.mktemp("page") / "vrstc.html"
    path.write_text(render_vrstc_page(tracklets, summary={"tau": tau}))
    return path, tracklets


def test_page_structure(page_path):
    path, tracklets = page_path
    page = path.read_text()
    n_rows = sum(len(t.frames) for t in tracklets)
    assert len(tracklets) == 3 and n_rows > 0
    assert len(re.findall(r"<div class='row[^']*' data-truth='1'>", page)) == n_rows
    shown = sum(len(t.strip) for t in tracklets)
    completed = sum(f.x1 is not None for t in tracklets for f in t.frames)
    refs = sum((f.prev is not None) + (f.next is not None) for t in tracklets for f in t.frames)
    # strip + frame, regions, truth per row + x1, x2 per completed row + references
    assert page.count("<img ") == shown + 3 * n_rows + 2 * completed + refs
    assert "http://" not in page and "https://" not in page


@pytest.mark.chromium
def test_page_in_headless_chromium(page_path, tmp_path):
    exe = require_chromium()
    path, tracklets = page_path
    flags = [exe, *BASE_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    url = path.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout, "the page script did not finish (a JS error?)"
    assert "--h: 128px" in dom.stdout  # the size control applied its value
    n_rows = sum(len(t.frames) for t in tracklets)
    assert len(re.findall(r'<div class="row[^"]*" data-truth="1">', dom.stdout)) == n_rows
    shot = tmp_path / "vrstc_page.png"
    res = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1300,1200", url],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "vrstc_page.png")


# ----------------------------------------------------------------------------- command
def test_vrstc_commands_end_to_end(world, tmp_path, capsys):
    cfg_path = tmp_path / "stc.yaml"
    cfg_path.write_text(
        "model: {name: stcnet, stcnet: {width: 4, disc_width: 4, disc_layers: 2, dilations: [2], "
        f"id_weight: 0, reid_weights: '{world['reid']}', tau: {_tau(world)}}}}}\n"
        f"data: {{dataset: synth_video, synth_preset: tiny-video, root: '{world['root']}', "
        "height: 32, width: 16, num_workers: 0}\ndevice: cpu\n"
    )
    det = tmp_path / "det"
    base = ["-c", str(cfg_path), "--no-progress"]
    assert main(["vrstc", "detect", *base, "--out", str(det)]) == 0
    report = json.loads((det / "detection.json").read_text())
    assert len(report["curve"]["tau"]) >= 201 and (det / "tau_curve.png").stat().st_size > 5000
    assert "precision" in capsys.readouterr().out
    again = tmp_path / "det2"  # re-threshold the same scores with the robust rule
    args = ["--scores", str(det / "scores.json"), "--tau-rule", "robust", "--out", str(again)]
    assert main(["vrstc", "detect", *base, *args]) == 0
    report2 = json.loads((again / "detection.json").read_text())
    assert report2["tau_rule"] == "robust" and report2["tau"] != report["tau"]
    assert report2["regions"] == report["regions"]
    assert "tau (robust" in capsys.readouterr().out
    w = ["--weights", str(world["stc_path"])]
    out = tmp_path / "done"
    args = ["vrstc", "complete", *base, *w, "--scores", str(det / "scores.json"), "--out", str(out)]
    assert main(args) == 0
    assert (out / "vrstc_completion.json").is_file() and (out / "scores.json").is_file()
    assert main(args) == 1  # an existing folder is refused
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main(["vrstc", "quality", *base, *w, "--out", str(tmp_path / "q.json")]) == 0
    assert "| copy nearest unoccluded |" in capsys.readouterr().out
    page = tmp_path / "page.html"
    assert main(["vrstc", "page", *base, *w, "--out", str(page), "--tracklets", "2"]) == 0
    assert page.stat().st_size > 1000
    bad = [
        "vrstc",
        "complete",
        *base,
        "--weights",
        str(world["reid"]),
        "--out",
        str(tmp_path / "x"),
    ]
    assert main(bad) == 1  # re-ID weights are not STCnet weights
