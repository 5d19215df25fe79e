"""IDE / IDE+BN / BoT / AGW: presets, forward contract, losses, parameter groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reidkit.config import load_config
from reidkit.losses import triplet_batch_hard, weighted_regularized_triplet
from reidkit.methods import available_methods, build_method
from reidkit.methods.baseline import Baseline
from reidkit.models import GeM, NonLocalBlock
from reidkit.models.pooling import GlobalAvgPool

torch.set_num_threads(1)

SMALL = ["model.backbone=resnet18"]
# resnet18 has 2 blocks per stage: AGW's ResNet-50 positions do not exist there
AGW_SMALL = [*SMALL, "model.non_local_layers={layer2: [1], layer3: [0, 1]}"]
NUM_CLASSES = 4


def make(name: str, *overrides: str) -> Baseline:
    extra = AGW_SMALL if name == "agw" else SMALL
    cfg = load_config(None, [f"model.name={name}", *extra, *overrides])
    return build_method(cfg, NUM_CLASSES)


def toy_batch(seed: int = 0, h: int = 32, w: int = 16):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, h, w, generator=g)
    pids = torch.arange(NUM_CLASSES).repeat_interleave(2)
    return images, pids


def test_registered_names():
    assert {"ide", "ide_bn", "bot", "agw"} <= set(available_methods())


def test_presets_are_applied_at_load_time_and_fill_only_unset_fields():
    cfg = load_config(None, ["model.name=ide"])
    assert (cfg.model.neck, cfg.loss.metric, cfg.loss.label_smoothing) == ("none", "none", 0.0)

    cfg = load_config(None, ["model.name=agw"])
    assert (cfg.model.non_local, cfg.model.pooling, cfg.loss.metric) == (True, "gem", "wrt")

    # explicit values win: the "AGW without GeM" ablation
    cfg = load_config(None, ["model.name=agw", "model.pooling=avg"])
    assert cfg.model.pooling == "avg" and cfg.loss.metric == "wrt"

    # building a model never changes the config
    cfg = load_config(None, ["model.name=agw", *AGW_SMALL])
    before = cfg.model_dump()
    build_method(cfg, NUM_CLASSES)
    assert cfg.model_dump() == before

    assert load_config(None, ["model.name=bot"]).model_dump() == load_config(None).model_dump()


@pytest.mark.parametrize("name", ["ide", "ide_bn", "bot", "agw"])
def test_forward_shapes_train_and_eval(name):
    model = make(name)
    images, _ = toy_batch()
    model.train()
    out = model({"images": images})
    assert set(out) == {"feat_map", "global_feat", "bn_feat", "logits"}
    assert out["feat_map"].shape == (8, 512, 2, 1)  # last stride 1: 32x16 / 16
    assert out["global_feat"].shape == (8, 512) and out["bn_feat"].shape == (8, 512)
    assert out["logits"].shape == (8, NUM_CLASSES)
    cls = model.neck.classifier
    torch.testing.assert_close(out["logits"], F.linear(out["bn_feat"], cls.weight, cls.bias))

    model.eval()
    with torch.no_grad():
        feats = model.encode({"images": images}, "query")
        gallery = model.encode({"images": images}, "gallery")
    assert set(feats) == {"pre_bn", "post_bn"} and feats["post_bn"].shape == (8, 512)
    torch.testing.assert_close(feats["post_bn"], model.forward_features(images)["post_bn"])
    torch.testing.assert_close(feats["pre_bn"], gallery["pre_bn"])
    if name == "ide":
        torch.testing.assert_close(feats["post_bn"], feats["pre_bn"])  # no BN in IDE
        assert cls.bias is not None
    else:
        assert cls.bias is None and not model.neck.bn.bias.requires_grad
        bn = model.neck.bn
        expected = (
            (feats["pre_bn"] - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
        )
        torch.testing.assert_close(feats["post_bn"], expected, rtol=1e-4, atol=1e-5)


def test_test_feature_must_be_offered_by_the_method():
    from reidkit.config import ConfigError

    assert load_config(None, ["model.name=bot", "test.feature=pre_bn"]).test.feature == "pre_bn"
    with pytest.raises(ConfigError, match="not a feature of method 'bot'.*post_bn, pre_bn"):
        load_config(None, ["model.name=bot", "test.feature=bn_feat"])


def test_loss_terms_per_method():
    images, pids = toy_batch()
    terms = {}
    for name in ("ide", "ide_bn", "bot", "agw"):
        model = make(name).train()
        out = model({"images": images})
        losses = model.compute_loss(out, {"pids": pids})
        terms[name] = set(losses)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
        if name == "bot":
            expected = triplet_batch_hard(out["global_feat"], pids, 0.3)
            torch.testing.assert_close(losses["triplet"], expected)
        if name == "agw":
            torch.testing.assert_close(
                losses["wrt"], weighted_regularized_triplet(out["global_feat"], pids)
            )
        if name == "ide":  # plain CE, no smoothing
            torch.testing.assert_close(losses["ce"], F.cross_entropy(out["logits"], pids))
    assert terms == {
        "ide": {"ce"},
        "ide_bn": {"ce"},
        "bot": {"ce", "triplet"},
        "agw": {"ce", "wrt"},
    }


def test_agw_has_non_local_blocks_and_gem():
    model = make("agw")
    assert isinstance(model.pool, GeM)
    blocks = [m for m in model.backbone.modules() if isinstance(m, NonLocalBlock)]
    assert len(blocks) == 3 and blocks[0].inner_channels == 1
    assert model.loss.metric_key == "wrt"
    assert isinstance(make("bot").pool, GlobalAvgPool)
    # the ResNet-50 positions {2,3}/{3,4,5} do not exist in resnet18: clear error
    cfg = load_config(None, ["model.name=agw", *SMALL])
    with pytest.raises(ValueError, match="model.non_local_layers"):
        build_method(cfg, NUM_CLASSES)


def test_center_and_extra_losses_and_parameter_groups():
    model = make("bot", "loss.center_weight=0.0005", "loss.extra=sphere", "loss.extra_weight=0.5")
    images, pids = toy_batch()
    out = model.train()({"images": images})
    losses = model.compute_loss(out, {"pids": pids})
    assert set(losses) == {"ce", "triplet", "center", "sphere"}
    raw_center = model.loss.center_criterion(out["global_feat"], pids)
    torch.testing.assert_close(losses["center"], 0.0005 * raw_center)
    # center loss is BoT's second optimiser: SGD at loss.center_lr, grads x 1 / weight
    specs = model.optimizers(model.cfg)
    assert set(specs) == {"main", "center"}
    centers = specs["center"].params()
    assert len(centers) == 1 and centers[0] is model.loss.center_criterion.centers
    assert centers[0].shape == (NUM_CLASSES, 512)
    assert specs["center"].grad_scale == pytest.approx(1 / 0.0005)
    assert isinstance(specs["center"].optimizer, torch.optim.SGD)
    assert specs["center"].optimizer.param_groups[0]["lr"] == model.cfg.loss.center_lr
    assert not {id(p) for p in centers} & {id(p) for p in specs["main"].params()}
    cls_ids = {id(p) for p in model.classifier_parameters()}
    assert id(model.neck.classifier.weight) in cls_ids and id(model.neck.bn.weight) in cls_ids
    assert id(model.loss.extra_criterion.weight) in cls_ids
    assert id(model.neck.bn.bias) not in cls_ids  # frozen
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not cls_ids & backbone_ids

    # an extra loss with the same name as the metric loss gets a distinct key
    model = make("bot", "loss.metric=circle", "loss.extra=circle")
    out = model.train()({"images": images})
    assert set(model.compute_loss(out, {"pids": pids})) == {"ce", "circle", "extra_circle"}


@pytest.mark.parametrize("name", ["ide", "ide_bn", "bot", "agw"])
def test_losses_decrease_on_toy_batch(name):
    torch.manual_seed(0)
    model = make(name).train()
    images, pids = toy_batch(seed=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    totals = []
    for _ in range(6):
        losses = model.compute_loss(model({"images": images}), {"pids": pids})
        total = sum(losses.values())
        assert torch.isfinite(total)
        totals.append(total.item())
        opt.zero_grad()
        total.backward()
        opt.step()
    assert totals[-1] < totals[0], totals


def test_inference_only_model():
    model = make("bot")
    cfg = model.cfg
    infer = Baseline(cfg, 0).eval()
    assert infer.neck.classifier is None
    images, pids = toy_batch()
    with torch.no_grad():
        assert infer.encode({"images": images})["post_bn"].shape == (8, 512)
    infer.train()
    with pytest.raises(RuntimeError, match="num_classes=0"):
        infer.compute_loss(infer({"images": images}), {"pids": pids})
