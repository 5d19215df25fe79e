"""The TKP method: the heterogeneous triplet against the authors' per-anchor loop, the two
networks and the shared classifier, every loss term against an independent computation,
where gradients flow (detached video side), the ablations, encoding per input kind, and a
short training run evaluated in the four modes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reidkit.config import load_config
from reidkit.losses import cross_triplet_batch_hard, triplet_batch_hard
from reidkit.models import build_backbone
from reidkit.models.non_local import SpaceTimeNonLocalBlock

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- triplet
def naive_cross_triplet(a, ap, b, bp, margin) -> float:
    """The authors' HeterogeneousTripletLoss, anchor by anchor (positives include an
    identical row, as their mask does)."""
    losses = []
    for i in range(a.shape[0]):
        d = [math.sqrt(max(float(((a[i] - b[j]) ** 2).sum()), 1e-12)) for j in range(len(b))]
        pos = [d[j] for j in range(len(b)) if bp[j] == ap[i]]
        neg = [d[j] for j in range(len(b)) if bp[j] != ap[i]]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(losses) / len(losses) if losses else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_triplet_matches_the_authors_loop(seed) -> None:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(12, 6, generator=g, dtype=torch.float64)
    vid = torch.randn(3 * 2, 6, generator=g, dtype=torch.float64)
    img_pids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    vid_pids = torch.tensor([0, 0, 1, 1, 2, 2])
    for a, ap, b, bp in (
        (img, img_pids, vid, vid_pids),
        (vid, vid_pids, img, img_pids),
        (img, img_pids, img, img_pids),
        (vid, vid_pids, vid, vid_pids),
    ):
        got = cross_triplet_batch_hard(a, ap, b, bp, margin=0.3)
        assert got.item() == pytest.approx(naive_cross_triplet(a, ap, b, bp, 0.3), abs=1e-6)
    # with >= 2 rows per identity the homogeneous case is the standard batch-hard loss
    same = cross_triplet_batch_hard(img, img_pids, img, img_pids, 0.3)
    assert same.item() == pytest.approx(triplet_batch_hard(img, img_pids, 0.3).item(), abs=1e-6)


def test_cross_triplet_edge_cases() -> None:
    a = torch.randn(3, 4, requires_grad=True)
    # an anchor whose identity is absent from the targets is left out; none valid -> 0
    loss = cross_triplet_batch_hard(
        a, torch.tensor([5, 5, 5]), torch.randn(2, 4), torch.tensor([0, 1])
    )
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(a.grad).all()
    with pytest.raises(ValueError, match="feature dimension"):
        cross_triplet_batch_hard(
            torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 4), torch.tensor([0, 1])
        )


# ----------------------------------------------------------------------------- the method
@pytest.fixture
def tiny(monkeypatch):
    """Width-8 backbones (ResNet-50 keeps the real block counts for the non-local places)."""

    def small(model_cfg):
        return build_backbone(model_cfg.backbone, last_stride=model_cfg.last_stride, width=8)

    monkeypatch.setattr("reidkit.methods.tkp.backbone_from_config", small)


def _cfg(*over: str):
    return load_config(REPO / "configs/tkp/synth_video.yaml", ["model.pretrained=null", *over])


def _model(*over: str, backbone: str = "resnet18", classes: int = 3):
    from reidkit.methods.tkp import TKP

    torch.manual_seed(0)
    return TKP(_cfg(f"model.backbone={backbone}", *over), classes)


def _batch(n=6, t=4, pids=(0, 0, 1, 1, 2, 2)):
    g = torch.Generator().manual_seed(3)
    return {
        "clips": torch.randn(n, t, 3, 32, 16, generator=g),
        "clip_mask": torch.ones(n, t, dtype=torch.bool),
        "pids": torch.tensor(pids),
    }


def test_two_networks_and_one_shared_classifier(tiny) -> None:
    model = _model(
        "model.tkp.non_local_layers={layer2: [1, 3], layer3: [1, 3, 5]}",
        backbone="resnet50",
        classes=40,
    )
    nl_video = [m for m in model.video_net.modules() if isinstance(m, SpaceTimeNonLocalBlock)]
    nl_image = [m for m in model.image_net.modules() if isinstance(m, SpaceTimeNonLocalBlock)]
    assert len(nl_video) == 5 and not nl_image
    assert model.video_net.inserted_groups["stnl"] == {"layer2": [1, 3], "layer3": [1, 3, 5]}
    assert all(b.inner_channels == b.in_channels // 2 and b.sub_sample for b in nl_video)
    assert model.video_net is not model.image_net
    assert model.image_net.layer4[0].conv2.stride == (1, 1)  # last stride 1
    cls = model.classifier
    assert cls.bias is not None and float(cls.bias.detach().abs().max()) == 0.0
    assert 0.0007 < float(cls.weight.detach().std()) < 0.0013  # N(0, 0.001)
    # the same classifier scores video and image features
    out = model(_batch(pids=(0, 0, 1, 1, 2, 2)))
    assert torch.allclose(out["logits"], cls(out["video_feat"]))
    assert torch.allclose(out["image_logits"], cls(out["image_feats"]))


def test_loss_terms_match_independent_computations(tiny) -> None:
    model = _model("model.tkp.tkp_d_normalize=paper", "model.tkp.i2i_weight=0.5")
    batch = _batch()
    out = model(batch)
    terms = model.compute_loss(out, batch)
    assert set(terms) == {
        "ce_video", "ce_image", "triplet_i2v", "triplet_v2i", "triplet_i2i", "triplet_v2v",
        "tkp_f", "tkp_d",
    }  # fmt: skip
    n, t = 6, 4
    pids = batch["pids"]
    img = out["image_feats"].reshape(n * t, -1).detach().double()
    frm = out["frame_feats"].reshape(n * t, -1).detach().double()
    vid = out["video_feat"].detach().double()
    ipids = pids.repeat_interleave(t)
    assert torch.allclose(out["video_feat"], out["frame_feats"].mean(1), atol=1e-6)
    exp = {
        "ce_video": F.cross_entropy(out["logits"], pids).item(),
        "ce_image": F.cross_entropy(out["image_logits"].reshape(n * t, -1), ipids).item(),
        "triplet_i2v": naive_cross_triplet(img, ipids, vid, pids, 0.3),
        "triplet_v2i": naive_cross_triplet(vid, pids, img, ipids, 0.3),
        "triplet_i2i": 0.5 * naive_cross_triplet(img, ipids, img, ipids, 0.3),
        "triplet_v2v": naive_cross_triplet(vid, pids, vid, pids, 0.3),
        "tkp_f": ((img - frm) ** 2).sum(1).mean().item(),
        "tkp_d": ((torch.cdist(img, img) - torch.cdist(frm, frm)) ** 2).sum().item() / (n * t),
    }
    for k, v in exp.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-4, abs=1e-5), k
    code = _model("model.tkp.tkp_d_normalize=code")
    code_terms = code.compute_loss(code(batch), batch)
    assert code_terms["tkp_d"].item() == pytest.approx(terms["tkp_d"].item() / (n * t), rel=1e-4)


def test_padding_frames_are_not_training_images(tiny) -> None:
    model = _model()
    batch = _batch()
    batch["clip_mask"][0, 2:] = False  # clip 0 has two real frames
    out = model(batch)
    terms = model.compute_loss(out, batch)
    keep = batch["clip_mask"].reshape(-1)
    ipids = batch["pids"].repeat_interleave(4)[keep]
    logits = out["image_logits"].reshape(24, -1)[keep]
    assert terms["ce_image"].item() == pytest.approx(
        F.cross_entropy(logits, ipids).item(), rel=1e-5
    )
    assert torch.allclose(out["video_feat"][0], out["frame_feats"][0, :2].mean(0), atol=1e-6)


@pytest.mark.parametrize("propagate", [False, True])
def test_tkp_gradients_reach_the_video_network_only_when_asked(tiny, propagate) -> None:
    model = _model(f"model.tkp.propagate_to_video={str(propagate).lower()}")
    batch = _batch()
    terms = model.compute_loss(model(batch), batch)
    (terms["tkp_f"] + terms["tkp_d"]).backward()
    video = [p.grad for p in model.video_net.parameters() if p.requires_grad]
    image = [p.grad for p in model.image_net.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in image)
    reached = any(g is not None and g.abs().sum() > 0 for g in video)
    assert reached == propagate


def test_ablations_are_options(tiny) -> None:
    batch = _batch()
    joint = _model("model.tkp.tkp_f_weight=0", "model.tkp.tkp_d_weight=0")
    assert not {"tkp_f", "tkp_d"} & set(joint.compute_loss(joint(batch), batch))
    alone = _model("model.tkp.image_only=true")
    assert alone.video_net is None
    assert set(alone.compute_loss(alone(batch), batch)) == {"ce_image", "triplet_i2i"}
    # image network alone: a clip is the image network's frames
    alone.eval()
    with torch.no_grad():
        frames = alone.encode({"clips": batch["clips"]})["feat"]
        one = alone.encode({"images": batch["clips"][:, 1]})["feat"]
    assert frames.shape == (6, 4, alone.feat_dim)
    assert torch.allclose(frames[:, 1], one, atol=1e-5)


def test_encode_images_by_the_image_network_clips_by_the_video_network(tiny) -> None:
    model = _model().eval()
    clips = _batch()["clips"]
    with torch.no_grad():
        img = model.encode({"images": clips[:, 0]}, "query")["feat"]
        vid = model.encode({"clips": clips}, "gallery")["feat"]
        assert torch.allclose(img, model.pool(model.image_net(clips[:, 0])), atol=1e-6)
        assert torch.allclose(vid, model.video_frame_features(clips), atol=1e-6)
        assert not torch.allclose(vid[:, 0], img, atol=1e-3)  # two different networks


def test_tkp_trains_and_reports_the_four_modes(tmp_path, tiny, capsys) -> None:
    from reidkit.cli import main
    from reidkit.data.synth import generate_video
    from reidkit.engine import train

    generate_video(
        tmp_path / "synth-tiny-video",
        "tiny-video",
        seed=0,
        workers=1,
        height=64,
        width=32,
        progress=False,
    )
    out = tmp_path / "run"
    over = [
        f"data.root={tmp_path}", "data.synth_preset=tiny-video", "data.height=64",
        "data.width=32", "data.batch_size=8", "data.num_workers=0", "data.test_chunk_len=8",
        "solver.max_epochs=1", "solver.iters_per_epoch=2", f"output_dir={out}",
    ]  # fmt: skip
    train(_cfg(*over), progress=False)
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["mAP"] == final["i2v_mAP"]  # TKP's own mode first
    assert {f"{m}_mAP" for m in ("v2v", "i2v", "v2i", "i2i")} <= set(final)
    log = capsys.readouterr().out
    assert "tkp_f=" in log and "tkp_d=" in log and "triplet_i2v=" in log
    assert "final evaluation" in log and "| I2V" in log
    argv = [
        "eval",
        "-c",
        str(REPO / "configs/tkp/synth_video.yaml"),
        "model.pretrained=null",
        *over,
    ]
    res = tmp_path / "v2v.json"
    assert (
        main(
            [
                *argv,
                "--weights",
                str(out / "checkpoints/last.pt"),
                "--mode",
                "v2v",
                "--json",
                str(res),
            ]
        )
        == 0
    )
    assert json.loads(res.read_text())["mAP"] == pytest.approx(final["v2v_mAP"], abs=1e-6)
