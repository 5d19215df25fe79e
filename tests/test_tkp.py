"""TKP building blocks: the two TKP losses and the space-time non-local block.

Losses against per-sample / per-pair loops of the slides' formulas and a hand-worked case;
the block against a naive loop over query positions.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reidkit.losses import tkp_distance_loss, tkp_feature_loss
from reidkit.models.non_local import NonLocalBlock, SpaceTimeNonLocalBlock, set_num_frames
from reidkit.models.resnet import build_resnet

torch.set_num_threads(1)
DT = torch.float64


def feats(n=3, t=4, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=DT), torch.randn(n, t, d, generator=g, dtype=DT)


# ----------------------------------------------------------------------------- losses
def naive_feature_loss(img, vid) -> float:
    n, t, _ = img.shape
    total = 0.0
    for i in range(n):
        for j in range(t):
            total += sum((float(a) - float(b)) ** 2 for a, b in zip(img[i, j], vid[i, j]))
    return total / (n * t)


def naive_distance_loss(img, vid, normalize) -> float:
    a = [list(map(float, v)) for v in img.reshape(-1, img.shape[-1])]
    b = [list(map(float, v)) for v in vid.reshape(-1, vid.shape[-1])]
    m = len(a)

    def dist(u, v):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(u, v)))

    total = 0.0
    for i in range(m):
        for j in range(m):
            total += (dist(a[i], a[j]) - dist(b[i], b[j])) ** 2
    return total / (m if normalize == "paper" else m * m)


def test_hand_worked_case():
    # One clip of two frames in 1-D: images at 0 and 3, frames at 0 and 1.
    img = torch.tensor([[[0.0], [3.0]]])
    vid = torch.tensor([[[0.0], [1.0]]])
    # ((0-0)^2 + (3-1)^2) / 2
    assert tkp_feature_loss(img, vid).item() == pytest.approx(2.0)
    # D_img = [[0,3],[3,0]], D_vid = [[0,1],[1,0]]: ||D_img - D_vid||_F^2 = 8
    assert tkp_distance_loss(img, vid).item() == pytest.approx(8 / 2, abs=1e-5)
    assert tkp_distance_loss(img, vid, normalize="code").item() == pytest.approx(8 / 4, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_loss_matches_loop(seed):
    img, vid = feats(seed=seed)
    assert tkp_feature_loss(img, vid).item() == pytest.approx(
        naive_feature_loss(img, vid), rel=1e-12
    )


@pytest.mark.parametrize("normalize", ["paper", "code"])
@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 1, 3), (2, 6, 7)])
def test_distance_loss_matches_loop(normalize, shape):
    img, vid = feats(*shape)
    got = tkp_distance_loss(img, vid, normalize=normalize).item()
    assert got == pytest.approx(naive_distance_loss(img, vid, normalize), rel=1e-9, abs=1e-12)


def test_code_normalisation_is_the_public_codes_mean():
    """ "code" = mean over the (NT)^2 entries of (D_img - D_vid)^2 with the code's distance
    sqrt(clamp(d^2, 1e-12)) (off the diagonal; there both are ~0); "paper" is NT times it."""
    img, vid = feats(4, 4, 16)
    m = 16

    def code_distmat(x):
        return torch.cdist(x, x).pow(2).clamp(min=1e-12).sqrt()

    a, b = img.reshape(m, -1), vid.reshape(m, -1)
    reference = (code_distmat(a) - code_distmat(b)).pow(2).mean()
    code = tkp_distance_loss(img, vid, normalize="code")
    assert code.item() == pytest.approx(reference.item(), rel=1e-10)
    assert tkp_distance_loss(img, vid).item() == pytest.approx(m * code.item(), rel=1e-12)


def test_flattened_input_is_the_same():
    img, vid = feats()
    assert tkp_feature_loss(img.reshape(12, 5), vid.reshape(12, 5)).item() == pytest.approx(
        tkp_feature_loss(img, vid).item()
    )
    assert tkp_distance_loss(img.reshape(12, 5), vid.reshape(12, 5)).item() == pytest.approx(
        tkp_distance_loss(img, vid).item()
    )


def test_bad_inputs_are_refused():
    img, vid = feats()
    with pytest.raises(ValueError, match="same shape"):
        tkp_feature_loss(img, vid[:, :3])
    with pytest.raises(ValueError, match="same shape"):
        tkp_distance_loss(img, vid[:2])
    with pytest.raises(ValueError, match="normalize"):
        tkp_distance_loss(img, vid, normalize="mean")
    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        tkp_feature_loss(img[0, 0], vid[0, 0])


def test_gradients_are_finite_and_correct():
    img, vid = feats(2, 3, 4)
    # Duplicate frames: distance 0 off the diagonal must not give NaN gradients.
    img = img.clone()
    img[0, 1] = img[0, 0]
    vid = vid.clone()
    vid[1, 2] = vid[1, 0]
    img.requires_grad_(True)
    vid.requires_grad_(True)
    loss = tkp_distance_loss(img, vid) + tkp_feature_loss(img, vid)
    loss.backward()
    assert torch.isfinite(img.grad).all() and torch.isfinite(vid.grad).all()
    assert img.grad.abs().sum() > 0 and vid.grad.abs().sum() > 0
    # Away from coinciding points both losses are smooth: check against finite differences.
    a, b = feats(2, 2, 3, seed=5)
    a.requires_grad_(True)
    b.requires_grad_(True)
    for normalize in ("paper", "code"):
        assert torch.autograd.gradcheck(
            lambda x, y, nz=normalize: tkp_distance_loss(x, y, nz), (a, b)
        )
    assert torch.autograd.gradcheck(tkp_feature_loss, (a, b))


def test_detached_video_side_gets_no_gradient():
    """The method's default: TKP terms do not reach the video network."""
    img, vid = feats()
    img.requires_grad_(True)
    vid.requires_grad_(True)
    (tkp_feature_loss(img, vid.detach()) + tkp_distance_loss(img, vid.detach())).backward()
    assert vid.grad is None and img.grad is not None


