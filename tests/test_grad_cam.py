"""Grad-CAM: a hand-computed case, the targets (class, named part, pair similarity,
reference similarity), agreement with CAM on a GAP + BN + Linear head (Grad-CAM's
generalisation result), reidkit models, map overlap, overlays and grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from reidkit.config import load_config
from reidkit.methods import build_method
from reidkit.models import BNNeck, build_backbone
from reidkit.viz.cam import class_activation_map
from reidkit.viz.grad_cam import (
    class_logit,
    compute_grad_cam,
    grad_cam,
    map_overlap,
    map_overlap_matrix,
    pair_grad_cam,
    part_logit,
    resolve_layer,
    similarity_to,
)
from reidkit.viz.grid import image_grid, overlay_maps, save_image_grid, upsample_map

torch.set_num_threads(1)


class TinyNet(nn.Module):
    """``features``: a 1x1 conv with identity weights (so A = x), then a head with
    ``logit_0 = 2 mean(A_0) - mean(A_1)^2`` and ``logit_1 = mean(A_1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(2).view(2, 2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        m0, m1 = a[:, 0].mean(dim=(1, 2)), a[:, 1].mean(dim=(1, 2))
        return torch.stack([2 * m0 - m1**2, m1], dim=1)


def test_hand_computed_case() -> None:
    a0 = [[1.0, 2.0], [3.0, 4.0]]
    x = torch.tensor(
        [
            [a0, [[4.0, -1.0], [2.0, 3.0]]],  # mean(A_1) = 2
            [a0, [[0.0, -1.0], [2.0, 3.0]]],  # mean(A_1) = 1
        ]
    )
    net = TinyNet()
    res = compute_grad_cam(net, x, "features", class_logit(0))
    # image 0: alpha = (2/4, -2*2/4) = (0.5, -1); 0.5*A0 - A1 = [[-3.5, 2], [-0.5, -1]]
    # image 1: alpha = (0.5, -0.5); 0.5*(A0 - A1) = [[0.5, 1.5], [0.5, 0.5]]
    torch.testing.assert_close(res.weights, torch.tensor([[0.5, -1.0], [0.5, -0.5]]))
    torch.testing.assert_close(
        res.raw, torch.tensor([[[0.0, 2.0], [0.0, 0.0]], [[0.5, 1.5], [0.5, 0.5]]])
    )
    torch.testing.assert_close(
        res.maps, torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[1 / 3, 1.0], [1 / 3, 1 / 3]]])
    )
    torch.testing.assert_close(res.scores, torch.tensor([5.0 - 4.0, 5.0 - 1.0]))
    signed = compute_grad_cam(net, x, net.features, class_logit(0), relu=False)
    torch.testing.assert_close(signed.raw[0], torch.tensor([[-3.5, 2.0], [-0.5, -1.0]]))
    # class 1: alpha = (0, 1/4): the map is A_1 / 4, ReLU'd, / max
    torch.testing.assert_close(
        grad_cam(net, x, "features", class_logit([1, 1]))[1],
        torch.tensor([[0.0, 0.0], [2 / 3, 1.0]]),
    )
    # predicted class: image 0 predicts class 1 (2 > 1), image 1 class 0 (4 > 1)
    torch.testing.assert_close(
        compute_grad_cam(net, x, "features", class_logit()).scores, torch.tensor([2.0, 4.0])
    )
    assert net.features.weight.grad is None  # autograd.grad: no side effects


def test_layer_resolution_and_errors() -> None:
    net = TinyNet()
    assert resolve_layer(net, "features") is net.features
    with pytest.raises(ValueError, match="did you mean 'features'"):
        resolve_layer(net, "feature")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(net, nn.Conv2d(1, 1, 1))
    x = torch.randn(2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"per-image scores"):
        grad_cam(net, x, "features", lambda out: out)
    with pytest.raises(KeyError, match="no 'logits'"):
        grad_cam(net, x, "features", class_logit(), forward=lambda im: {"feat": net(im)})


