"""The explainable ranking report: query choice against naive loops, colormap values,
the HTML structure, headless Chromium (page loads, JS toggles built, expected rows and
images; a screenshot is kept), and the ``reidkit report`` command end to end."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from chromium_cdp import require_chromium

from reidkit.config import load_config
from reidkit.methods.cama import CAMA
from reidkit.models import build_backbone
from reidkit.viz.report import (
    build_ranking_report,
    cmc_svg,
    jet,
    overlay_heatmap,
    ranked_gallery,
    select_queries,
)

torch.set_num_threads(1)
ARTIFACTS = Path("/tmp/reidkit_artifacts")


# ------------------------------------------------------------------------- helpers
def test_jet_hand_values() -> None:
    assert jet(np.array(0.0)).tolist() == [0, 0, 128]
    assert jet(np.array(0.5)).tolist() == [128, 255, 128]
    assert jet(np.array(1.0)).tolist() == [128, 0, 0]
    assert jet(np.array([-1.0, 2.0])).tolist() == [[0, 0, 128], [128, 0, 0]]  # clipped


def test_overlay_blend() -> None:
    img = np.full((2, 2, 3), 100, dtype=np.uint8)
    heat = np.array([[0.0, 1.0], [0.0, 1.0]])
    out = overlay_heatmap(img, heat, alpha=0.5)
    assert out[0, 0].tolist() == [50, 50, 114]  # 0.5 * 100 + 0.5 * jet(0)
    assert out[0, 1].tolist() == [114, 50, 50]  # 0.5 * 100 + 0.5 * jet(1)
    with pytest.raises(ValueError, match="match the image size"):
        overlay_heatmap(img, np.zeros((3, 3)))


def test_cmc_svg_is_valid_xml() -> None:
    svg = cmc_svg([0.5, 0.7, 0.9, 1.0])
    root = ET.fromstring(svg)
    polyline = [e for e in root.iter() if e.tag.endswith("polyline")]
    assert len(polyline) == 1 and len(polyline[0].get("points").split()) == 4


def naive_first_valid(dist: np.ndarray, q: int, qp, gp, qc, gc) -> list[int]:
    order = sorted(range(dist.shape[1]), key=lambda j: (dist[q, j], j))
    return [j for j in order if not (gp[j] == qp[q] and gc[j] == qc[q])]


def test_select_queries_and_ranking_against_loops() -> None:
    rng = np.random.default_rng(0)
    nq, ng = 30, 40
    qp, gp = rng.integers(0, 8, nq), rng.integers(0, 8, ng)
    qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    dist = rng.random((nq, ng)).astype(np.float32)
    # make some true matches near so both groups exist
    for i in range(0, nq, 3):
        js = [j for j in range(ng) if gp[j] == qp[i] and gc[j] != qc[i]]
        if js:
            dist[i, js[0]] = -1.0
    chosen, fails = select_queries(dist, qp, gp, qc, gc, num=10, failure_fraction=0.5, seed=3)
    want_fail, valid = {}, set()
    for i in range(nq):
        if any(gp[j] == qp[i] and gc[j] != qc[i] for j in range(ng)):
            valid.add(i)
        want_fail[i] = gp[naive_first_valid(dist, i, qp, gp, qc, gc)[0]] != qp[i]
    assert len(chosen) == 10 and len(set(chosen)) == 10
    assert all(i in valid for i in chosen)
    assert [want_fail[i] for i in chosen] == fails
    assert sum(fails) == 5 and fails == sorted(fails, reverse=True)  # failures first
    assert select_queries(dist, qp, gp, qc, gc, num=10, seed=3) == (chosen, fails)  # deterministic
    for i in chosen[:4]:
        assert (
            ranked_gallery(dist, i, qp, gp, qc, gc, 7)
            == naive_first_valid(dist, i, qp, gp, qc, gc)[:7]
        )
    only_fail, flags = select_queries(dist, qp, gp, qc, gc, num=4, failure_fraction=1.0)
    assert all(flags) and all(want_fail[i] for i in only_fail)


# ------------------------------------------------------------------- page + browser
NUM_QUERIES, TOPK, BRANCHES = 4, 5, 3


def tiny_cama() -> CAMA:
    cfg = load_config(None, ["model.name=cama", "loss.metric=none"])
    torch.manual_seed(0)
    return CAMA(cfg, 6, backbone=build_backbone("resnet18", width=8)).eval()


@pytest.fixture(scope="module")
def report_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_cama()
    g = torch.Generator().manual_seed(0)
    # 4 identities; images of one identity share a colour pattern so rankings are not random
    base = torch.randn(4, 3, 64, 32, generator=g)
    q_pids, g_pids = torch.arange(8) % 4, torch.arange(20) % 4
    q_cams, g_cams = torch.zeros(8, dtype=torch.long), torch.tensor([1, 2] * 10)
    q_img = base[q_pids] + 0.8 * torch.randn(8, 3, 64, 32, generator=g)
    g_img = base[g_pids] + 0.8 * torch.randn(20, 3, 64, 32, generator=g)
    with torch.no_grad():
        qf = model.encode({"images": q_img})["post_bn"]
        distmat = 1 - qf @ model.encode({"images": g_img})["post_bn"].t() / BRANCHES
    out = tmp_path_factory.mktemp("report") / "report.html"

    def load_images(qi, gi):
        return q_img[qi], g_img[gi]

    return build_ranking_report(
        model, load_images, distmat, q_pids, g_pids, q_cams, g_cams,
        metrics={"mAP": 0.5, "rank1": 0.625, "rank5": 1.0},
        cmc=[0.625, 0.8, 0.9, 1.0, 1.0],
        out_path=out, num_queries=NUM_QUERIES, topk=TOPK, failure_fraction=0.5, mean=(0.5,) * 3, std=(0.25,) * 3,
    )  # fmt: skip


def test_report_html_structure(report_path: Path) -> None:
    page = report_path.read_text()
    views = 2 + BRANCHES  # image, aggregate, branch 1..3
    assert len(re.findall(r"<div class='row (?:failure|success)'", page)) == NUM_QUERIES
    assert page.count("<img ") == NUM_QUERIES * (1 + TOPK) * views
    assert page.count("data:image/jpeg;base64,") == NUM_QUERIES * (1 + TOPK) * views
    assert (
        page.count("class='cell match'") + page.count("class='cell nonmatch'") == NUM_QUERIES * TOPK
    )
    assert (
        "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page
    )
    assert "<svg class='cmc'" in page and "rank-1 miss" in page
    # cameras are 1-based as in the file names (query camid 0 is c1; gallery 1, 2 are c2, c3)
    assert "<span class='nw'>cam 1</span>" in page and "cam 0" not in page
    assert "<span class='nw'>cam 3</span>" in page and "<span class='nw'>pid " in page
    assert ".cap .nw{white-space:nowrap}" in page  # "cam" and its number stay together
    # percentages: two decimals rounded half up, as in the CLI table (62.5 -> 62.50)
    assert "<td>62.50%</td>" in page and "<td>50.00%</td>" in page


@pytest.mark.chromium
def test_report_in_headless_chromium(report_path: Path, tmp_path: Path) -> None:
    exe = require_chromium()
    flags = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    url = report_path.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-ready="1"' in html, "the page script did not finish (a JS error?)"
    views = 2 + BRANCHES
    assert len(re.findall(r'<div class="row (?:failure|success)"', html)) == NUM_QUERIES
    assert html.count("<img ") == NUM_QUERIES * (1 + TOPK) * views
    # the script built one toggle button per view and shows the aggregate view
    assert len(re.findall(r'<button type="button" data-view="', html)) == views
    assert 'data-view="aggregate"' in html.split("<body", 1)[1].split(">", 1)[0]
    shot = tmp_path / "report.png"
    res = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1400,2000", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, res.stderr[
        -2000:
    ]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report_screenshot.png")


# ---------------------------------------------------------------------- command
def test_report_command_end_to_end(tmp_path: Path) -> None:
    """`reidkit report` on a generated tiny synthetic set with saved (untrained) weights."""
    from reidkit.cli import main
    from reidkit.data.synth import generate

    generate(tmp_path / "synth-tiny", preset="tiny", seed=0, progress=False)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(
        "model: {name: cama, backbone: resnet18, cama: {num_branches: 2}}\n"
        f"data: {{dataset: synth, root: '{tmp_path}', synth_preset: tiny, height: 64, width: 32, num_workers: 0}}\n"
        "loss: {metric: none}\ndevice: cpu\n"
    )
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    torch.save(CAMA(cfg, 24).state_dict(), weights)
    out = tmp_path / "out"
    rc = main(["report", "-c", str(cfg_path), "--weights", str(weights), "--out", str(out), "--queries", "3", "--topk", "4", "--no-progress"])  # fmt: skip
    assert rc == 0
    page = (out / "report.html").read_text()
    assert len(re.findall(r"<div class='row (?:failure|success)'", page)) == 3
    assert page.count("<img ") == 3 * 5 * 4  # image, aggregate, 2 branches
    # the shown distances are those of the evaluation: rank order is increasing
    for row in page.split("<div class='row ")[1:]:
        d = [float(x) for x in re.findall(r"d=([0-9.\-]+)", row)]
        assert d == sorted(d) and len(d) == 4
    assert (
        main(
            [
                "report",
                "-c",
                str(cfg_path),
                "--weights",
                str(tmp_path / "nope.pth"),
                "--out",
                str(out),
            ]
        )
        == 1
    )


def test_report_uses_eval_feature_cosine() -> None:
    """The aggregate RAM's grid mean equals 1 - the cosine distance of the test features,
    i.e. the overlays explain exactly the ranking the report shows."""
    from reidkit.viz.ram import aggregate_ranking_activation_map, feature_maps

    model = tiny_cama()
    imgs = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        feats = model.encode({"images": imgs})["post_bn"]
        maps = feature_maps(model, imgs)
    agg = aggregate_ranking_activation_map(maps[:, 0].mean(dim=(-2, -1)), maps[:, 1:])
    torch.testing.assert_close(
        agg.mean(dim=(-2, -1)), F.cosine_similarity(feats[:1], feats[1:]), rtol=1e-4, atol=1e-5
    )


def test_report_for_single_head_baseline(tmp_path: Path) -> None:
    """A baseline (no branches) gets the image and aggregate views only."""
    from reidkit.methods import build_method

    cfg = load_config(None, ["model.name=ide_bn", "model.backbone=resnet18", "loss.metric=none"])
    torch.manual_seed(0)
    model = build_method(cfg, 4).eval()
    imgs = torch.randn(6, 3, 64, 32, generator=torch.Generator().manual_seed(4))
    pids, cams = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        feats = F.normalize(model.encode({"images": imgs})["post_bn"], dim=1)
    dist = 1 - feats[:2] @ feats.t()
    out = build_ranking_report(
        model, lambda qi, gi: (imgs[qi], imgs[gi]), dist, pids[:2], pids, cams[:2], cams,
        metrics={"mAP": 0.5}, cmc=[0.5, 1.0], out_path=tmp_path / "r.html", num_queries=2, topk=3,
    )  # fmt: skip
    page = out.read_text()
    assert '"keys": ["image", "aggregate"]' in page
    assert page.count("<img ") == 2 * (1 + 3) * 2
