"""Backbone zoo: key layouts against the published definitions, loading, hand-checked
numerics and the shared backbone interface.

The expected key/shape tables live in ``tests/data/published_layouts.py`` (written from the
published definitions). Big networks are only built on the ``meta`` device (no memory, no
forward); forward checks use tiny widths and 64x32 / 224x224 inputs. The reference
forwards below are functional re-statements of the published definitions on a state dict
(``F.conv2d`` etc.); they share no code with ``reidkit.models.backbones``.
"""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from data.published_layouts import (
    HEAD_PREFIXES,
    PUBLISHED_PARAMS,
    count_params,
    osnet_table,
    published_table,
    resnest_table,
    senet_table,
    vit_table,
)
from safetensors.torch import save_file
from torch import nn

from reidkit.models import (
    PretrainedLoadError,
    available_backbones,
    build_backbone,
    load_pretrained,
)
from reidkit.models.backbones import convert_pretrainedmodels_senet, create_backbone
from reidkit.models.backbones.osnet import ChannelGate
from reidkit.models.backbones.resattnet import AttentionModule
from reidkit.models.backbones.resnest import SplitAttention
from reidkit.models.backbones.senet import SEModule
from reidkit.models.backbones.vit import resize_pos_embed

torch.set_num_threads(1)

ISSUE_NAMES = [
    "resnest50",
    "resnest101",
    "resnest200",
    "resnest269",
    "se_resnet50",
    "se_resnet101",
    "se_resnext50_32x4d",
    "se_resnext101_32x4d",
    "resattnet56",
    "resattnet92",
    "osnet_x1_0",
    "osnet_x0_75",
    "osnet_x0_5",
    "osnet_x0_25",
    "osnet_ain_x1_0",
    "vit_base_patch16",
    "vit_small_patch16",
    "deit_small_patch16",
]
VIT_NAMES = ("vit_base_patch16", "vit_small_patch16", "deit_small_patch16")


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def without_head(table: dict) -> dict:
    return {k: v for k, v in table.items() if not k.startswith(HEAD_PREFIXES)}


def random_state(table: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors of a table's shapes; BN variances positive, counters zero."""
    out = {}
    for key, shape in table.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith(("bn.weight", "norm1.weight", "norm2.weight")) or ".bn" in key:
            out[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(shape, generator=gen) * 0.1
    return out


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights and BN statistics, so eval outputs really test the weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.2 if p.dim() > 1 else 0.1))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


# ------------------------------------------------------------------- functional helpers
def bn(x, sd, p, eps=1e-5):
    return F.batch_norm(
        x,
        sd[f"{p}.running_mean"],
        sd[f"{p}.running_var"],
        sd[f"{p}.weight"],
        sd[f"{p}.bias"],
        False,
        0.0,
        eps,
    )


