"""Video re-ID in the engine: dataset / loader dispatch, chunked tracklet features against
frame-by-frame computations, the four modes against naive metrics, the temporal baseline
(training, evaluation in every mode, the CLI), 10-split training and evaluation, flops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.io import savemat
from torch import nn

from reidkit.cli import main
from reidkit.config import Config, DataConfig, TestConfig, load_config
from reidkit.data.datasets import DatasetError, dataset_from_config
from reidkit.data.datasets.video.base import sliding_windows
from reidkit.data.loader import batch_keys, build_test_loader, build_train_loader
from reidkit.data.records import TrackletRecord
from reidkit.data.synth import generate_video
from reidkit.engine import FeatureSet, evaluate_model, train
from reidkit.engine.video_eval import (
    VIDEO_MODES,
    extract_tracklet_features,
    format_split_summary,
    resolve_video_modes,
    summarize_splits,
    tracklet_images,
)
from reidkit.methods.base import MissingBatchKeyError, ReIDMethod
from reidkit.models import build_backbone

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
H, W = 64, 32


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video")
    generate_video(
        root / "synth-tiny-video",
        "tiny-video",
        seed=0,
        workers=1,
        height=H,
        width=W,
        progress=False,
    )
    return root


def _cfg(root: Path, **data) -> Config:
    d = dict(
        dataset="synth_video",
        synth_preset="tiny-video",
        root=str(root),
        height=H,
        width=W,
        num_workers=0,
        test_chunk_len=3,
        test_batch_size=7,  # 2 chunks of 3 per batch: chunks of different tracklets mix
        batch_size=8,
        num_instances=4,
    )
    d.update(data)
    return Config(data=DataConfig(**d), test=TestConfig(feature="feat"))


class MeanColour(ReIDMethod):
    """Feature = the mean colour of each frame (a tiny linear map on it); records the
    (input kind, role) pairs it was asked to encode."""

    requires = frozenset({"clips"})
    eval_requires = frozenset({"clips"})
    feature_names = ("feat",)

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(
                torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.1, 0.0, 1.0]])
            )
        self.seen: set[tuple[str, str]] = set()

    def encode(self, batch, role="gallery"):
        if "clips" in batch:
            self.seen.add(("clips", role))
            return {"feat": self.proj(batch["clips"].mean((-2, -1)))}  # (B, T, 3)
        self.seen.add(("images", role))
        return {"feat": self.proj(batch["images"].mean((-2, -1)))}


class ImageOnlyColour(MeanColour):
    """The same feature from a method that only encodes images."""

    requires = frozenset({"images"})
    eval_requires = frozenset({"images"})

    def encode(self, batch, role="gallery"):
        assert "clips" not in batch
        return super().encode(batch, role)


def _frame_features(cfg: Config, model: nn.Module, tracklets: list[TrackletRecord]):
    """Per-frame features computed independently: every frame through the image loader."""
    frames = [t.frame(i) for t in tracklets for i in range(len(t))]
    out = []
    with torch.no_grad():
        for batch in build_test_loader(cfg, frames):
            out.append(model.proj(batch["images"].mean((-2, -1))))
    feats = torch.cat(out)
    per, start = [], 0
    for t in tracklets:
        per.append(feats[start : start + len(t)])
        start += len(t)
    return per


def _naive(q: torch.Tensor, qp, qc, g: torch.Tensor, gp, gc) -> tuple[float, float, int]:
    """mAP, R1 and the number of queries without a true match, by loops."""
    aps, r1, skipped = [], [], 0
    for i in range(q.shape[0]):
        d = [1 - float(F.normalize(q[i], dim=0) @ F.normalize(g[j], dim=0)) for j in range(len(g))]
        order = sorted(range(len(g)), key=lambda j: (d[j], j))
        keep = [j for j in order if not (gp[j] == qp[i] and gc[j] == qc[i])]
        hits, precisions = 0, []
        for rank, j in enumerate(keep, 1):
            if gp[j] == qp[i]:
                hits += 1
                precisions.append(hits / rank)
        if not hits:
            skipped += 1
            continue
        aps.append(sum(precisions) / hits)
        r1.append(float(gp[keep[0]] == qp[i]))
    return sum(aps) / len(aps), sum(r1) / len(r1), skipped


# ----------------------------------------------------------------------------- data side
def test_dataset_and_loader_dispatch_on_the_dataset_kind(video_root: Path) -> None:
    cfg = _cfg(video_root)
    ds = dataset_from_config(cfg.data)
    assert isinstance(ds.train[0], TrackletRecord) and ds.num_train_pids == 5
    keys = batch_keys(ds.train)
    assert {"clips", "clip_mask", "frames", "keypoints"} <= keys and "images" not in keys
    loader = build_train_loader(cfg, ds.train)
    batch = next(iter(loader))
    assert batch["clips"].shape == (8, 4, 3, H, W) and batch["clip_mask"].all()
    test = next(iter(build_test_loader(cfg, ds.gallery)))
    assert test["clips"].shape[1] == 3 and "chunk" in test
    with pytest.raises(ValueError, match="not defined for tracklets"):
        build_test_loader(cfg, ds.gallery, occlusion_p=0.5)
    # dataset-specific options go through data.dataset_options, checked by the parser
    bad = cfg.data.model_copy(update={"dataset_options": {"tkp_train": True}})
    with pytest.raises(DatasetError, match="unknown option.*tkp_train"):
        dataset_from_config(bad)
    with pytest.raises(DatasetError, match="keypoint files are read for image datasets"):
        dataset_from_config(cfg.data.model_copy(update={"keypoints": "k.json"}))


def test_sliding_windows_are_the_authors_dense_sampling() -> None:
    # iLIDS-VID camera 2 (length 8, step 4) and Duke (32 / 32), worked by hand
    assert sliding_windows(13, 8, 4) == [(0, 8), (4, 12), (8, 13)]
    assert sliding_windows(16, 8, 4) == [(0, 8), (4, 12), (8, 16), (12, 16)]
    assert sliding_windows(3, 8, 4) == [(0, 3)]
    assert sliding_windows(70, 32, 32) == [(0, 32), (32, 70)]
    assert sliding_windows(31, 32, 32) == [(0, 31)]
    with pytest.raises(ValueError):
        sliding_windows(5, 0, 4)


# ----------------------------------------------------------------------- tracklet features
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_chunked_tracklet_features_equal_frame_by_frame_pooling(video_root, pooling) -> None:
    cfg = _cfg(video_root)
    ds = dataset_from_config(cfg.data)
    records = ds.gallery
    assert max(len(r) for r in records) > cfg.data.test_chunk_len  # several chunks each
    model = MeanColour().eval()
    per = _frame_features(cfg, model, records)
    pool = (lambda f: f.mean(0)) if pooling == "avg" else (lambda f: f.amax(0))
    expected = F.normalize(torch.stack([pool(f) for f in per]), dim=1)
    fs = extract_tracklet_features(cfg, model, records, "cpu", "gallery", pooling=pooling)
    assert fs.feats.shape == (len(records), 3)
    assert torch.allclose(fs.feats, expected, atol=1e-5)
    assert fs.pids.tolist() == [r.pid for r in records]
    assert fs.paths == [r.paths[0] for r in records]
    # an image method: every frame encoded as an image, same result
    other = extract_tracklet_features(
        cfg, ImageOnlyColour().eval(), records, "cpu", pooling=pooling
    )
    assert torch.allclose(other.feats, expected, atol=1e-5)
    # flip TTA: per frame, before pooling
    flip_cfg = cfg.model_copy(update={"test": cfg.test.model_copy(update={"flip": True})})
    flipped = extract_tracklet_features(flip_cfg, model, records, "cpu", pooling=pooling)
    assert torch.allclose(flipped.feats, expected, atol=1e-5)  # mean colour is flip-invariant


def test_per_clip_features_are_weighted_by_their_real_frames(video_root) -> None:
    class ClipMean(MeanColour):
        def encode(self, batch, role="gallery"):
            if "clips" not in batch:
                return super().encode(batch, role)
            f = self.proj(batch["clips"].mean((-2, -1)))  # (B, T, 3)
            m = batch["clip_mask"].float().unsqueeze(-1)
            return {"feat": (f * m).sum(1) / m.sum(1)}  # the clip's own mean (B, 3)

    cfg = _cfg(video_root)
    records = dataset_from_config(cfg.data).query
    model = ClipMean().eval()
    per = _frame_features(cfg, model, records)
    expected = F.normalize(torch.stack([f.mean(0) for f in per]), dim=1)
    fs = extract_tracklet_features(cfg, model, records, "cpu")
    assert torch.allclose(fs.feats, expected, atol=1e-5)


def test_four_modes_match_naive_metrics_and_protocols(video_root) -> None:
    cfg = _cfg(video_root)
    cfg.test.video_mode = "all"
    ds = dataset_from_config(cfg.data)
    model = MeanColour().eval()
    assert resolve_video_modes("all", model) == list(VIDEO_MODES)
    for in_gallery in (False, True):
        cfg.test.query_in_gallery = in_gallery
        res = evaluate_model(cfg, model, ds, "cpu")
        assert list(res.modes) == ["v2v", "i2v", "v2i", "i2i"] and res.primary == "v2v"
        gallery = ds.query + ds.gallery if in_gallery else ds.gallery
        vq = torch.stack([f.mean(0) for f in _frame_features(cfg, model, ds.query)])
        vg = torch.stack([f.mean(0) for f in _frame_features(cfg, model, gallery)])
        iq = torch.stack([f[0] for f in _frame_features(cfg, model, ds.query)])
        ig = torch.stack([f[0] for f in _frame_features(cfg, model, gallery)])
        qp, qc = [r.pid for r in ds.query], [r.camid for r in ds.query]
        gp, gc = [r.pid for r in gallery], [r.camid for r in gallery]
        sets = {"v2v": (vq, vg), "i2v": (iq, vg), "v2i": (vq, ig), "i2i": (iq, ig)}
        for mode, (q, g) in sets.items():
            m_ap, r1, skipped = _naive(q, qp, qc, g, gp, gc)
            assert res.metrics[f"{mode}_mAP"] == pytest.approx(m_ap, abs=1e-6), mode
            assert res.metrics[f"{mode}_rank1"] == pytest.approx(r1, abs=1e-6), mode
            assert res.skipped[mode] == skipped == res.metrics[f"{mode}_skipped"]
            assert len(res.modes[mode].gallery) == len(gallery)
        assert res.metrics["mAP"] == res.metrics["v2v_mAP"]
        # tiny-video has one query identity seen by a single camera: skipped and counted
        assert res.skipped["v2v"] == 1 and "skipped" in res.notes[0]
        assert "| I2V" in res.table()
    assert model.seen == {
        ("clips", "query"),
        ("clips", "gallery"),
        ("images", "query"),
        ("images", "gallery"),
    }
    one = evaluate_model(
        cfg.model_copy(update={"test": TestConfig(feature="feat", video_mode="i2v")}),
        model,
        ds,
        "cpu",
    )
    assert list(one.modes) == ["i2v"]
    middle = tracklet_images(ds.query, "middle")
    assert [m.path for m in middle] == [r.paths[(len(r) - 1) // 2] for r in ds.query]


def test_split_summary_mean_and_spread() -> None:
    runs = [{"v2v_mAP": 0.5, "v2v_rank1": 0.6}, {"v2v_mAP": 0.7, "v2v_rank1": 0.8}]
    s = summarize_splits(runs)
    assert s["v2v_mAP"]["mean"] == pytest.approx(0.6)
    assert s["v2v_mAP"]["std"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    text = format_split_summary(s, ["v2v"], "ilidsvid")
    assert "60.00 ± 14.14" in text and "2 splits" in text


# ----------------------------------------------------------------------- temporal baseline
@pytest.fixture
def tiny_backbone(monkeypatch):
    """Width-8 ResNet-18 for the video methods (fast tests)."""

    def tiny(model_cfg):
        return build_backbone("resnet18", last_stride=model_cfg.last_stride, width=8)

    monkeypatch.setattr("reidkit.methods.video_baseline.backbone_from_config", tiny)
    return tiny


def _baseline_overrides(root: Path, out: Path) -> list[str]:
    return [
        f"data.root={root}",
        "data.synth_preset=tiny-video",
        f"data.height={H}",
        f"data.width={W}",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.test_chunk_len=4",
        "data.test_batch_size=16",
        "solver.max_epochs=1",
        "solver.iters_per_epoch=2",
        "model.video_baseline.non_local=true",
        "model.video_baseline.non_local_layers={layer2: [1], layer3: [1]}",
        f"output_dir={out}",
    ]


def test_video_baseline_parts_match_independent_computations(tiny_backbone) -> None:
    from reidkit.methods.video_baseline import VideoBaseline, temporal_average
    from reidkit.models.non_local import SpaceTimeNonLocalBlock

    cfg = load_config(REPO / "configs/video/synth_video_nl.yaml", ["model.pretrained=null"])
    torch.manual_seed(0)
    model = VideoBaseline(cfg, num_classes=5)
    blocks = [m for m in model.modules() if isinstance(m, SpaceTimeNonLocalBlock)]
    assert len(blocks) == 2 and model.backbone.inserted_groups["stnl"] == {
        "layer2": [1],
        "layer3": [1],
    }
    # the masked temporal average against a loop
    f, mask = torch.randn(3, 5, 4), torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]).bool()
    loop = torch.stack([f[b, mask[b]].mean(0) for b in range(3)])
    assert torch.allclose(temporal_average(f, mask), loop, atol=1e-6)
    # training: the video feature is the masked mean of the frame features
    clips = torch.randn(2, 3, 3, 32, 16)
    batch = {"clips": clips, "clip_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]).bool(),
             "pids": torch.tensor([0, 1])}  # fmt: skip
    out = model(batch)
    assert torch.allclose(
        out["global_feat"], temporal_average(out["frame_feats"], batch["clip_mask"])
    )
    losses = model.compute_loss(out, batch)
    assert set(losses) == {"ce", "triplet"}
    # eval: averaging per-frame post-BN features = BN of the averaged feature
    model.eval()
    with torch.no_grad():
        enc = model.encode(batch)
        assert enc["post_bn"].shape == (2, 3, model.feat_dim)
        avg = temporal_average(enc["post_bn"], batch["clip_mask"])
        ref = model.neck.bn(temporal_average(enc["pre_bn"], batch["clip_mask"]))
        assert torch.allclose(avg, ref, atol=1e-5)
        # an image is a one-frame clip
        img = model.encode({"images": clips[:, 0]})["post_bn"]
        one = model.encode({"clips": clips[:, :1]})["post_bn"][:, 0]
        assert torch.allclose(img, one, atol=1e-5)


def test_video_baseline_trains_and_evaluates_all_modes(video_root, tmp_path, tiny_backbone, capsys):
    out = tmp_path / "run"
    over = [*_baseline_overrides(video_root, out), "test.video_mode=all"]
    cfg = load_config(REPO / "configs/video/synth_video.yaml", over)
    train(cfg, progress=False)
    final = json.loads((out / "metrics.json").read_text())["final"]
    for mode in VIDEO_MODES:
        assert 0.0 <= final[f"{mode}_mAP"] <= 1.0 and f"{mode}_rank1" in final
    assert final["mAP"] == final["v2v_mAP"]
    text = capsys.readouterr().out
    assert "clip/s" in text and "final evaluation" in text
    assert "| V2V" in text and "| I2I" in text
    # the CLI on the same run: one mode, then the four-mode table
    last = str(out / "checkpoints" / "last.pt")
    argv = ["eval", "-c", str(REPO / "configs/video/synth_video.yaml"), *over, "--weights", last]
    res = tmp_path / "i2v.json"
    assert main([*argv, "--mode", "i2v", "--json", str(res)]) == 0
    got = json.loads(res.read_text())
    assert got["mAP"] == pytest.approx(final["i2v_mAP"], abs=1e-6)
    feats = tmp_path / "feats"
    assert main([*argv, "--mode", "all", "--save-features", str(feats)]) == 0
    printed = capsys.readouterr().out
    assert all(f"| synth_video {m.upper()}" in printed for m in VIDEO_MODES)
    q = FeatureSet.load(feats / "i2v_query")
    assert len(q) == 11 and q.paths[0].endswith(".jpg")
    # the image ranking report says what to use instead
    report = ["report", "-c", str(REPO / "configs/video/synth_video.yaml"), *over]
    assert main([*report, "--weights", last, "--out", str(tmp_path / "rep")]) == 1
    assert "reidkit eval --mode all" in capsys.readouterr().err


def test_method_kind_must_match_the_dataset_kind(video_root, tmp_path, tiny_backbone) -> None:
    from engine_fakes import write_market_folder

    image_root = write_market_folder(tmp_path / "market")
    cfg = load_config(
        REPO / "configs/video/synth_video.yaml",
        [f"data.root={image_root}", "data.dataset=market1501", f"output_dir={tmp_path / 'a'}"],
    )
    with pytest.raises(MissingBatchKeyError, match="needs 'clips'.*video"):
        train(cfg, progress=False)
    cfg = load_config(
        REPO / "configs/synth/bot.yaml",
        [f"data.root={video_root}", "data.dataset=synth_video", "data.synth_preset=tiny-video",
         f"output_dir={tmp_path / 'b'}"],
    )  # fmt: skip
    with pytest.raises(MissingBatchKeyError, match="needs 'images'.*image dataset"):
        train(cfg, progress=False)


# ----------------------------------------------------------------------------- 10 splits
def _write_ilids(root: Path, people: int = 6, splits: int = 3) -> Path:
    """An iLIDS-VID tree of real PNG frames: camera 1 has 5 frames, camera 2 has 13."""
    rng = np.random.default_rng(0)
    ddir = root / "ilids-vid"
    for cam, n in ((1, 5), (2, 13)):
        for p in range(1, people + 1):
            d = ddir / "i-LIDS-VID" / "sequences" / f"cam{cam}" / f"person{p:03d}"
            d.mkdir(parents=True)
            colour = np.array([p * 40 % 256, p * 90 % 256, p * 150 % 256], np.uint8)
            for t in range(n):
                img = np.full((32, 16, 3), colour) + rng.integers(0, 20, (32, 16, 3)).astype(
                    np.uint8
                )
                Image.fromarray(img).save(d / f"cam{cam}_person{p:03d}_{100 + t:05d}.png")
    split_dir = ddir / "train-test people splits"
    split_dir.mkdir(parents=True)
    ls_set = np.stack([rng.permutation(people) + 1 for _ in range(splits)]).astype(float)
    savemat(str(split_dir / "train_test_splits_ilidsvid.mat"), {"ls_set": ls_set})
    return root


def test_ilids_tkp_train_split(tmp_path) -> None:
    from reidkit.data.datasets.video import build_video_dataset

    root = _write_ilids(tmp_path)
    plain = build_video_dataset("ilidsvid", root, split=1)
    tkp = build_video_dataset("ilidsvid", root, split=1, tkp_train=True)
    assert len(plain.train) == 6
    cam1 = [r for r in tkp.train if r.camid == 0]
    cam2 = [r for r in tkp.train if r.camid == 1]
    assert len(cam1) == 3 and all(len(r) == 1 for r in cam1)
    assert all(r.paths[0].endswith("_00100.png") for r in cam1)  # the first frame
    assert len(cam2) == 3 * 3 and sorted({len(r) for r in cam2}) == [5, 8]
    assert [r.extras["frame_numbers"].tolist()[0] for r in cam2[:3]] == [100, 104, 108]
    assert tkp.query == plain.query and tkp.gallery == plain.gallery
    assert any("tkp_train" in n for n in tkp.notes)


def test_all_splits_train_and_eval_report_mean_and_spread(tmp_path, tiny_backbone, capsys):
    root = _write_ilids(tmp_path)
    cfg_path = REPO / "configs/video/ilidsvid.yaml"
    over = [
        f"data.root={root}",
        "data.height=32",
        "data.width=16",
        "data.num_workers=0",
        "data.batch_size=4",
        "data.num_instances=2",
        "data.test_batch_size=16",
        "model.pretrained=null",
        "solver.max_epochs=1",
        "solver.iters_per_epoch=1",
        "test.video_mode=all",
        f"output_dir={tmp_path / 'runs'}",
    ]
    assert main(["train", "-c", str(cfg_path), *over, "--splits", "0", "2", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "runs" / "splits.json").read_text())
    assert summary["splits"] == [0, 2] and len(summary["per_split"]) == 2
    maps = [s["i2v_mAP"] for s in summary["per_split"]]
    assert summary["summary"]["i2v_mAP"]["mean"] == pytest.approx(np.mean(maps))
    weights = str(tmp_path / "runs" / "split{split}" / "checkpoints" / "last.pt")
    res = tmp_path / "splits_eval.json"
    argv = ["eval", "-c", str(cfg_path), *over, "--weights", weights, "--splits", "0", "2"]
    assert main([*argv, "--json", str(res)]) == 0
    printed = capsys.readouterr().out
    assert "mean ± std over 2 splits" in printed and "| ilidsvid I2V" in printed
    got = json.loads(res.read_text())
    assert got["summary"]["i2v_mAP"]["mean"] == pytest.approx(np.mean(maps), abs=1e-6)
    with pytest.raises(ValueError, match="must contain '\\{split\\}'"):
        main(["eval", "-c", str(cfg_path), *over, "--weights", "w.pt", "--all-splits", "--debug"])


# ----------------------------------------------------------------------------- flops
def test_flops_of_a_video_method_counts_a_clip(tmp_path, capsys) -> None:
    over = ["data.height=32", "data.width=16", "device=cpu"]
    out = tmp_path / "flops.json"
    argv = ["flops", "-c", str(REPO / "configs/video/synth_video.yaml"), *over, "--frames", "3"]
    assert (
        main([*argv, "--batch-sizes", "2", "--warmup", "0", "--runs", "1", "--json", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "GFLOPs per clip of 3 frames" in text and "ms/clip" in text
    info = json.loads(out.read_text())
    assert info["input"] == [3, 3, 32, 16] and info["frames"] == 3
    # a per-frame network: a clip costs T images
    assert info["flops"] == 3 * info["image_flops"]
    assert info["latency"]["2"]["ms_per_clip"] > 0
