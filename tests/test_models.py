"""Backbones, weights loading, non-local, IBN, pooling and heads.

The reference network below is an independent re-implementation of torchvision's
published ResNet structure (``torchvision/models/resnet.py``: BasicBlock/Bottleneck,
v1.5 stride in conv2, ``downsample = Sequential(conv1x1, BN)``, ``fc`` at the end). It
shares no code with ``reidkit.models`` and is the ground truth for key names and outputs.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reidkit.models import (
    IBN,
    BNNeck,
    GeM,
    NonLocalBlock,
    PretrainedLoadError,
    available_backbones,
    build_backbone,
    build_pooling,
    load_pretrained,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------- reference (torchvision)
class RefBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefResNet(nn.Module):
    def __init__(self, block, layers, width=64, num_classes=1000):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make(block, width, layers[0], 1)
        self.layer2 = self._make(block, width * 2, layers[1], 2)
        self.layer3 = self._make(block, width * 4, layers[2], 2)
        self.layer4 = self._make(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make(self, block, planes, n, stride):
        ds = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            ds = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        blocks = [block(self.inplanes, planes, stride, ds)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    def feature_map(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


REF_SPECS = {
    18: (RefBasicBlock, [2, 2, 2, 2]),
    34: (RefBasicBlock, [3, 4, 6, 3]),
    50: (RefBottleneck, [3, 4, 6, 3]),
    101: (RefBottleneck, [3, 4, 23, 3]),
}


def randomize_bn_stats(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics/affines so eval outputs really test the weights."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_key_set_matches_torchvision_layout(depth):
    block, layers = REF_SPECS[depth]
    ref_keys = set(RefResNet(block, layers, width=8).state_dict())
    ours = build_backbone(f"resnet{depth}", width=8)
    ref_backbone_keys = {k for k in ref_keys if not k.startswith("fc.")}
    assert set(ours.state_dict()) == ref_backbone_keys
    assert ours.out_channels == 8 * 8 * block.expansion


def test_resnet50_matches_reference_with_loaded_weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    ref = RefResNet(RefBottleneck, [3, 4, 6, 3])
    randomize_bn_stats(ref, gen)
    ref.eval()
    path = tmp_path / "imagenet_resnet50.pth"
    torch.save(ref.state_dict(), path)

    ours = build_backbone("resnet50", last_stride=2, pretrained=None).eval()
    report = load_pretrained(ours, path)
    assert report.missing == []
    assert report.unexpected == ["fc.bias", "fc.weight"]
    assert report.loaded == len(ours.state_dict())

    x = torch.randn(2, 3, 64, 32, generator=gen)
    with torch.no_grad():
        expected = ref.feature_map(x)
        got = ours(x)
        stages = ours.forward_stages(x)
    assert got.shape == (2, 2048, 2, 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stages[-1], got)
    assert [s.shape[1] for s in stages] == [256, 512, 1024, 2048]

    # the `pretrained=` argument of build_backbone goes through the same loader
    ours2 = build_backbone("resnet50", last_stride=2, pretrained=path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours2(x), expected, rtol=1e-4, atol=1e-5)


def test_last_stride_one_gives_16x8_map():
    x = torch.randn(1, 3, 256, 128)
    model = build_backbone("resnet50", last_stride=1, width=8).eval()
    with torch.no_grad():
        stages = model.forward_stages(x)
    assert [tuple(s.shape[2:]) for s in stages] == [(64, 32), (32, 16), (16, 8), (16, 8)]
    ds = model.layer4[0].downsample[0]
    assert model.layer4[0].conv2.stride == (1, 1) and ds.stride == (1, 1)
    model2 = build_backbone("resnet50", last_stride=2, width=8).eval()
    with torch.no_grad():
        assert model2(x).shape[2:] == (8, 4)


def test_safetensors_round_trip_and_wrapped_checkpoints(tmp_path):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    src = build_backbone("resnet18", width=8)
    randomize_bn_stats(src, gen)
    src.eval()
    x = torch.randn(2, 3, 64, 32, generator=gen)
    with torch.no_grad():
        expected = src(x)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}

    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        tmp_path / "wrapped.pth",
    )
    torch.save({"model": state}, tmp_path / "model.pt")
    # a whole re-ID checkpoint: the backbone part is taken
    full = {**{f"backbone.{k}": v for k, v in state.items()}, "neck.bn.weight": torch.ones(4)}
    torch.save({"model": full, "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "run.pt")
    for name in ("w.safetensors", "wrapped.pth", "model.pt", "run.pt"):
        dst = build_backbone("resnet18", width=8)
        report = load_pretrained(dst, tmp_path / name)
        assert report.missing == [] and report.unexpected == [], name
        with torch.no_grad():
            torch.testing.assert_close(dst.eval()(x), expected, msg=name)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_weights_files_give_clear_errors(tmp_path, capsys):
    model = build_backbone("resnet18", width=8)
    with pytest.raises(PretrainedLoadError, match="not found"):
        load_pretrained(model, tmp_path / "nope.pth")

    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Evil()}, evil)
    with pytest.raises(PretrainedLoadError, match="weights_only"):
        load_pretrained(model, evil)

    raw_pickle = tmp_path / "raw.pth"
    raw_pickle.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(PretrainedLoadError):
        load_pretrained(model, raw_pickle)
    assert "this must never run" not in capsys.readouterr().out

    bad_suffix = tmp_path / "weights.npz"
    bad_suffix.write_bytes(b"123")
    with pytest.raises(PretrainedLoadError, match="unsupported weights format"):
        load_pretrained(model, bad_suffix)

    # shape mismatch: a width-16 file into a width-8 model names key and both shapes
    other = build_backbone("resnet18", width=16)
    mismatch = tmp_path / "wide.pth"
    torch.save(other.state_dict(), mismatch)
    with pytest.raises(PretrainedLoadError) as info:
        load_pretrained(model, mismatch)
    msg = str(info.value)
    assert "conv1.weight: file (16, 3, 7, 7) vs model (8, 3, 7, 7)" in msg

    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.bar": torch.zeros(2)}, unrelated)
    with pytest.raises(PretrainedLoadError, match="none of the 1 tensors"):
        load_pretrained(model, unrelated)


def test_unknown_backbone_suggests_name():
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        build_backbone("resnet05")
    assert {
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet50_ibn_a",
        "resnet101_ibn_a",
    } <= set(available_backbones())


def test_ibn_a_layout_and_numerics():
    model = build_backbone("resnet50_ibn_a", width=8)
    keys = set(model.state_dict())
    for layer, planes in (("layer1", 8), ("layer2", 16), ("layer3", 32)):
        assert f"{layer}.0.bn1.IN.weight" in keys and f"{layer}.0.bn1.BN.running_mean" in keys
        assert model.get_submodule(f"{layer}.0.bn1").IN.num_features == planes // 2
        assert model.get_submodule(f"{layer}.0.bn1").BN.num_features == planes - planes // 2
    assert isinstance(model.layer4[0].bn1, nn.BatchNorm2d)  # no IBN in layer4
    assert "layer1.0.bn1.weight" not in keys
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 256, 4, 2)
    assert build_backbone("resnet50", ibn=True, width=8).state_dict().keys() == keys

    # IBN = InstanceNorm on the first half, BatchNorm on the rest (train-mode stats)
    ibn = IBN(6)
    ibn.IN.weight.data.uniform_(0.5, 1.5)
    ibn.IN.bias.data.normal_()
    y = torch.randn(4, 6, 5, 3)
    out = ibn(y)
    a = y[:, :3]
    a_hat = (a - a.mean((2, 3), keepdim=True)) / torch.sqrt(
        a.var((2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    a_hat = a_hat * ibn.IN.weight.view(1, 3, 1, 1) + ibn.IN.bias.view(1, 3, 1, 1)
    b = y[:, 3:]
    b_hat = (b - b.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        b.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(out, torch.cat([a_hat, b_hat], 1), rtol=1e-4, atol=1e-5)


def naive_non_local(block: NonLocalBlock, x: torch.Tensor) -> torch.Tensor:
    """Loop over positions: y_i = sum_j (theta_i . phi_j / N) g_j; z = x + W(y)."""
    b, c, h, w = x.shape
    n = h * w
    g, th, ph = (m(x).reshape(b, -1, n) for m in (block.g, block.theta, block.phi))
    y = torch.zeros_like(g)
    for bi in range(b):
        for i in range(n):
            for j in range(n):
                y[bi, :, i] += (th[bi, :, i] @ ph[bi, :, j]) / n * g[bi, :, j]
    return x + block.W(y.reshape(b, -1, h, w))


@pytest.mark.parametrize("inner", [1, 3, None])
def test_non_local_block_matches_naive_formula(inner):
    torch.manual_seed(0)
    block = NonLocalBlock(6, inner).eval()
    x = torch.randn(2, 6, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x)  # identity at init (zero BN affine)
        block.W[1].weight.normal_()
        block.W[1].bias.normal_()
        torch.testing.assert_close(block(x), naive_non_local(block, x), rtol=1e-4, atol=1e-5)
    assert block.inner_channels == (3 if inner is None else inner)


def test_non_local_backbone_is_identity_at_init():
    layers = {"layer2": [2, 3], "layer3": [3, 4, 5]}
    plain = build_backbone("resnet50", width=8)
    randomize_bn_stats(plain, torch.Generator().manual_seed(2))
    nl = build_backbone("resnet50", width=8, non_local_layers=layers)
    missing, unexpected = nl.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith(("nl_layer2.", "nl_layer3.")) for k in missing)
    assert len(nl.nl_layer2) == 2 and len(nl.nl_layer3) == 3
    assert nl.non_local_layers == layers
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(nl.eval()(x), plain.eval()(x))
    # torchvision keys untouched; the NL blocks sit in their own lists
    assert set(plain.state_dict()) <= set(nl.state_dict())
    # ... and they are really applied: perturbing one changes the output
    with torch.no_grad():
        nl.nl_layer3[0].W[1].weight.fill_(1.0)
        assert not torch.allclose(nl(x), plain(x))
    with pytest.raises(ValueError, match="out of range"):
        build_backbone("resnet18", width=8, non_local_layers={"layer2": [2]})
    with pytest.raises(ValueError, match="unknown stage"):
        build_backbone("resnet18", width=8, non_local_layers={"layer5": [0]})


def test_gem_pooling():
    x = torch.rand(2, 3, 4, 5) + 0.1
    gem = GeM(p=3.0)
    expected = (x.pow(3).sum((2, 3)) / 20).pow(1 / 3)
    torch.testing.assert_close(gem(x), expected)
    torch.testing.assert_close(GeM(p=1.0)(x), x.mean((2, 3)))
    assert abs(GeM(p=80.0)(x) - x.amax((2, 3))).max() < 0.05  # large p -> max
    gem(x).sum().backward()
    assert gem.p.grad is not None and torch.isfinite(gem.p.grad).all()
    assert "p" not in dict(GeM(learnable=False).named_parameters())
    torch.testing.assert_close(build_pooling("avg")(x), x.mean((2, 3)))
    torch.testing.assert_close(build_pooling("max")(x), x.amax((2, 3)))
    assert isinstance(build_pooling("gem", p=4.0), GeM)
    with pytest.raises(ValueError, match="unknown pooling"):
        build_pooling("median")
    # negative activations are clamped at eps, not NaN
    assert torch.isfinite(gem(-x)).all()


def test_bnneck_and_ide_heads():
    torch.manual_seed(0)
    neck = BNNeck(64, 500)
    assert not neck.bn.bias.requires_grad and neck.bn.bias.abs().sum() == 0
    assert torch.all(neck.bn.weight == 1)
    assert neck.classifier.bias is None
    assert 0.0008 < neck.classifier.weight.std().item() < 0.0012
    feat = torch.randn(8, 64)
    bn_feat, logits = neck(feat)
    expected_bn = (feat - feat.mean(0)) / torch.sqrt(feat.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(bn_feat, expected_bn, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        logits, F.linear(expected_bn, neck.classifier.weight), rtol=1e-4, atol=1e-6
    )

    ide = BNNeck(64, 10, neck="none")
    bn_feat, logits = ide(feat)
    assert bn_feat is feat and ide.classifier.bias is not None
    torch.testing.assert_close(logits, feat @ ide.classifier.weight.t() + ide.classifier.bias)
    bn_feat, logits = BNNeck(64, 0)(feat)
    assert logits is None
    with pytest.raises(ValueError, match="unknown neck"):
        BNNeck(64, 10, neck="bn")


def test_no_pretrained_is_logged(caplog):
    with caplog.at_level("INFO", logger="reidkit.models"):
        build_backbone("resnet18", width=8, pretrained=None)
    assert "no ImageNet weights given (model.pretrained); training from scratch" in caplog.text
