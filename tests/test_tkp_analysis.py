"""TKP's analyses: the modality gap against loops, the PCA projection against numpy, CAMs
of the image network against the classifier applied by hand, foreground shares on a
hand-worked case, and `reidkit analyze tkp` end to end (page checked in Chromium)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from chromium_cdp import BASE_FLAGS, require_chromium

from reidkit.analysis.tkp import (
    foreground_share,
    image_cams,
    keypoint_boxes,
    modality_gap,
    project_2d,
    tsne_available,
)
from reidkit.config import dump_config, load_config
from reidkit.engine import FeatureSet
from reidkit.engine.checkpoint import CHECKPOINT_FORMAT, atomic_save
from reidkit.models import build_backbone

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def _fs(feats, pids) -> FeatureSet:
    return FeatureSet(
        torch.as_tensor(feats), torch.as_tensor(pids), torch.zeros(len(pids), dtype=torch.long)
    )


def test_modality_gap_matches_loops() -> None:
    g = torch.Generator().manual_seed(0)
    pids = [3, 3, 5, 5, 5, 8]
    img = torch.randn(6, 4, generator=g, dtype=torch.float64)
    vid = torch.randn(6, 4, generator=g, dtype=torch.float64)
    got = modality_gap(_fs(img, pids), _fs(vid, pids))
    ids = sorted(set(pids))
    centre = {p: vid[[k for k, q in enumerate(pids) if q == p]].mean(0) for p in ids}

    def d(a, b):
        return math.sqrt(float(((a - b) ** 2).sum()))

    same, other = [], []
    for p in ids:
        rows = [k for k, q in enumerate(pids) if q == p]
        same.append(np.mean([d(img[k], centre[p]) for k in rows]))
        other.append(
            np.mean([np.mean([d(img[k], centre[q]) for q in ids if q != p]) for k in rows])
        )
    assert got["same_id"] == pytest.approx(np.mean(same))
    assert got["other_id"] == pytest.approx(np.mean(other))
    assert got["ratio"] == pytest.approx(np.mean(same) / np.mean(other))
    assert got["paired"] == pytest.approx(np.mean([d(img[k], vid[k]) for k in range(6)]))
    assert got["identities"] == 3 and got["tracklets"] == 6
    # identical modalities: a frame is at its own tracklet
    assert modality_gap(_fs(vid, pids), _fs(vid, pids))["paired"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same tracklets"):
        modality_gap(_fs(img, pids), _fs(vid[:5], pids[:5]))


def test_pca_projection_matches_numpy() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 6)) @ np.diag([5, 3, 1, 0.5, 0.2, 0.1])
    got = project_2d(torch.tensor(x)).numpy()
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    ref = xc @ vt[:2].T
    for j in range(2):  # same up to the sign of each component
        assert np.allclose(np.abs(got[:, j]), np.abs(ref[:, j]), atol=1e-4)
    assert got[:, 0].var() > got[:, 1].var()
    if not tsne_available():
        with pytest.raises(ImportError, match="scikit-learn"):
            project_2d(torch.tensor(x), "tsne")
    with pytest.raises(ValueError):
        project_2d(torch.tensor(x), "umap")


def test_keypoint_boxes_and_foreground_share_by_hand() -> None:
    kp = torch.zeros(2, 17, 3)
    kp[0, :2] = torch.tensor([[2.0, 4.0, 2.0], [5.0, 9.0, 1.0]])  # box x 2..5, y 4..9
    boxes = keypoint_boxes(kp, height=16, width=8, margin=0.0)
    assert boxes[0].tolist() == [2.0, 4.0, 6.0, 10.0]
    assert boxes[1].tolist() == [0.0, 0.0, 8.0, 16.0]  # no visible keypoint: whole image
    maps = torch.zeros(2, 16, 8)
    maps[0, 4:10, 2:6] = 1.0  # all mass inside the box
    maps[1, :8] = 1.0
    share = foreground_share(maps, boxes)
    assert share[0].item() == pytest.approx(1.0)
    assert share[1].item() == pytest.approx(1.0)  # the box is the whole image
    other = foreground_share(maps[1:], torch.tensor([[0.0, 0.0, 8.0, 4.0]]))
    assert other.item() == pytest.approx(0.5)  # top 4 of the 8 active rows


@pytest.fixture
def tiny(monkeypatch):
    def small(model_cfg):
        return build_backbone(model_cfg.backbone, last_stride=model_cfg.last_stride, width=8)

    monkeypatch.setattr("reidkit.methods.tkp.backbone_from_config", small)


def test_image_cams_are_the_shared_classifier_at_every_position(tiny) -> None:
    from reidkit.methods.tkp import TKP

    cfg = load_config(REPO / "configs/tkp/synth_video.yaml", ["model.pretrained=null"])
    torch.manual_seed(0)
    model = TKP(cfg, 4).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.normal_(0, 0.5)
    images = torch.randn(3, 3, 32, 16)
    targets = torch.tensor([0, 3, 1])
    cams = image_cams(model, images, targets)
    with torch.no_grad():
        fmap = model.image_net(images)
        by_hand = torch.einsum("bchw,bc->bhw", fmap, model.classifier.weight[targets])
        by_hand = by_hand + model.classifier.bias[targets].view(-1, 1, 1)
        # the grid map's mean is the logit of the image feature
        logits = model.classifier(model.image_features(images)).gather(1, targets[:, None])[:, 0]
    assert torch.allclose(by_hand.mean((1, 2)), logits, atol=1e-4)
    up = F.interpolate(by_hand[None], size=(32, 16), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(cams, up, atol=1e-4)


def _fake_run(folder: Path, root: Path, *over: str) -> Path:
    """A TKP run folder (config + untrained checkpoint) on tiny-video."""
    from reidkit.methods.tkp import TKP

    cfg = load_config(
        REPO / "configs/tkp/synth_video.yaml",
        ["model.pretrained=null", f"data.root={root}", "data.synth_preset=tiny-video",
         "data.height=64", "data.width=32", "data.num_workers=0", "data.test_chunk_len=8", *over],
    )  # fmt: skip
    torch.manual_seed(len(over))
    model = TKP(cfg, 5)
    (folder / "checkpoints").mkdir(parents=True)
    dump_config(cfg, folder / "config.yaml")
    atomic_save(
        {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "num_classes": 5, "epoch": 0},
        folder / "checkpoints" / "last.pt",
    )
    return folder


def test_analyze_tkp_command_and_page(tmp_path, tiny, capsys) -> None:
    from reidkit.cli import main
    from reidkit.data.synth import generate_video

    generate_video(
        tmp_path / "synth-tiny-video",
        "tiny-video",
        seed=0,
        workers=1,
        height=64,
        width=32,
        progress=False,
    )
    with_tkp = _fake_run(tmp_path / "tkp", tmp_path)
    without = _fake_run(
        tmp_path / "joint", tmp_path, "model.tkp.tkp_f_weight=0", "model.tkp.tkp_d_weight=0"
    )
    out = tmp_path / "analysis"
    argv = [
        "analyze",
        "tkp",
        "--run",
        str(with_tkp),
        "--baseline-run",
        str(without),
        "--out",
        str(out),
    ]
    assert main([*argv, "--device", "cpu", "--num-cams", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| with TKP |" in printed and "| without TKP |" in printed
    summary = json.loads((out / "summary.json").read_text())
    for name in ("with TKP", "without TKP"):
        gap = summary["gap"][name]
        assert gap["tracklets"] == 11 and 0 <= gap["same_id"] <= 2
        assert 0.0 <= summary["foreground_share"][name] <= 1.0  # the synthetic set has keypoints
    figures = [*summary["projections"], summary["cams"]]
    assert all((out / f).is_file() for f in figures)
    exe = require_chromium()
    dom = subprocess.run(
        [exe, *BASE_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
         "--dump-dom", (out / "index.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-ready="1"' in dom.stdout
    assert f'data-images="{len(figures)}"' in dom.stdout  # every figure decoded
    # a run of another method is refused with a clear message
    other = tmp_path / "bot"
    (other / "checkpoints").mkdir(parents=True)
    dump_config(load_config(REPO / "configs/synth/bot.yaml"), other / "config.yaml")
    (other / "checkpoints" / "last.pt").write_bytes(b"")
    assert (
        main(
            [
                "analyze",
                "tkp",
                "--run",
                str(other),
                "--baseline-run",
                str(without),
                "--out",
                str(out),
            ]
        )
        == 1
    )
    assert "needs TKP runs" in capsys.readouterr().err
