"""IANet: IA blocks where the paper puts them (through Backbone.insert_blocks), location
prior widths per stage and their scaling with the input size, the BN head, the loss
(CE + smoothing, cosine batch-hard triplet on the post-BN feature) against an
independent computation, identity at init, and the ablation configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import reidkit.methods.baseline as baseline_mod
from reidkit.config import ConfigError, load_config
from reidkit.methods import build_method
from reidkit.methods.ianet import IANet, IANetOptions, ianet_sigmas
from reidkit.models import build_backbone
from reidkit.models.interaction import IABlock

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def tiny_backbone(monkeypatch):
    def tiny(model_cfg):
        return build_backbone("resnet18", last_stride=model_cfg.last_stride, width=8)

    monkeypatch.setattr(baseline_mod, "backbone_from_config", tiny)


def make(*overrides: str, num_classes: int = 5) -> IANet:
    cfg = load_config(None, ["model.name=ianet", "data.height=64", "data.width=32", *overrides])
    torch.manual_seed(0)
    model = build_method(cfg, num_classes)
    assert isinstance(model, IANet)
    return model


@pytest.fixture(scope="module")
def batch() -> dict:
    g = torch.Generator().manual_seed(2)
    return {"images": torch.randn(8, 3, 64, 32, generator=g), "pids": torch.arange(4).repeat(2)}


def test_blocks_after_the_last_block_of_layer2_and_layer3() -> None:
    model = make()
    assert list(model.ia_blocks()) == ["backbone.ia_layer2.0", "backbone.ia_layer3.0"]
    # resnet18: 2 blocks per stage, the IA block runs after block index 1
    assert model.backbone.inserted_groups["ia"] == {"layer2": [1], "layer3": [1]}
    b2, b3 = model.ia_blocks().values()
    assert isinstance(b2, IABlock) and b2.parts == "ia"
    assert b2.spatial.channels == 16 and b3.spatial.channels == 32  # width 8: 16, 32 channels
    # 64x32 input = a quarter of 256x128 in each direction: the widths scale with it
    assert (b2.spatial.ax, b2.spatial.ay) == (2.5, 5.0)
    assert (b3.spatial.ax, b3.spatial.ay) == (1.25, 2.5)
    # torchvision keys are untouched (a pretrained file still loads)
    keys = set(model.state_dict())
    assert (
        "backbone.layer2.1.conv1.weight" in keys
        and "backbone.ia_layer2.0.spatial.bn.weight" in keys
    )


def test_sigma_scaling_rule() -> None:
    opts = IANetOptions()
    assert ianet_sigmas(opts, 256, 128) == {"layer2": (10.0, 20.0), "layer3": (5.0, 10.0)}
    assert ianet_sigmas(opts, 128, 64) == {"layer2": (5.0, 10.0), "layer3": (2.5, 5.0)}
    assert ianet_sigmas(opts, 384, 192) == {"layer2": (15.0, 30.0), "layer3": (7.5, 15.0)}
    fixed = IANetOptions(scale_sigmas=False)
    assert ianet_sigmas(fixed, 128, 64) == {"layer2": (10.0, 20.0), "layer3": (5.0, 10.0)}
    custom = IANetOptions(stages=["layer1", "layer3"], sigmas={"layer1": (20, 40)})
    assert ianet_sigmas(custom, 256, 128) == {"layer1": (20.0, 40.0), "layer3": (5.0, 10.0)}
    with pytest.raises(ValueError, match="no location-prior widths for layer1"):
        ianet_sigmas(IANetOptions(stages=["layer1"]), 256, 128)
    with pytest.raises(ValueError, match="must be > 0"):
        ianet_sigmas(IANetOptions(stages=["layer2"], sigmas={"layer2": (0, 1)}), 256, 128)


def test_options_validation() -> None:
    with pytest.raises(ConfigError, match="kernel"):
        load_config(None, ["model.name=ianet", "model.ianet.kernel=2"])
    with pytest.raises(ConfigError, match="repeat"):
        load_config(None, ["model.name=ianet", "model.ianet.stages=[layer2, layer2]"])
    with pytest.raises(ConfigError, match="parts"):
        load_config(None, ["model.name=ianet", "model.ianet.parts=both"])
    model = make("model.ianet.kernel=3")
    assert all(b.spatial.kernel == 3 for b in model.ia_blocks().values())


@pytest.mark.parametrize(
    "name,stages,parts",
    [
        ("baseline", [], "ia"),
        ("cia3", ["layer3"], "cia"),
        ("sia3", ["layer3"], "sia"),
        ("ia3", ["layer3"], "ia"),
        ("ia2", ["layer2"], "ia"),
        ("", ["layer2", "layer3"], "ia"),
    ],
)
def test_ablation_configs(name: str, stages: list[str], parts: str) -> None:
    for ds in ("market1501", "dukemtmc"):
        path = REPO / "configs/ianet" / (f"{ds}_{name}.yaml" if name else f"{ds}.yaml")
        cfg = load_config(path, ["model.pretrained=null"])
        assert cfg.model.ianet.stages == stages and cfg.model.ianet.parts == parts
        assert (cfg.solver.lr, cfg.solver.max_epochs, cfg.solver.milestones) == (
            3.5e-4,
            60,
            [20, 40],
        )
        assert (cfg.data.batch_size, cfg.data.num_instances, cfg.data.pad) == (64, 4, 0)
        assert cfg.loss.triplet_distance == "cosine" and cfg.loss.triplet_feature == "post_bn"
    model = make(f"model.ianet.stages={stages}", f"model.ianet.parts={parts}")
    blocks = model.ia_blocks()
    assert [k.split("_")[1].split(".")[0] for k in blocks] == stages
    for block in blocks.values():
        assert (block.spatial is not None) == (parts in ("ia", "sia"))
        assert (block.channel is not None) == (parts in ("ia", "cia"))


def test_head_has_trainable_bn_bias_and_classifier_bias() -> None:
    model = make()
    assert model.neck.bn.bias.requires_grad
    assert model.neck.classifier.bias is not None
    cfg = load_config(None, ["model.name=ianet"])
    assert cfg.loss.triplet_distance == "cosine" and cfg.loss.triplet_feature == "post_bn"
    assert cfg.loss.label_smoothing == 0.1 and cfg.loss.triplet_margin == 0.3
    assert cfg.test.feature == "post_bn" and cfg.test.metric == "cosine"


def naive_cosine_batch_hard(feats: torch.Tensor, pids: torch.Tensor, margin: float) -> float:
    total, n = 0.0, len(pids)
    for a in range(n):

        def d(i: int, j: int) -> float:
            return 1.0 - float(F.cosine_similarity(feats[i], feats[j], dim=0))

        pos = [d(a, p) for p in range(n) if p != a and pids[p] == pids[a]]
        neg = [d(a, q) for q in range(n) if pids[q] != pids[a]]
        total += max(0.0, max(pos) - min(neg) + margin)
    return total / n


def test_loss_against_independent_computation(batch) -> None:
    model = make()
    out = model(batch)
    terms = model.compute_loss(out, batch)
    pids = batch["pids"]
    logits = out["logits"].detach().double()
    # label-smoothed CE, eps = 0.1, written out
    logp = torch.log_softmax(logits, dim=1)
    c = logits.shape[1]
    target = torch.full_like(logp, 0.1 / c)
    target[torch.arange(len(pids)), pids] += 0.9
    ce = float(-(target * logp).sum(dim=1).mean())
    tri = naive_cosine_batch_hard(out["bn_feat"].detach().double(), pids, 0.3)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert terms["triplet"].item() == pytest.approx(tri, rel=1e-5)
    assert not math.isclose(
        tri, naive_cosine_batch_hard(out["global_feat"].detach().double(), pids, 0.3)
    )


def test_blocks_are_the_identity_at_init(batch) -> None:
    model = make().eval()
    base = make("model.ianet.stages=[]").eval()
    base.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(batch)["post_bn"], base.encode(batch)["post_bn"])
        # after training-like changes the blocks act
        for block in model.ia_blocks().values():
            block.spatial.bn.weight.fill_(1.0)
        assert not torch.allclose(model.encode(batch)["post_bn"], base.encode(batch)["post_bn"])


def test_default_cam_layer_and_relation_maps(batch) -> None:
    from reidkit.viz.relation import relation_maps

    model = make()
    assert model.default_cam_layer() == "backbone.layer4"
    maps, cells = relation_maps(model, batch["images"][:2], module="backbone.ia_layer2.0")
    assert maps.shape == (2, 5, 8, 4)  # 64x32 input: layer2 map 8x4, 5 default positions
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(2, 5))
