"""Activation maps: RAM (Eq. 10) and its grid-mean identity, CAMs of single-head and
multi-branch models (GAP(CAM) = logit), and the branch-overlap measure."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reidkit.config import load_config
from reidkit.methods.cama import CAMA
from reidkit.models import build_backbone
from reidkit.viz.cam import apply_bn_per_location, class_activation_map
from reidkit.viz.overlap import branch_overlap, branch_overlap_matrix, pairwise_mask_iou, topk_masks
from reidkit.viz.ram import aggregate_ranking_activation_map, feature_maps, ranking_activation_map

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- RAM
def test_ram_matches_naive_cells_and_grid_mean_identity() -> None:
    g = torch.Generator().manual_seed(0)
    f_q = torch.randn(6, generator=g, dtype=torch.float64)
    F_g = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)
    ram = ranking_activation_map(f_q, F_g)
    f_g = F_g.mean(dim=(1, 2))
    for y, x in itertools.product(range(4), range(3)):
        want = float(f_q @ F_g[:, y, x]) / float(f_g.norm())
        assert ram[y, x].item() == pytest.approx(want)
    # the paper's identity (Eq. 10): mean over the grid = <f_q, f_g> / ||f_g||
    assert ram.mean().item() == pytest.approx(float(f_q @ f_g) / float(f_g.norm()))


def test_ram_batched_over_galleries_and_branches() -> None:
    g = torch.Generator().manual_seed(1)
    f_q = torch.randn(3, 8, generator=g, dtype=torch.float64)  # N=3 branches
    F_g = torch.randn(3, 5, 8, 4, 2, generator=g, dtype=torch.float64)  # N, G, d, h, w
    per_branch = ranking_activation_map(f_q, F_g)
    assert per_branch.shape == (3, 5, 4, 2)
    for i, j in itertools.product(range(3), range(5)):
        torch.testing.assert_close(per_branch[i, j], ranking_activation_map(f_q[i], F_g[i, j]))
    batched = ranking_activation_map(f_q[0], F_g[0])
    torch.testing.assert_close(batched, per_branch[0])
    # grid means are <f_q, f_g> / ||f_g|| for every (branch, gallery)
    f_g = F_g.mean(dim=(-2, -1))
    want = torch.einsum("nd,ngd->ng", f_q, f_g) / f_g.norm(dim=-1)
    torch.testing.assert_close(per_branch.mean(dim=(-2, -1)), want)
    # query-normalised maps average to the cosine similarity
    cos = ranking_activation_map(f_q, F_g, normalize_query=True).mean(dim=(-2, -1))
    torch.testing.assert_close(cos, F.cosine_similarity(f_q[:, None], f_g, dim=-1))


def test_ram_shape_errors() -> None:
    with pytest.raises(ValueError, match="ranking_activation_map"):
        ranking_activation_map(torch.randn(4), torch.randn(5, 3, 3))
    with pytest.raises(ValueError, match="ranking_activation_map"):
        ranking_activation_map(torch.randn(2, 4), torch.randn(3, 1, 4, 3, 3))


def tiny_cama(*overrides: str) -> CAMA:
    cfg = load_config(None, ["model.name=cama", "loss.metric=none", *overrides])
    torch.manual_seed(0)
    return CAMA(cfg, 6, backbone=build_backbone("resnet18", width=8)).eval()


def test_aggregate_ram_mean_is_cama_cosine() -> None:
    """Grid mean of the aggregate RAM == cosine similarity of CAMA's test features."""
    model = tiny_cama()
    images = torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = model.encode({"images": images})["post_bn"]  # (3, N*d), normalised branches
        maps = feature_maps(model, images)  # (N, 3, d, h, w)
    agg = aggregate_ranking_activation_map(maps[:, 0].mean(dim=(-2, -1)), maps[:, 1:])
    cos = F.cosine_similarity(feats[:1], feats[1:], dim=-1)
    torch.testing.assert_close(agg.mean(dim=(-2, -1)), cos, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- CAM
class FakeBaseline(nn.Module):
    """Backbone -> GAP -> BN1d -> Linear, shaped like reidkit's BNNeck baselines."""

    def __init__(self, classes: int = 4, bias: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.neck = nn.Module()
        self.neck.bn = nn.BatchNorm1d(8)
        self.neck.classifier = nn.Linear(8, classes, bias=bias)
        with torch.no_grad():  # non-trivial eval statistics
            self.neck.bn.running_mean.uniform_(-0.5, 0.5)
            self.neck.bn.running_var.uniform_(0.5, 2.0)
            self.neck.bn.weight.uniform_(0.5, 1.5)
            self.neck.bn.bias.uniform_(-0.2, 0.2)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck.classifier(self.neck.bn(self.backbone(images).mean(dim=(-2, -1))))


@pytest.mark.parametrize("bias", [False, True])
def test_cam_of_single_head_model_averages_to_logits(bias: bool) -> None:
    torch.manual_seed(0)
    model = FakeBaseline(bias=bias).eval()
    images = torch.randn(3, 3, 32, 16)
    target = torch.tensor([0, 2, 3])
    with torch.no_grad():
        logits = model.logits(images)
    grid = class_activation_map(model, images, target, upsample=False)
    assert grid.shape == (3, 8, 4)
    torch.testing.assert_close(
        grid.mean(dim=(-2, -1)), logits[torch.arange(3), target], rtol=1e-4, atol=1e-5
    )
    up = class_activation_map(model, images, 1)
    assert up.shape == (3, 32, 16)
    # target=None picks the predicted class
    pred = class_activation_map(model, images, None, upsample=False)
    torch.testing.assert_close(
        pred.mean(dim=(-2, -1)), logits.max(dim=1).values, rtol=1e-4, atol=1e-5
    )


def test_cam_restores_training_mode() -> None:
    model = FakeBaseline().train()
    class_activation_map(model, torch.randn(2, 3, 16, 8), 0)
    assert model.training


def test_bn_per_location_commutes_with_gap() -> None:
    bn = FakeBaseline().neck.bn.eval()
    maps = torch.randn(2, 8, 5, 3)
    torch.testing.assert_close(
        apply_bn_per_location(bn, maps).mean(dim=(-2, -1)), bn(maps.mean(dim=(-2, -1)))
    )


def test_cam_of_cama_per_branch() -> None:
    model = tiny_cama()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        maps = model.forward_maps(images)
    logits = maps["cams"].mean(dim=(-2, -1))  # (N, B, C)
    cams = class_activation_map(
        model, images, torch.tensor([1, 4]), per_branch=True, upsample=False
    )
    assert cams.shape == (3, 2, 4, 2)
    torch.testing.assert_close(
        cams.mean(dim=(-2, -1)), logits[:, [0, 1], [1, 4]], rtol=1e-4, atol=1e-6
    )
    mean = class_activation_map(model, images, torch.tensor([1, 4]))
    assert mean.shape == (2, 64, 32)
    pred = class_activation_map(model, images, None, upsample=False)
    torch.testing.assert_close(
        pred.mean(dim=(-2, -1)), logits.mean(0).max(dim=1).values, rtol=1e-4, atol=1e-6
    )


def test_real_baseline_if_available() -> None:
    """The ``ide_bn`` baseline of reidkit.methods: GAP of its CAM equals the logits of its
    own head, ``neck(pool(backbone(x)))`` (BNNeck returns ``(bn_feat, logits)``)."""
    from reidkit.methods import available_methods, build_method

    if "ide_bn" not in available_methods():
        pytest.skip("ide_bn baseline not registered")
    cfg = load_config(None, ["model.name=ide_bn", "model.backbone=resnet18", "loss.metric=none"])
    torch.manual_seed(0)
    model = build_method(cfg, 5)
    images = torch.randn(4, 3, 64, 32)
    model.train()
    model({"images": images})  # one BN update so the running statistics are not the identity
    model.eval()
    with torch.no_grad():
        _, logits = model.neck(model.pool(model.backbone(images)).flatten(1))
    target = torch.tensor([0, 1, 2, 3])
    grid = class_activation_map(model, images, target, upsample=False)
    torch.testing.assert_close(
        grid.mean(dim=(-2, -1)), logits[torch.arange(4), target], rtol=1e-4, atol=1e-5
    )


# ------------------------------------------------------------------------- overlap
def test_topk_masks_and_iou_hand_worked() -> None:
    maps = torch.tensor([[[[5.0, 4.0, 0.0, 0.0]]], [[[0.0, 4.0, 5.0, 0.0]]]])  # (N=2, B=1, 1, 4)
    masks = topk_masks(maps, 2)
    assert masks.tolist() == [[[True, True, False, False]], [[False, True, True, False]]]
    iou = pairwise_mask_iou(masks)
    assert iou[0, 1, 0].item() == pytest.approx(1 / 3)  # {0,1} vs {1,2}
    assert iou[0, 0, 0].item() == 1.0
    assert topk_masks(torch.randn(3, 2, 16, 8), 0.2).sum(-1).eq(26).all()


class FakeMultiBranch(nn.Module):
    """forward_maps returns given per-branch CAMs of 2 classes (class 1 always wins)."""

    num_branches = 3

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.maps = maps  # (N, num_images, h, w)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward_maps(self, images: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
        idx = images[:, 0, 0, 0].long()  # images carry their index
        m = self.maps[:, idx]
        cams = torch.stack([m - 100.0, m], dim=2)  # (N, B, 2, h, w)
        if targets is None:
            return {"cams": cams}
        return {"target_cams": cams[:, torch.arange(len(idx)), targets]}


def test_branch_overlap_against_set_iou() -> None:
    g = torch.Generator().manual_seed(5)
    n, num, h, w, k = 3, 10, 4, 4, 5
    maps = torch.randn(n, num, h, w, generator=g)
    loader = [
        {
            "images": torch.arange(s, s + 4).float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2),
            "pids": torch.zeros(4),
        }
        for s in (0, 4)
    ] + [
        {
            "images": torch.tensor([8.0, 9.0]).view(-1, 1, 1, 1).expand(-1, 3, 2, 2),
            "pids": torch.zeros(2),
        }
    ]
    model = FakeMultiBranch(maps)
    want_pairs = []
    for i, j in itertools.combinations(range(n), 2):
        ious = []
        for s in range(num):
            a = set(maps[i, s].flatten().topk(k).indices.tolist())
            b = set(maps[j, s].flatten().topk(k).indices.tolist())
            ious.append(len(a & b) / len(a | b))
        want_pairs.append(sum(ious) / num)
    assert branch_overlap(model, loader, k) == pytest.approx(sum(want_pairs) / len(want_pairs))
    mat = branch_overlap_matrix(model, loader, k)
    assert mat.shape == (3, 3) and torch.allclose(mat.diagonal(), torch.ones(3))
    assert branch_overlap(model, loader, k, max_batches=1) != pytest.approx(
        branch_overlap(model, loader, k)
    )


def test_branch_overlap_extremes_on_cama() -> None:
    model = tiny_cama("model.cama.oap_k=0.25")
    loader = [{"images": torch.randn(3, 3, 64, 32), "pids": torch.tensor([0, 1, 2])}]
    with torch.no_grad():  # identical classifiers on identical branches: same CAMs
        for cls in model.classifiers[1:]:
            cls.weight.copy_(model.classifiers[0].weight)
    for maps in ("predicted", "label", "ram"):
        assert branch_overlap(model, loader, maps=maps) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 branches"):
        branch_overlap(tiny_cama("model.cama.num_branches=1"), loader)


def test_format_branch_overlap() -> None:
    from reidkit.viz.overlap import format_branch_overlap

    mat = torch.tensor([[1.0, 0.4, 0.45], [0.4, 1.0, 0.2], [0.45, 0.2, 1.0]])
    line = format_branch_overlap(mat, k=0.2)
    assert (
        line
        == "branch overlap (top-k CAM IoU, k=0.2): mean 0.350 | 1-2 0.400, 1-3 0.450, 2-3 0.200"
    )