class TwoPartNet(nn.Module):
    """A stripe part (max-pooled top half) and a channel-group part (channels 2..3), each
    with its own classifier, as SCR's parts; ``forward`` returns ``part_logits``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.fc_s1, self.fc_c1 = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> dict:
        f = self.body(x)
        stripe = f[:, :, : f.shape[2] // 2].amax(dim=(2, 3))
        group = f.amax(dim=(2, 3))[:, 2:]
        return {"part_logits": {"s1": self.fc_s1(stripe), "c1": self.fc_c1(group)}}


def test_part_logit_targets() -> None:
    net = TwoPartNet()
    x = torch.randn(3, 3, 6, 4, generator=torch.Generator().manual_seed(1))
    s1 = compute_grad_cam(net, x, "body.1", part_logit("s1", 2))
    c1 = compute_grad_cam(net, x, "body.1", part_logit("c1", 2))
    # each part is its own classifier: same result as exposing it as the only logits
    direct = compute_grad_cam(
        net, x, "body.1", class_logit(2), forward=lambda im: net(im)["part_logits"]["c1"]
    )
    torch.testing.assert_close(c1.maps, direct.maps)
    # the channel group's score only reaches channels 2 and 3
    assert torch.all(c1.weights[:, :2] == 0) and torch.any(c1.weights[:, 2:] != 0)
    assert not torch.allclose(s1.maps, c1.maps)
    assert s1.maps.shape == (3, 6, 4) and 0 <= float(s1.maps.min()) and float(s1.maps.max()) <= 1
    with pytest.raises(KeyError, match=r"no part 'p2_s1' \(parts: s1, c1\)"):
        grad_cam(net, x, "body.1", part_logit("p2_s1"))
    seq = compute_grad_cam(
        net,
        x,
        "body.1",
        part_logit(1, 2),
        forward=lambda im: {"part_logits": list(net(im)["part_logits"].values())},
    )
    torch.testing.assert_close(seq.maps, c1.maps)


def _tiny_bot(num_classes: int = 5) -> nn.Module:
    cfg = load_config(None, ["model.name=bot", "model.backbone=resnet18", "loss.metric=none"])
    torch.manual_seed(0)
    model = build_method(cfg, num_classes)
    model.backbone = build_backbone("resnet18", width=8)
    model.neck = BNNeck(model.backbone.out_channels, num_classes)
    # non-trivial BN statistics, so eval-mode BN is not the identity
    with torch.no_grad():
        model.train()
        for s in range(3):
            x = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(s))
            model({"images": x})
        model.neck.classifier.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    return model.eval()


def test_grad_cam_on_reidkit_baseline_generalises_cam() -> None:
    """For GAP -> BN1d -> Linear, the signed Grad-CAM of the last layer is CAM / (h w) up
    to a constant per image (Selvaraju et al., Sec. 3.1)."""
    model = _tiny_bot()
    images = torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([0, 3, 4])
    res = compute_grad_cam(
        model,
        images,
        "backbone.layer4",
        class_logit(target),
        forward=model.forward_train,
        relu=False,
    )
    cam = class_activation_map(model, images, target, upsample=False)  # (B, h, w)
    h, w = cam.shape[-2:]
    assert res.raw.shape == (3, h, w) == (3, 4, 2)
    offset = cam - h * w * res.raw
    torch.testing.assert_close(
        offset, offset.mean(dim=(1, 2), keepdim=True).expand_as(offset), rtol=1e-4, atol=1e-4
    )
    with torch.no_grad():
        logits = model.forward_train(images)["logits"]
    torch.testing.assert_close(res.scores, logits.gather(1, target[:, None]).squeeze(1))
    assert not model.training and all(p.grad is None for p in model.parameters())
    # any block by dotted name
    maps = grad_cam(model, images, "backbone.layer3.1", class_logit(), forward=model.forward_train)
    assert maps.shape == (3, 4, 2) and float(maps.amax(dim=(1, 2)).min()) == pytest.approx(1.0)


def _feat(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.encode({"images": x})["post_bn"]


def test_pair_similarity_matches_separate_pairs() -> None:
    model = _tiny_bot()
    g = torch.Generator().manual_seed(5)
    q, gal = torch.randn(3, 3, 64, 32, generator=g), torch.randn(3, 3, 64, 32, generator=g)
    q_maps, g_maps, sims = pair_grad_cam(model, q, gal, "backbone.layer4")
    with torch.no_grad():
        torch.testing.assert_close(sims, F.cosine_similarity(_feat(model, q), _feat(model, gal)))
    for i in range(3):  # each pair alone: same maps (eval-mode BN does not mix images)
        qi, gi, si = pair_grad_cam(model, q[i : i + 1], gal[i : i + 1], "backbone.layer4")
        torch.testing.assert_close(qi[0], q_maps[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gi[0], g_maps[i], rtol=1e-4, atol=1e-5)
    # explaining the gallery side against a fixed query feature gives the gallery maps
    with torch.no_grad():
        ref = _feat(model, q[:1])
    ref_maps = grad_cam(model, gal[:1], "backbone.layer4", similarity_to(ref[0]))
    torch.testing.assert_close(ref_maps[0], g_maps[0], rtol=1e-4, atol=1e-5)
    _, _, d = pair_grad_cam(model, q, gal, "backbone.layer4", metric="euclidean")
    with torch.no_grad():
        torch.testing.assert_close(d, -(_feat(model, q) - _feat(model, gal)).norm(dim=1))


def test_map_overlap_hand_case_and_matrix() -> None:
    a = torch.tensor([[[1.0, 0.9], [0.0, 0.1]]])  # top-2: cells 0, 1
    b = torch.tensor([[[0.8, 0.0], [0.9, 0.1]]])  # top-2: cells 0, 2
    assert map_overlap(a, b, k=2).tolist() == pytest.approx([1 / 3])
    assert map_overlap(a, a, k=0.5).tolist() == [1.0]
    m = map_overlap_matrix(torch.stack([a, b, 1 - a]), k=2)
    assert m.shape == (3, 3) and torch.allclose(m.diagonal(), torch.ones(3))
    assert m[0, 1] == pytest.approx(1 / 3) and m[0, 2] == 0.0 and torch.allclose(m, m.T)
    with pytest.raises(ValueError, match="same shape"):
        map_overlap(a, b[:, :1])


def test_overlay_and_grid(tmp_path: Path) -> None:
    up = upsample_map(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), (8, 6))
    assert up.shape == (8, 6) and up.dtype == np.float32 and 0 <= up.min() and up.max() <= 1
    images = torch.zeros(2, 3, 16, 8)
    overlays = overlay_maps(images, torch.rand(2, 4, 2), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert len(overlays) == 2 and overlays[0].shape == (16, 8, 3) and overlays[0].dtype == np.uint8
    assert overlays[0].std() > 0  # the heat shows
    grid = image_grid(
        [[overlays[0], overlays[1]], [overlays[1], None]],
        row_labels=["a", "bb"],
        col_labels=["x", "y"],
    )
    assert grid.size[0] > 2 * 8 and grid.size[1] > 2 * 16
    path = save_image_grid([overlays], tmp_path / "sub" / "grid.png", col_labels=["q", "g"])
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size[1] > 16
    with pytest.raises(ValueError, match="uint8"):
        image_grid([[np.zeros((4, 4, 3))]])
    with pytest.raises(ValueError, match=".png"):
        save_image_grid([overlays], tmp_path / "grid.txt")
