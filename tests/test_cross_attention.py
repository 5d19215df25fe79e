"""CAN's cross-attention module and ResNet-12, against naive per-position computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reidkit.models.backbones.resnet12 import ResNet12, resnet12
from reidkit.models.cross_attention import (
    CrossAttention,
    MetaFusion,
    correlation_all_pairs,
    correlation_map,
)


def _naive_correlation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    b, c, h, w = p.shape
    pf, qf = p.reshape(b, c, h * w), q.reshape(b, c, h * w)
    out = torch.zeros(b, h * w, h * w, dtype=torch.float64)
    for n in range(b):
        for i in range(h * w):
            for j in range(h * w):
                a, v = pf[n, :, i].double(), qf[n, :, j].double()
                out[n, i, j] = (a @ v) / (a.norm() * v.norm())
    return out


def _naive_fusion(fusion: MetaFusion, g: torch.Tensor) -> torch.Tensor:
    """w = W2 relu(BN(W1 g + b1)) + b2 for one pooled vector g (eval-mode BN)."""
    w1 = fusion.reduce.weight[:, :, 0, 0].double()
    w2 = fusion.expand.weight[:, :, 0, 0].double()
    bn = fusion.bn
    hidden = w1 @ g + fusion.reduce.bias.double()
    hidden = (hidden - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
    hidden = torch.relu(hidden * bn.weight.double() + bn.bias.double())
    return w2 @ hidden + fusion.expand.bias.double()


def _naive_pair(module: CrossAttention, p: torch.Tensor, q: torch.Tensor):
    """Per-position CAN for one pair of (C, h, w) maps, with explicit loops."""
    c, h, w = p.shape
    hw = h * w
    r = _naive_correlation(p[None], q[None])[0]  # (hw, hw)

    def attend(rr: torch.Tensor) -> torch.Tensor:  # attention over rr's row positions
        g = torch.stack([sum(rr[i, j] for i in range(hw)) / hw for j in range(hw)])
        kernel = _naive_fusion(module.fusion, g)
        score = torch.stack([sum(kernel[j] * rr[i, j] for j in range(hw)) / hw for i in range(hw)])
        e = torch.exp((score - score.max()) / module.temperature)
        return e / e.sum() + 1.0

    ap, aq = attend(r), attend(r.T)
    pf, qf = p.reshape(c, hw).double(), q.reshape(c, hw).double()
    p_feat = sum(ap[i] * pf[:, i] for i in range(hw)) / hw
    q_feat = sum(aq[j] * qf[:, j] for j in range(hw)) / hw
    return ap.view(h, w), aq.view(h, w), p_feat, q_feat


def _randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def test_correlation_map_matches_naive_cosines_on_non_square_maps():
    gen = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 5, 3, 2, generator=gen), torch.randn(2, 5, 3, 2, generator=gen)
    r = correlation_map(p, q)
    assert r.shape == (2, 6, 6)
    torch.testing.assert_close(r.double(), _naive_correlation(p, q), atol=1e-6, rtol=0)
    # rows are p's positions in row-major order: R[b, y*w + x, j] uses p[b, :, y, x]
    torch.testing.assert_close(
        r[1, 2 * 2 + 1, 4], torch.cosine_similarity(p[1, :, 2, 1], q[1, :, 2, 0], dim=0)
    )
    with pytest.raises(ValueError, match="same shape"):
        correlation_map(p, q[:, :, :2])


def test_correlation_all_pairs_equals_pairwise_maps():
    gen = torch.Generator().manual_seed(1)
    protos = torch.randn(2, 3, 4, 2, 3, generator=gen)  # (b, N, C, h, w)
    queries = torch.randn(2, 5, 4, 2, 3, generator=gen)  # (b, M, C, h, w)
    r = correlation_all_pairs(protos, queries)
    assert r.shape == (2, 5, 3, 6, 6)
    for b in range(2):
        for m in range(5):
            for n in range(3):
                ref = correlation_map(protos[b, n][None], queries[b, m][None])[0]
                torch.testing.assert_close(r[b, m, n], ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("hw", [(2, 3), (3, 3)])
def test_cross_attention_matches_naive_per_position_computation(hw):
    h, w = hw
    gen = torch.Generator().manual_seed(2)
    module = CrossAttention(h * w, reduction=2, temperature=0.025).eval()
    _randomise_bn(module, gen)
    p, q = torch.randn(3, 4, h, w, generator=gen), torch.randn(3, 4, h, w, generator=gen)
    with torch.no_grad():
        out = module(p, q)
    assert out.p_attention.shape == out.q_attention.shape == (3, h, w)
    assert out.p_features.shape == out.q_features.shape == (3, 4)
    for b in range(3):
        ap, aq, pf, qf = _naive_pair(module, p[b], q[b])
        torch.testing.assert_close(out.p_attention[b].double(), ap, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.q_attention[b].double(), aq, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.p_features[b].double(), pf, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.q_features[b].double(), qf, atol=1e-5, rtol=1e-5)
    # softmax over positions plus the residual 1: each map sums to hw + 1, values in [1, 2]
    sums = out.p_attention.flatten(1).sum(1)
    torch.testing.assert_close(sums, torch.full_like(sums, h * w + 1.0))
    assert bool((out.q_attention >= 1).all() and (out.q_attention <= 2).all())


def test_fusion_width_follows_the_map_size_and_mismatch_is_refused():
    assert MetaFusion(36).hidden == 6  # the code's 36 -> 6 -> 36
    fusion = MetaFusion(18)
    assert fusion.hidden == 3
    assert fusion.reduce.bias is not None and fusion.expand.bias is not None
    assert fusion.reduce.weight.shape == (3, 18, 1, 1) and fusion.expand.weight.shape == (
        18,
        3,
        1,
        1,
    )
    module = CrossAttention(18).eval()
    out = module(torch.randn(2, 8, 6, 3), torch.randn(2, 8, 6, 3))  # 6x3: non-square
    assert out.p_attention.shape == (2, 6, 3) and out.correlation.shape == (2, 18, 18)
    with pytest.raises(ValueError, match="18 positions"):
        module(torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6))


@pytest.mark.parametrize("train", [False, True])
def test_cross_attention_roles_are_symmetric(train):
    gen = torch.Generator().manual_seed(3)
    module = CrossAttention(6, reduction=2)
    _randomise_bn(module, gen)
    module.train(train)  # training mode: each direction has its own BN batch statistics
    p, q = torch.randn(4, 5, 2, 3, generator=gen), torch.randn(4, 5, 2, 3, generator=gen)
    a, b = module(p, q), module(q, p)
    torch.testing.assert_close(a.p_attention, b.q_attention, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.q_attention, b.p_attention, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.p_features, b.q_features, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.correlation, b.correlation.transpose(1, 2))


def test_attention_without_residual_is_a_distribution_and_temperature_sharpens():
    gen = torch.Generator().manual_seed(4)
    p, q = torch.randn(2, 4, 2, 2, generator=gen), torch.randn(2, 4, 2, 2, generator=gen)
    plain = CrossAttention(4, reduction=2, residual=False).eval()
    soft = CrossAttention(4, reduction=2, temperature=100.0, residual=False).eval()
    soft.load_state_dict(plain.state_dict())
    with torch.no_grad():
        out = plain(p, q)
        flat = soft(p, q).p_attention  # high temperature: close to uniform
    torch.testing.assert_close(out.p_attention.flatten(1).sum(1), torch.ones(2))
    assert float((flat - 0.25).abs().max()) < 0.01
    with pytest.raises(ValueError, match="temperature"):
        CrossAttention(4, temperature=0.0)


# ----------------------------------------------------------------------------- ResNet-12
def test_resnet12_is_the_can_code_network():
    net = resnet12().eval()
    assert net.out_channels == 512 and net.stage_channels == [64, 128, 256, 512]
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 84, 84)).shape == (1, 512, 6, 6)
    n_params = sum(p.numel() for p in net.parameters())
    assert 8.0e6 < n_params < 8.1e6  # the CAN ResNet-12 has about 8.0 M parameters
    kinds = {type(m) for m in net.modules()}
    assert nn.ReLU in kinds and nn.LeakyReLU not in kinds  # the code uses ReLU
    assert not any(isinstance(m, nn.MaxPool2d | nn.AvgPool2d) for m in net.modules())
    convs3 = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) == 1 + 4 * 3  # the stem + three per block
    strided = [m for m in convs3 if m.stride == (2, 2)]
    assert len(strided) == 4 and all(
        m is net.get_submodule(f"layer{i}.0.conv2") for i, m in zip(range(1, 5), strided)
    )
    # the authors' key names, so their weights load without renaming
    keys = set(net.state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv3.weight",
        "layer4.0.downsample.1.weight",
    ):
        assert key in keys


def test_resnet12_output_size_and_stages_on_non_square_inputs():
    net = resnet12(width=4).eval()
    for size in ((96, 48), (85, 33), (84, 84)):
        with torch.no_grad():
            stages = net.forward_stages(torch.randn(2, 3, *size))
            out = net(torch.randn(2, 3, *size))
        assert tuple(out.shape[-2:]) == ResNet12.output_size(*size)
        assert [s.shape[1] for s in stages] == [4, 8, 16, 32]
        assert stages[0].shape[-1] == math.ceil(size[1] / 2)
    assert ResNet12.output_size(96, 48) == (6, 3)
    with pytest.raises(TypeError, match="unexpected"):
        resnet12(last_stride=1)