def test_losses_run_in_float32_under_autocast():
    img, vid = (x.to(torch.bfloat16) for x in feats(2, 4, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = tkp_feature_loss(img, vid)
        d = tkp_distance_loss(img, vid)
    assert f.dtype == torch.float32 and d.dtype == torch.float32
    ref = tkp_distance_loss(img.double(), vid.double()).item()
    assert d.item() == pytest.approx(ref, rel=1e-4)


def test_diagonal_is_exact_for_large_norm_features():
    """Features of norm ~30 (ResNet GAP features): the Gram expansion's float32 diagonal
    noise must not leak into the loss; identical inputs give exactly 0."""
    g = torch.Generator().manual_seed(0)
    x = 30 * torch.nn.functional.normalize(torch.randn(64, 2048, generator=g), dim=1)
    assert tkp_distance_loss(x, x.clone()).item() == 0.0


# ----------------------------------------------------------------------------- non-local
def _randomise(block: SpaceTimeNonLocalBlock, seed: int = 0) -> SpaceTimeNonLocalBlock:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        block.W[1].weight.copy_(torch.randn(block.in_channels, generator=g))
        block.W[1].bias.copy_(torch.randn(block.in_channels, generator=g))
    return block.double().eval()


def naive_space_time_non_local(block: SpaceTimeNonLocalBlock, x: torch.Tensor, t: int):
    """Loop over clips and query positions; 1x1 convs as explicit matrix products, the 2x2
    max pool as explicit maxima, the softmax by hand, BN with its running statistics."""
    bt, c, h, w = x.shape

    def conv1x1(conv, v):  # v (C_in,) -> (C_out,)
        return conv.weight[:, :, 0, 0] @ v + conv.bias

    kh, kw = (min(2, h), min(2, w)) if block.sub_sample else (1, 1)
    hp, wp = h // kh, w // kw
    out = torch.empty_like(x)
    for b in range(bt // t):
        frames = range(b * t, (b + 1) * t)
        keys, vals = [], []
        for f in frames:
            phi_map = torch.stack(
                [
                    torch.stack([conv1x1(block.phi, x[f, :, i, j]) for j in range(w)])
                    for i in range(h)
                ]
            )  # (h, w, Ci)
            g_map = torch.stack(
                [torch.stack([conv1x1(block.g, x[f, :, i, j]) for j in range(w)]) for i in range(h)]
            )
            for i in range(hp):
                for j in range(wp):
                    cell = (slice(i * kh, (i + 1) * kh), slice(j * kw, (j + 1) * kw))
                    keys.append(phi_map[cell].reshape(-1, block.inner_channels).max(dim=0).values)
                    vals.append(g_map[cell].reshape(-1, block.inner_channels).max(dim=0).values)
        for f in frames:
            for i in range(h):
                for j in range(w):
                    q = conv1x1(block.theta, x[f, :, i, j])
                    logits = [float(q @ k) for k in keys]
                    mx = max(logits)
                    e = [math.exp(v - mx) for v in logits]
                    s = sum(e)
                    y = sum((ei / s) * v for ei, v in zip(e, vals))
                    wy = conv1x1(block.W[0], y)
                    bn = block.W[1]
                    wy = (wy - bn.running_mean) / torch.sqrt(
                        bn.running_var + bn.eps
                    ) * bn.weight + bn.bias
                    out[f, :, i, j] = x[f, :, i, j] + wy
    return out


@pytest.mark.parametrize(
    "t,h,w,sub_sample",
    [(3, 4, 4, True), (2, 5, 3, True), (2, 1, 4, True), (2, 3, 3, False), (1, 4, 2, True)],
)
def test_space_time_non_local_matches_loop(t, h, w, sub_sample):
    torch.manual_seed(0)
    block = _randomise(SpaceTimeNonLocalBlock(6, sub_sample=sub_sample))
    x = torch.randn(2 * t, 6, h, w, dtype=DT)
    with torch.no_grad():
        got = block(x, num_frames=t)
        ref = naive_space_time_non_local(block, x, t)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert block.inner_channels == 3  # C // 2


def test_space_time_non_local_is_identity_at_init():
    block = SpaceTimeNonLocalBlock(16, num_frames=4)
    x = torch.randn(8, 16, 6, 4)
    assert torch.equal(block.train()(x), x)
    assert torch.equal(block.eval()(x), x)
    clip = x.view(2, 4, 16, 6, 4)
    assert torch.equal(block(clip), clip)


def test_attention_spans_the_clips_frames_only():
    block = _randomise(SpaceTimeNonLocalBlock(8))
    x = torch.randn(6, 8, 4, 4, dtype=DT)  # 2 clips x 3 frames
    with torch.no_grad():
        base = block(x, num_frames=3)
        x2 = x.clone()
        x2[2] += 1.0  # last frame of clip 0
        moved = block(x2, num_frames=3)
    assert (moved[0] - base[0]).abs().max() > 1e-6  # frame 0 sees frame 2
    torch.testing.assert_close(moved[3:], base[3:])  # clip 1 does not
    with torch.no_grad():  # T=1: frames are independent
        per_frame = block(x2, num_frames=1)
        assert torch.allclose(per_frame[0], block(x, num_frames=1)[0])


def test_frames_come_from_attribute_argument_or_clip_shape():
    block = _randomise(SpaceTimeNonLocalBlock(8))
    x = torch.randn(6, 8, 4, 2, dtype=DT)
    with pytest.raises(ValueError, match="does not know T"):
        block(x)
    with pytest.raises(ValueError, match="not a multiple"):
        block(x, num_frames=4)
    with torch.no_grad():
        by_arg = block(x, num_frames=3)
        assert set_num_frames(block, 3) == 1
        by_attr = block(x)
        by_clip = block(x.view(2, 3, 8, 4, 2))
    torch.testing.assert_close(by_attr, by_arg)
    torch.testing.assert_close(by_clip.flatten(0, 1), by_arg)


def test_insertable_after_a_resnet_block_and_trainable():
    """Inside a 2-D backbone stage the block gets (B*T, C, H, W); set_num_frames tells it T."""
    resnet = build_resnet(50, width=8)
    stage = resnet.layer2
    ch = resnet.stage_channels[1]
    blocks = [SpaceTimeNonLocalBlock(ch) for _ in range(2)]
    layer = nn.Sequential(stage[0], stage[1], blocks[0], stage[2], stage[3], blocks[1])
    assert set_num_frames(layer, 4) == 2
    clips = torch.randn(2, 4, resnet.stage_channels[0], 16, 8)
    out = layer(clips.flatten(0, 1))
    assert out.shape == (8, ch, 8, 4)
    # At init the blocks are identities: same output as the plain stage.
    torch.testing.assert_close(out, stage(clips.flatten(0, 1)))
    out.pow(2).mean().backward()
    # BN of W gets gradient at init (zero weight, so theta/phi/g receive none yet).
    assert blocks[0].W[1].weight.grad.abs().sum() > 0
    _randomise(blocks[0]).float().train()
    layer.zero_grad()
    layer(clips.flatten(0, 1)).pow(2).mean().backward()
    for name in ("theta", "phi", "g"):
        assert getattr(blocks[0], name).weight.grad.abs().sum() > 0, name


def test_dot_product_block_untouched():
    block = NonLocalBlock(16)
    assert block.inner_channels == 1
    assert not hasattr(block, "num_frames")


def test_non_local_bad_input():
    block = SpaceTimeNonLocalBlock(4)
    with pytest.raises(ValueError, match="expects"):
        block(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="inner_channels"):
        SpaceTimeNonLocalBlock(4, inner_channels=0)
    with pytest.raises(ValueError, match="num_frames"):
        set_num_frames(block, 0)
