"""MGRe analyses: region boxes drawn in the HTML ranking report (and the page in headless
Chromium), box drawing, per-stage CAMs of a baseline, and ``reidkit analyze mgre`` end to
end on a generated tiny synthetic set."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from chromium_cdp import require_chromium

from reidkit.config import load_config
from reidkit.methods.mgre import MGRe
from reidkit.models import build_backbone
from reidkit.viz.report import build_ranking_report, draw_boxes

torch.set_num_threads(1)
ARTIFACTS = Path("/tmp/reidkit_artifacts")
NUM_QUERIES, TOPK = 3, 4


def test_draw_boxes_hand_case():
    img = np.zeros((10, 20, 3), dtype=np.uint8)
    boxes = np.array([[0.25, 0.2, 0.75, 0.8], [np.nan, 0, 1, 1]])
    out = draw_boxes(img, boxes, [(255, 0, 0), (0, 255, 0)], width=1)
    assert out is not img and img.sum() == 0  # a new image
    # outline from (5, 2) to (14, 7) in pixels: edges red, inside and outside black
    assert out[2, 5].tolist() == [255, 0, 0] and out[7, 14].tolist() == [255, 0, 0]
    assert out[4, 9].tolist() == [0, 0, 0] and out[0, 0].tolist() == [0, 0, 0]
    assert not (out[..., 1] > 0).any()  # the NaN box is not drawn
    with pytest.raises(ValueError, match="R colours"):
        draw_boxes(img, boxes, [(255, 0, 0)])


def tiny_mgre() -> MGRe:
    cfg = load_config(None, ["model.name=mgre", "model.mgre.part_dim=8"])
    torch.manual_seed(0)
    return MGRe(cfg, 6, backbone=build_backbone("resnet18", width=8)).eval()


@pytest.fixture(scope="module")
def mgre_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_mgre()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, 64, 32, generator=g)
    q_pids, g_pids = torch.arange(6) % 4, torch.arange(16) % 4
    q_cams, g_cams = torch.zeros(6, dtype=torch.long), torch.tensor([1, 2] * 8)
    q_img = base[q_pids] + 0.8 * torch.randn(6, 3, 64, 32, generator=g)
    g_img = base[g_pids] + 0.8 * torch.randn(16, 3, 64, 32, generator=g)
    kp = torch.zeros(22, 17, 3)
    kp[:, :, 0] = torch.linspace(8, 24, 17)
    kp[:, :, 1] = torch.linspace(4, 60, 17)
    kp[:, :, 2] = 2
    with torch.no_grad():
        qf = model.encode({"images": q_img})["post_bn"]
        distmat = torch.cdist(qf, model.encode({"images": g_img})["post_bn"])
    out = tmp_path_factory.mktemp("report") / "report.html"
    return build_ranking_report(
        model, lambda qi, gi: (q_img[qi], g_img[gi]), distmat, q_pids, g_pids, q_cams, g_cams,
        metrics={"mAP": 0.5, "rank1": 0.5}, cmc=[0.5, 0.8, 1.0], out_path=out,
        num_queries=NUM_QUERIES, topk=TOPK,
        load_keypoints=lambda qi, gi: (kp[qi], kp[[6 + i for i in gi]]),
    )  # fmt: skip


def test_report_shows_predicted_and_keypoint_regions(mgre_report: Path) -> None:
    page = mgre_report.read_text()
    keys = json.loads(re.search(r"id='report-views'>(.*?)</script>", page).group(1))["keys"]
    assert keys == ["image", "aggregate", "regions", "keypoint_regions"]
    assert page.count("<img ") == NUM_QUERIES * (1 + TOPK) * 4
    assert "<h2>Regions</h2>" in page
    for stage in (1, 2, 3):
        assert re.search(rf"stage {stage}: [a-z ,]+ &nbsp;IoU 0\.\d\d", page)
    assert "left torso" in page and "whole body" in page


def test_report_without_keypoints_shows_the_predicted_regions_only(tmp_path: Path) -> None:
    model = tiny_mgre()
    imgs = torch.randn(6, 3, 64, 32, generator=torch.Generator().manual_seed(3))
    pids, cams = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    dist = torch.rand(2, 6, generator=torch.Generator().manual_seed(1))
    out = build_ranking_report(
        model, lambda qi, gi: (imgs[qi], imgs[gi]), dist, pids[:2], pids, cams[:2], cams,
        metrics={"mAP": 0.5}, cmc=[0.5, 1.0], out_path=tmp_path / "r.html", num_queries=2, topk=3,
    )  # fmt: skip
    page = out.read_text()
    assert '"keys": ["image", "aggregate", "regions"]' in page
    assert "IoU" not in page.split("<h2>Regions</h2>", 1)[1].split("</ul>", 1)[0]


@pytest.mark.chromium
def test_mgre_report_in_headless_chromium(mgre_report: Path, tmp_path: Path) -> None:
    exe = require_chromium()
    flags = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]  # fmt: skip
    url = mgre_report.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout
    buttons = re.findall(r'<button type="button" data-view="([a-z_]+)"', dom.stdout)
    assert buttons == ["image", "aggregate", "regions", "keypoint_regions"]
    shot = tmp_path / "mgre_report.png"
    res = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,1400", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "mgre_report_screenshot.png")


def test_baseline_stage_maps():
    from reidkit.analysis.mgre import baseline_stage_maps
    from reidkit.methods import build_method

    cfg = load_config(None, ["model.name=bot", "model.backbone=resnet18"])
    torch.manual_seed(0)
    model = build_method(cfg, 5).eval()
    imgs = torch.randn(2, 3, 64, 32)
    maps = baseline_stage_maps(model, imgs, torch.tensor([1, 3]))
    assert [tuple(maps[f"stage{i}"].shape) for i in (1, 2, 3, 4)] == [
        (2, 16, 8),
        (2, 8, 4),
        (2, 4, 2),
        (2, 4, 2),
    ]
    assert maps["final"].shape == (2, 64, 32)
    assert all(0 <= float(m.min()) and float(m.max()) <= 1 + 1e-6 for m in maps.values())


def test_analyze_mgre_command(tmp_path: Path, capsys) -> None:
    from reidkit.cli import main
    from reidkit.data.synth import generate

    generate(tmp_path / "synth-tiny", preset="tiny", seed=0, progress=False)
    common = (
        f"data: {{dataset: synth, root: '{tmp_path}', synth_preset: tiny, height: 64, width: 32,"
        " num_workers: 0, test_batch_size: 64}\ndevice: cpu\n"
    )
    cfg_path = tmp_path / "mgre.yaml"
    cfg_path.write_text("model: {name: mgre, backbone: resnet18, mgre: {part_dim: 16}}\n" + common)
    bot_path = tmp_path / "bot.yaml"
    bot_path.write_text("model: {name: bot, backbone: resnet18}\n" + common)
    out = tmp_path / "out"
    argv = ["analyze", "mgre", "-c", str(cfg_path), "--out", str(out), "--images", "3"]
    assert main([*argv, "--baseline-config", str(bot_path), "--max-batches", "1"]) == 0
    printed = capsys.readouterr().out
    assert "initialisation" in printed and "| 1 |" in printed
    summary = json.loads((out / "region_iou.json").read_text())
    assert set(summary["region_iou"]) == {"1", "2", "3"}
    assert all(0 <= v <= 1 for v in summary["region_iou"].values())
    assert set(summary["region_iou_per_region"]) == {
        "head", "left_torso", "right_torso", "legs", "upper_body", "lower_body", "whole_body",
    }  # fmt: skip
    for name in ("regions.png", "cams.png", "index.html"):
        assert (out / name).stat().st_size > 1000
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "Fig. 4" in page
    # a non-MGRe config is refused
    assert main(["analyze", "mgre", "-c", str(bot_path), "--out", str(tmp_path / "o2")]) == 1