def conv(x, sd, p, stride=1, padding=0, groups=1):
    return F.conv2d(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"), stride, padding, 1, groups)


def inorm(x, sd, p):
    return F.instance_norm(x, weight=sd[f"{p}.weight"], bias=sd[f"{p}.bias"], eps=1e-5)


# ============================================================================ registry
def test_every_issue_name_is_registered_and_resnets_still_work():
    names = set(available_backbones())
    assert set(ISSUE_NAMES) <= names
    assert {"resnet18", "resnet50", "resnet101", "resnet50_ibn_a"} <= names
    assert build_backbone("resnet18", width=8).out_channels == 64


def test_unknown_name_and_option_errors_are_clear():
    with pytest.raises(ValueError, match="did you mean 'resnest50'"):
        build_backbone("resnest5")
    with pytest.raises(ValueError, match=r"no option\(s\) \['stride'\].*width"):
        build_backbone("resnest50", stride=12)
    with pytest.raises(ValueError, match="IBN-a is only available on the ResNet"):
        build_backbone("osnet_x0_25", ibn=True)
    with pytest.raises(ValueError, match="non-local blocks are only available"):
        build_backbone("osnet_x0_25", non_local_layers={"conv3": [0]})
    with pytest.raises(ValueError, match="takes no options"):
        build_backbone("resnet18", stride=12)


# ============================================================================ layouts
@pytest.mark.parametrize("name", ISSUE_NAMES)
def test_state_dict_matches_published_table(name):
    """Every key exists with the same shape in the published layout, nothing extra, nothing
    missing (the classifier head aside). Built on the meta device: no memory, no forward."""
    with torch.device("meta"):
        model = build_backbone(name, last_stride=2)
    ours = shapes(model.state_dict())
    expected = without_head(published_table(name))
    if name in VIT_NAMES:
        # the only deliberate difference: pos_embed is stored for the 16x8 re-ID grid
        assert ours.pop("pos_embed") == (1, 1 + 16 * 8, expected.pop("pos_embed")[-1])
    assert sorted(set(ours) - set(expected)) == []  # nothing extra
    assert sorted(set(expected) - set(ours)) == []  # nothing missing
    assert ours == expected


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_tables_have_the_published_parameter_counts(name):
    millions, tol = PUBLISHED_PARAMS[name]
    assert abs(count_params(published_table(name)) / 1e6 - millions) <= tol


def test_osnet_table_counts_follow_torchreid_zoo_without_imagenet_classifier():
    # torchreid's zoo counts the test-time layers (trunk + 512-d fc); with an ImageNet
    # classifier osnet_x1_0 has 2.7M
    assert abs(count_params(osnet_table("osnet_x1_0", num_classes=1000)) / 1e6 - 2.7) < 0.05


# ============================================================================ loading
def _save(tmp_path, state, name="w.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize("name", ["osnet_x0_25", "osnet_ain_x1_0"])
def test_torchreid_file_loads_without_missing_keys_and_classifier_is_ignored(
    name, tmp_path, caplog
):
    table = osnet_table(name, num_classes=1000)  # an ImageNet file: fc + classifier
    state = random_state(table, torch.Generator().manual_seed(0))
    model = build_backbone(name)
    with caplog.at_level(logging.INFO, logger="reidkit.models"):
        report = load_pretrained(model, _save(tmp_path, state))
    assert report.missing == []
    assert sorted(report.unexpected) == sorted(
        k for k in table if k.startswith(("fc.", "classifier."))
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    own = model.state_dict()
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_resnest_file_loads_without_missing_keys(tmp_path):
    table = resnest_table("resnest50", width=8)
    state = random_state(table, torch.Generator().manual_seed(1))
    model = build_backbone("resnest50", width=8)
    report = load_pretrained(model, _save(tmp_path, state))
    assert report.missing == [] and report.unexpected == ["fc.bias", "fc.weight"]


def test_wrong_shapes_are_still_reported(tmp_path):
    state = random_state(osnet_table("osnet_x0_5"), torch.Generator().manual_seed(0))
    with pytest.raises(PretrainedLoadError, match="wrong shape"):
        load_pretrained(build_backbone("osnet_x0_25"), _save(tmp_path, state))


@pytest.mark.parametrize("name", ["se_resnet50", "se_resnext101_32x4d"])
def test_pretrainedmodels_converter_maps_every_key(name):
    cadene = senet_table(name, layout="pretrainedmodels")
    timm = senet_table(name, layout="timm")
    fake = {k: torch.empty(0) for k in cadene}
    converted = convert_pretrainedmodels_senet(fake)
    assert len(converted) == len(cadene)  # no two keys collapse
    assert set(converted) == set(timm)  # every key lands on a timm key
    mapping = dict(zip(fake, converted))
    assert all(cadene[k] == timm[mapping[k]] for k in cadene)


def test_converter_refuses_senet154_stem():
    with pytest.raises(ValueError, match="SENet-154"):
        convert_pretrainedmodels_senet({"layer0.conv2.weight": torch.empty(1)})


# ============================================================================ SE-Nets
def test_se_gate_is_sigmoid_fc2_relu_fc1_gap():
    gen = torch.Generator().manual_seed(0)
    se = randomize(SEModule(32, reduction=16))
    x = torch.randn(2, 32, 5, 3, generator=gen)
    gap = x.mean(dim=(2, 3))  # (B, C)
    w1, b1 = se.fc1.weight[:, :, 0, 0], se.fc1.bias
    w2, b2 = se.fc2.weight[:, :, 0, 0], se.fc2.bias
    gate = torch.sigmoid(torch.relu(gap @ w1.T + b1) @ w2.T + b2)  # (B, C)
    torch.testing.assert_close(se(x), x * gate[:, :, None, None])


def _ref_senet(x, sd, layers, groups, caffe, last_stride):
    """Functional SE-ResNet/ResNeXt (timm or Caffe-style pretrainedmodels definition)."""
    x = F.relu(bn(conv(x, sd, "conv1", 2, 3), sd, "bn1"))
    x = F.max_pool2d(x, 3, 2, ceil_mode=True) if caffe else F.max_pool2d(x, 3, 2, 1)
    for i, n in enumerate(layers):
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            s = (1, 2, 2, last_stride)[i] if b == 0 else 1
            s1, s2 = (s, 1) if caffe and groups == 1 else (1, s)
            out = F.relu(bn(conv(x, sd, f"{p}.conv1", s1), sd, f"{p}.bn1"))
            out = F.relu(bn(conv(out, sd, f"{p}.conv2", s2, 1, groups), sd, f"{p}.bn2"))
            out = bn(conv(out, sd, f"{p}.conv3"), sd, f"{p}.bn3")
            g = out.mean(dim=(2, 3), keepdim=True)
            g = conv(F.relu(conv(g, sd, f"{p}.se.fc1")), sd, f"{p}.se.fc2")
            out = out * torch.sigmoid(g)
            sc = x
            if f"{p}.downsample.0.weight" in sd:
                sc = bn(conv(x, sd, f"{p}.downsample.0", s), sd, f"{p}.downsample.1")
            x = F.relu(out + sc)
    return x


@pytest.mark.parametrize("name,caffe", [("se_resnet50", False), ("se_resnet50", True)])
def test_senet_matches_functional_definition_and_cadene_file_switches_to_caffe_style(
    name, caffe, tmp_path, caplog
):
    layout = "pretrainedmodels" if caffe else "timm"
    state = random_state(senet_table(name, layout, width=16), torch.Generator().manual_seed(2))
    model = build_backbone(name, width=16, last_stride=2)
    with caplog.at_level(logging.INFO):
        report = load_pretrained(model, _save(tmp_path, state))
    assert report.missing == []
    assert model.caffe_style is caffe
    assert ("Caffe-style" in caplog.text) is caffe
    model.eval()
    x = torch.randn(2, 3, 67, 45)  # odd sizes: ceil-mode vs padded max-pool differ
    timm_sd = convert_pretrainedmodels_senet(state) if caffe else state
    ref = _ref_senet(x, timm_sd, (3, 4, 6, 3), 1, caffe, 2)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_explicit_caffe_style_is_kept_when_loading(tmp_path):
    state = random_state(
        senet_table("se_resnet50", "pretrainedmodels", width=16), torch.Generator()
    )
    model = build_backbone("se_resnet50", width=16, caffe_style=False)
    load_pretrained(model, _save(tmp_path, state))
    assert model.caffe_style is False
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)


def test_se_resnext_grouped_forward_matches_functional_definition():
    model = randomize(SE_RESNEXT_TINY())
    sd = model.state_dict()
    x = torch.randn(1, 3, 64, 32)
    ref = _ref_senet(x, sd, (1, 1, 1, 1), 4, False, 1)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def SE_RESNEXT_TINY():
    from reidkit.models.backbones.senet import SENet

    return SENet((1, 1, 1, 1), cardinality=4, base_width=8, width=16, last_stride=1)


# ============================================================================ ResNeSt
def test_split_attention_radix2_matches_naive_loops():
    torch.manual_seed(0)
    sa = randomize(SplitAttention(8, 8, radix=2, groups=2))
    x = torch.randn(2, 8, 5, 4)
    out = sa(x)
    u = F.relu(sa.bn0(sa.conv(x)))  # (B, R*C, H, W), split r = channels r*C..(r+1)*C
    c, r, k = 8, 2, 2
    expected = torch.zeros_like(out)
    for b in range(2):
        s = sum(u[b, i * c : (i + 1) * c] for i in range(r)).mean(dim=(1, 2))  # (C,)
        z = F.relu(sa.bn1(sa.fc1(s[None, :, None, None])))
        logits = sa.fc2(z)[0, :, 0, 0]  # (R*C), ordered (group, radix, channel in group)
        for ch in range(c):
            g, j = divmod(ch, c // k)
            idx = [g * r * (c // k) + i * (c // k) + j for i in range(r)]
            w = torch.softmax(logits[idx], dim=0)
            expected[b, ch] = sum(w[i] * u[b, i * c + ch] for i in range(r))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def _ref_resnest(x, sd, layers, last_stride):
    """Functional ResNeSt (published definition: deep stem, SplAtConv2d radix 2, avd,
    avg-down)."""
    x = F.relu(bn(conv(x, sd, "conv1.0", 2, 1), sd, "conv1.1"))
    x = F.relu(bn(conv(x, sd, "conv1.3", 1, 1), sd, "conv1.4"))
    x = F.relu(bn(conv(x, sd, "conv1.6", 1, 1), sd, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for i, n in enumerate(layers):
        for b in range(n):
            p = f"layer{i + 1}.{b}"
            stride = (1, 2, 2, last_stride)[i] if b == 0 else 1
            avd = b == 0 and (stride > 1 or i > 0)  # is_first for layers 2-4
            out = F.relu(bn(conv(x, sd, f"{p}.conv1"), sd, f"{p}.bn1"))
            u = F.relu(bn(conv(out, sd, f"{p}.conv2.conv", 1, 1, 2), sd, f"{p}.conv2.bn0"))
            c = u.shape[1] // 2
            splits = torch.split(u, c, dim=1)
            gap = sum(splits).mean(dim=(2, 3), keepdim=True)
            z = F.relu(bn(conv(gap, sd, f"{p}.conv2.fc1"), sd, f"{p}.conv2.bn1"))
            att = conv(z, sd, f"{p}.conv2.fc2").view(x.shape[0], 1, 2, -1).transpose(1, 2)
            att = torch.softmax(att, dim=1).reshape(x.shape[0], -1, 1, 1)
            out = sum(a * s for a, s in zip(torch.split(att, c, dim=1), splits))
            if avd:
                out = F.avg_pool2d(out, 3, stride, 1)
            out = bn(conv(out, sd, f"{p}.conv3"), sd, f"{p}.bn3")
            sc = x
            if f"{p}.downsample.1.weight" in sd:
                if stride > 1:
                    sc = F.avg_pool2d(sc, stride, stride, ceil_mode=True, count_include_pad=False)
                sc = bn(conv(sc, sd, f"{p}.downsample.1"), sd, f"{p}.downsample.2")
            x = F.relu(out + sc)
    return x


@pytest.mark.parametrize("last_stride", [1, 2])
def test_resnest_matches_functional_definition(last_stride):
    from reidkit.models.backbones.resnest import ResNeSt

    model = randomize(ResNeSt((1, 2, 1, 1), stem_width=8, width=8, last_stride=last_stride))
    x = torch.randn(2, 3, 64, 32)
    ref = _ref_resnest(x, model.state_dict(), (1, 2, 1, 1), last_stride)
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


# ============================================================================ OSNet
def _ref_osnet(x, sd, ain):
    """Functional torchreid OSNet / OSNet-AIN ``featuremaps``."""

    def cbr(x, p, act=True, norm="bn", **kw):
        y = conv(x, sd, f"{p}.conv", **kw)
        y = inorm(y, sd, f"{p}.bn") if norm == "in" else bn(y, sd, f"{p}.bn")
        return F.relu(y) if act else y

    def lite(x, p):
        y = conv(x, sd, f"{p}.conv1")
        y = conv(y, sd, f"{p}.conv2", padding=1, groups=y.shape[1])
        return F.relu(bn(y, sd, f"{p}.bn"))

    def block(x, p):
        x1 = cbr(x, f"{p}.conv1")
        streams = []
        for t in range(4):
            y = x1
            for j in range(t + 1):
                name = (
                    f"{p}.conv2.{t}.layers.{j}"
                    if ain
                    else (f"{p}.conv2a" if t == 0 else f"{p}.conv2{'abcd'[t]}.{j}")
                )
                y = lite(y, name)
            streams.append(y)
        x2 = 0
        for y in streams:
            g = y.mean(dim=(2, 3), keepdim=True)
            g = conv(F.relu(conv(g, sd, f"{p}.gate.fc1")), sd, f"{p}.gate.fc2")
            x2 = x2 + y * torch.sigmoid(g)
        if f"{p}.IN.weight" in sd:
            x3 = inorm(conv(x2, sd, f"{p}.conv3.conv"), sd, f"{p}.IN")
        else:
            x3 = cbr(x2, f"{p}.conv3", act=False)
        sc = cbr(x, f"{p}.downsample", act=False) if f"{p}.downsample.conv.weight" in sd else x
        return F.relu(x3 + sc)

    x = cbr(x, "conv1", norm="in" if ain else "bn", stride=2, padding=3)
    x = F.max_pool2d(x, 3, 2, 1)
    for s in (2, 3, 4):
        for b in range(2):
            x = block(x, f"conv{s}.{b}")
        if s < 4:
            x = F.avg_pool2d(cbr(x, f"pool{s}.0" if ain else f"conv{s}.2.0"), 2, 2)
    return cbr(x, "conv5")


@pytest.mark.parametrize("name", ["osnet_x0_25", "osnet_ain_x1_0"])
def test_osnet_matches_functional_definition(name):
    model = randomize(build_backbone(name))
    with torch.no_grad():
        for m in model.modules():  # non-trivial affine InstanceNorm parameters
            if isinstance(m, nn.InstanceNorm2d):
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 32)
    ref = _ref_osnet(x, model.state_dict(), name.startswith("osnet_ain"))
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_osnet_channel_gate_formula():
    gate = randomize(ChannelGate(32))
    x = torch.randn(2, 32, 4, 3)
    s = x.mean(dim=(2, 3))
    g = torch.sigmoid(
        torch.relu(s @ gate.fc1.weight[:, :, 0, 0].T + gate.fc1.bias)
        @ gate.fc2.weight[:, :, 0, 0].T
        + gate.fc2.bias
    )
    torch.testing.assert_close(gate(x), x * g[:, :, None, None])


# ============================================================================ RAN
def test_attention_module_is_one_plus_mask_times_trunk():
    mod = randomize(AttentionModule(16, depth=3))
    x = torch.randn(2, 16, 32, 16)
    out, mask = mod(x, return_mask=True)
    with torch.no_grad():
        pre = mod.pre(x)
        trunk = mod.trunk(pre)
        expected = mod.post((1 + mod.soft_mask(pre, trunk)) * trunk)
    torch.testing.assert_close(out, expected)
    assert mask.shape == trunk.shape and 0 < mask.min() and mask.max() < 1
    # with a zero mask logit (last conv zeroed) M = 1/2: out = post(1.5 * T)
    with torch.no_grad():
        mod.mask_out[-1].weight.zero_()
        torch.testing.assert_close(mod(x), mod.post(1.5 * trunk))


def test_attention_module_mask_path_matches_the_published_wiring():
    """Depth-2 mask (stage 2): pool, unit, pool, 2 units, up to level 1 + skip, unit, up."""
    mod = randomize(AttentionModule(8, depth=2))
    x = torch.randn(1, 8, 16, 8)

    def up(m, ref):
        return F.interpolate(m, size=ref.shape[-2:], mode="bilinear", align_corners=True)

    with torch.no_grad():
        pre = mod.pre(x)
        trunk = mod.trunk(pre)
        d1 = mod.mask_down[0](F.max_pool2d(pre, 3, 2, ceil_mode=True))
        d2 = mod.mask_down[1](F.max_pool2d(d1, 3, 2, ceil_mode=True))
        u1 = mod.mask_up[0](up(d2, d1) + mod.mask_skip[0](d1))
        mask = torch.sigmoid(mod.mask_out(up(u1, trunk)))
        torch.testing.assert_close(mod.soft_mask(pre, trunk), mask)
    assert len(mod.mask_down[1]) == 2 and len(mod.mask_down[0]) == 1


def test_resattnet92_uses_tanh_for_later_modules_of_a_stage():
    with torch.device("meta"):
        model = build_backbone("resattnet92")
    gates = {
        f"{s}.{i}": b.gate
        for s in ("layer1", "layer2", "layer3")
        for i, b in enumerate(getattr(model, s))
        if isinstance(b, AttentionModule)
    }
    assert gates == {
        "layer1.1": "sigmoid",
        "layer2.1": "sigmoid",
        "layer2.2": "tanh",
        "layer3.1": "sigmoid",
        "layer3.2": "tanh",
        "layer3.3": "tanh",
    }


def test_resattnet_masks_are_exposed():
    model = randomize(build_backbone("resattnet56", width=4))
    masks = model.attention_masks(torch.randn(1, 3, 64, 32))
    assert {k: tuple(v.shape[1:]) for k, v in masks.items()} == {
        "layer1.1": (16, 16, 8),
        "layer2.1": (32, 8, 4),
        "layer3.1": (64, 4, 2),
    }


# ============================================================================ ViT
def test_pos_embed_interpolation_keeps_values_for_equal_grids_and_the_cls_entry():
    pe = torch.randn(1, 1 + 6 * 3, 8)
    for mode in ("bicubic", "bilinear"):
        torch.testing.assert_close(resize_pos_embed(pe, (6, 3), (6, 3), mode=mode), pe)
    out = resize_pos_embed(torch.randn(1, 1 + 14 * 14, 8), (16, 8))
    assert out.shape == (1, 1 + 128, 8)
    pe2 = torch.randn(1, 197, 8)
    torch.testing.assert_close(resize_pos_embed(pe2, (21, 10))[:, 0], pe2[:, 0])
    # a grid that is constant along each axis stays constant after bilinear resizing
    ramp = torch.arange(4.0).repeat_interleave(4).view(1, 16, 1).expand(1, 16, 2)
    pe3 = torch.cat([torch.zeros(1, 1, 2), ramp], dim=1)
    res = resize_pos_embed(pe3, (4, 7), mode="bilinear")[:, 1:].view(4, 7, 2)
    assert torch.allclose(res, res[:, :1].expand(4, 7, 2))


def _ref_vit(x, sd, depth, heads, patch_stride):
    """Functional timm ViT: patch embed, CLS + pos, pre-norm blocks, final norm."""
    dim = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], patch_stride)
    gh, gw = t.shape[-2:]
    t = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t.flatten(2).transpose(1, 2)], 1)
    t = t + sd["pos_embed"]
    d = dim // heads
    for i in range(depth):
        p = f"blocks.{i}"
        h = F.layer_norm(t, (dim,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"])
        q, k, v = qkv.split(dim, dim=-1)
        outs = []
        for hd in range(heads):  # one head at a time, softmax(q k^T / sqrt(d)) v
            sl = slice(hd * d, (hd + 1) * d)
            a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
            outs.append(a @ v[..., sl])
        t = t + F.linear(
            torch.cat(outs, -1), sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"]
        )
        h = F.layer_norm(t, (dim,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], 1e-6)
        h = F.linear(
            F.gelu(F.linear(h, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
            sd[f"{p}.mlp.fc2.weight"],
            sd[f"{p}.mlp.fc2.bias"],
        )
        t = t + h
    t = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return t[:, 0], t[:, 1:].transpose(1, 2).reshape(x.shape[0], dim, gh, gw)


def tiny_vit(**kw):
    return create_backbone(
        "vit_small_patch16", embed_dim=32, depth=4, num_heads=2, img_size=(64, 32), **kw
    ).eval()


@pytest.mark.parametrize("stride", [16, 12])
def test_vit_matches_functional_definition_and_timm_file_loads(stride, tmp_path, caplog):
    # a timm file for a 224x224 model: pos_embed of a 14x14 grid, a 1000-way head
    state = random_state(vit_table(32, 4, grid=(14, 14)), torch.Generator().manual_seed(3))
    model = tiny_vit(stride=stride)
    with caplog.at_level(logging.INFO):
        report = load_pretrained(model, _save(tmp_path, state))
    assert report.missing == [] and report.unexpected == ["head.bias", "head.weight"]
    assert "pos_embed resized from 197" in caplog.text
    grid = ((64 - 16) // stride + 1, (32 - 16) // stride + 1)
    sd = dict(state)
    sd["pos_embed"] = resize_pos_embed(state["pos_embed"], grid)
    torch.testing.assert_close(model.state_dict()["pos_embed"], sd["pos_embed"])
    x = torch.randn(2, 3, 64, 32)
    cls, fmap = _ref_vit(x, sd, 4, 2, stride)
    with torch.no_grad():
        ours_cls, ours_map = model.forward_tokens(x)
        torch.testing.assert_close(ours_cls, cls, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours_map, fmap, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x), fmap, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.forward_cls(x), cls, rtol=1e-4, atol=1e-4)
    assert fmap.shape[-2:] == grid


def test_vit_state_dict_stays_in_timm_layout_through_stage_edits():
    model = tiny_vit()
    keys = set(model.state_dict())
    assert keys == set(without_head(vit_table(32, 4, grid=(4, 2))))
    assert not any(k.startswith("layer") for k in keys)
    # named parameters follow the stages (what freeze hooks and optimisers see)
    assert any(n.startswith("layer4.0.attn") for n, _ in model.named_parameters())
    # round trip, also nested under a method's "backbone." prefix
    holder = nn.Module()
    holder.backbone = model
    sd = holder.state_dict()
    assert "backbone.blocks.3.mlp.fc2.weight" in sd
    fresh = nn.Module()
    fresh.backbone = tiny_vit()
    fresh.load_state_dict(sd)  # strict
    for a, b in zip(fresh.backbone.parameters(), model.parameters()):
        assert torch.equal(a, b)
    # a block inserted into a stage keeps the original blocks' timm names
    model.layer2 = nn.Sequential(model.layer2[0], nn.Identity())
    assert "blocks.1.norm1.weight" in model.state_dict()
    copy.deepcopy(model.layer4)  # a stage can be copied into branches


def test_vit_other_input_size_interpolates_pos_embed_on_the_fly():
    model = tiny_vit()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 48)).shape == (1, 32, 6, 3)


# ============================================================================ interface
def tiny(name):
    if name in VIT_NAMES:
        return tiny_vit()
    widths = {"resnest": 8, "se_": 16, "resattnet": 4}
    opts = {}
    for prefix, width in widths.items():
        if name.startswith(prefix):
            opts["width"] = width
    return randomize(build_backbone(name, **opts))


INTERFACE_NAMES = [
    "resnest50",
    "se_resnet50",
    "se_resnext50_32x4d",
    "resattnet56",
    "osnet_x0_25",
    "osnet_ain_x1_0",
    "vit_small_patch16",
]


@pytest.mark.parametrize("name", INTERFACE_NAMES)
def test_stage_interface(name):
    model = tiny(name)
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        stages = model.forward_stages(x)
        final = model(x)
        chained = model.stem(x)
        for stage in model.stage_names:
            chained = model.run_stage(stage, chained)
    assert len(model.stage_names) == 4 and len(model.stage_channels) == 4
    assert all(isinstance(getattr(model, s), nn.Sequential) for s in model.stage_names)
    assert [s.shape[1] for s in stages] == list(model.stage_channels)
    assert model.out_channels == model.stage_channels[-1] == final.shape[1]
    torch.testing.assert_close(stages[-1], final)
    if name in VIT_NAMES:
        chained = model.tokens_to_map(chained)
    torch.testing.assert_close(chained, final)
    # a block inserted after block 0 of a stage runs (insertion helpers rely on this)
    s0 = model.stage_names[1]
    stage = getattr(model, s0)
    setattr(model, s0, nn.Sequential(stage[0], nn.Identity(), *list(stage)[1:]))
    with torch.no_grad():
        torch.testing.assert_close(model(x), final)


@pytest.mark.parametrize(
    "name,ls1,ls2",
    [
        ("resnest50", (16, 8), (8, 4)),
        ("se_resnext50_32x4d", (16, 8), (8, 4)),
        ("resattnet56", (16, 8), (8, 4)),
        ("osnet_x0_25", (16, 8), (16, 8)),  # OSNet: conv5 at stride 16 either way
    ],
)
def test_last_stride_output_sizes(name, ls1, ls2):
    opts = {} if name.startswith("osnet") else {"width": 4 if name.startswith("resatt") else 16}
    x = torch.randn(1, 3, 256, 128)
    with torch.no_grad():
        assert build_backbone(name, last_stride=1, **opts).eval()(x).shape[-2:] == ls1
        assert build_backbone(name, last_stride=2, **opts).eval()(x).shape[-2:] == ls2


@pytest.mark.parametrize(
    "name,expected",
    [
        ("resnest50", (7, 7)),
        ("se_resnet50", (7, 7)),
        ("resattnet56", (7, 7)),
        ("osnet_x0_25", (14, 14)),
    ],
)
def test_last_stride_2_gives_the_imagenet_final_map_at_224(name, expected):
    """ImageNet networks at 224x224: 7x7 before global pooling (timm's ``pool_size`` /
    the Caffe ``ave_pool`` kernel 7); OSNet's conv5 map is 14x14 (stride 16)."""
    opts = {} if name.startswith("osnet") else {"width": 4 if name.startswith("resatt") else 16}
    with torch.no_grad():
        out = build_backbone(name, last_stride=2, **opts).eval()(torch.randn(1, 3, 224, 224))
    assert out.shape[-2:] == expected


def test_resnest_avd_placement_follows_the_published_code():
    with torch.device("meta"):
        m1 = build_backbone("resnest50", last_stride=1)
        m2 = build_backbone("resnest50", last_stride=2)
    assert m1.layer1[0].avd_layer is None and m1.layer2[1].avd_layer is None
    assert m2.layer2[0].avd_layer.stride == 2
    # layer4's first block is "is_first": a stride-1 3x3 average pool with last_stride=1
    assert m1.layer4[0].avd_layer.stride == 1 and m2.layer4[0].avd_layer.stride == 2


def test_files_without_bn_counters_load_without_warnings(tmp_path, caplog):
    """Many published files predate BatchNorm's ``num_batches_tracked``: not a missing weight."""
    table = osnet_table("osnet_x0_25")
    state = random_state(table, torch.Generator().manual_seed(0))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    with caplog.at_level(logging.INFO, logger="reidkit.models"):
        report = load_pretrained(build_backbone("osnet_x0_25"), _save(tmp_path, state))
    assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "step counters" in caplog.text


def test_vit_file_with_a_non_square_grid_is_a_clear_error(tmp_path):
    state = random_state(vit_table(32, 4, grid=(14, 14)), torch.Generator().manual_seed(0))
    state["pos_embed"] = state["pos_embed"][:, :-3]
    with pytest.raises(PretrainedLoadError, match="not a square grid"):
        load_pretrained(tiny_vit(), _save(tmp_path, state))
