"""IANet's interaction-aggregation blocks against naive loops over positions and channels,
the K x K patch form, identity at init, autocast/float16 safety and shapes."""

from __future__ import annotations

import math

import pytest
import torch

from reidkit.models.interaction import (
    IANET_STAGE_SIGMAS,
    ChannelIA,
    IABlock,
    SpatialIA,
    appearance_relation,
    channel_relation,
    location_prior,
    spatial_relation,
)

torch.set_num_threads(1)


def _softmax_row(values: list[float]) -> list[float]:
    m = max(values)
    e = [math.exp(v - m) for v in values]
    s = sum(e)
    return [v / s for v in e]


def naive_spatial_relation(x: torch.Tensor, ax: float, ay: float, kernel: int = 1) -> torch.Tensor:
    """Loops over positions p, q and the K x K offsets; plain Python floats (float64)."""
    b_, c_, h, w = x.shape
    r = kernel // 2
    xd = x.double()

    def cell(b: int, y: int, xx: int) -> torch.Tensor:
        if 0 <= y < h and 0 <= xx < w:
            return xd[b, :, y, xx]
        return torch.zeros(c_, dtype=torch.float64)

    out = torch.zeros(b_, h * w, h * w, dtype=torch.float64)
    for b in range(b_):
        for p in range(h * w):
            py, px = divmod(p, w)  # row-major: p = y * w + x
            loc, app = [], []
            for q in range(h * w):
                qy, qx = divmod(q, w)
                loc.append(-((qx - px) ** 2) / (2 * ax**2) - (qy - py) ** 2 / (2 * ay**2))
                dot = 0.0
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        dot += float(cell(b, py + dy, px + dx) @ cell(b, qy + dy, qx + dx))
                app.append(dot / math.sqrt(c_ * kernel * kernel))
            lrow, arow = _softmax_row(loc), _softmax_row(app)
            rel = _softmax_row([lv * av for lv, av in zip(lrow, arow)])
            out[b, p] = torch.tensor(rel, dtype=torch.float64)
    return out


def naive_channel_relation(z: torch.Tensor) -> torch.Tensor:
    b_, c_ = z.shape[:2]
    flat = z.double().reshape(b_, c_, -1)
    out = torch.zeros(b_, c_, c_, dtype=torch.float64)
    for b in range(b_):
        for m in range(c_):
            out[b, m] = torch.tensor(
                _softmax_row([float(flat[b, m] @ flat[b, n]) for n in range(c_)]),
                dtype=torch.float64,
            )
    return out


def test_location_prior_formula_and_orientation() -> None:
    h, w, ax, ay = 4, 3, 1.5, 0.7
    prior = location_prior(h, w, ax, ay)
    assert prior.shape == (12, 12) and prior.dtype == torch.float32
    torch.testing.assert_close(prior.sum(-1), torch.ones(12))
    for p in range(12):
        py, px = divmod(p, w)
        row = _softmax_row(
            [
                -((q % w - px) ** 2) / (2 * ax**2) - (q // w - py) ** 2 / (2 * ay**2)
                for q in range(12)
            ]
        )
        torch.testing.assert_close(prior[p].double(), torch.tensor(row, dtype=torch.float64))
    # x is the width axis: with ax >> ay the prior spreads along the row of p
    wide = location_prior(5, 5, ax=4.0, ay=0.5)
    centre = 2 * 5 + 2
    assert wide[centre, 2 * 5 + 0] > wide[centre, 0 * 5 + 2] * 100  # same row far > same column
    with pytest.raises(ValueError, match="ax and ay"):
        location_prior(2, 2, 0.0, 1.0)


@pytest.mark.parametrize("kernel", [1, 3])
def test_spatial_relation_against_naive_loop(kernel: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 3, generator=g)
    got = spatial_relation(x, ax=2.0, ay=1.0, kernel=kernel)
    assert got.shape == (2, 12, 12) and got.dtype == torch.float32
    want = naive_spatial_relation(x, 2.0, 1.0, kernel)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 12))


def test_patch_form_with_k1_is_single_position_form() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 5, 4, generator=g)
    single = torch.softmax(
        torch.einsum("bcp,bcq->bpq", x.flatten(2), x.flatten(2)) / math.sqrt(8), -1
    )
    torch.testing.assert_close(appearance_relation(x, kernel=1), single)
    # and the patch form with K=3 really differs (it sees the neighbours)
    assert not torch.allclose(appearance_relation(x, kernel=3), single, atol=1e-3)
    with pytest.raises(ValueError, match="odd"):
        spatial_relation(x, 1.0, 1.0, kernel=2)


def test_channel_relation_against_naive_loop() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 6, 3, 2, generator=g) * 0.5
    got = channel_relation(z)
    assert got.shape == (2, 6, 6) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_channel_relation(z), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(channel_relation(z.flatten(2)), got)


def test_modules_aggregate_with_their_relations() -> None:
    """With BN weight 1 / bias 0 in eval mode (running stats 0/1) the block adds R X."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, generator=g)
    sia, cia = SpatialIA(4, ax=1.0, ay=2.0).eval(), ChannelIA(4).eval()
    for m in (sia, cia):
        torch.nn.init.ones_(m.bn.weight)
    scale = 1 / math.sqrt(1 + sia.bn.eps)
    rel = naive_spatial_relation(x, 1.0, 2.0).float()
    want = x + scale * torch.einsum("bpq,bcq->bcp", rel, x.flatten(2)).view_as(x)
    torch.testing.assert_close(sia(x), want, rtol=1e-5, atol=1e-5)
    crel = naive_channel_relation(x).float()
    want = x + scale * torch.einsum("bmn,bnp->bmp", crel, x.flatten(2)).view_as(x)
    torch.testing.assert_close(cia(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parts", ["ia", "sia", "cia"])
def test_block_is_identity_at_init_and_learns(parts: str) -> None:
    x = torch.randn(4, 8, 6, 4, generator=torch.Generator().manual_seed(4))
    block = IABlock(8, ax=2.0, ay=3.0, parts=parts)
    assert (block.spatial is not None) == (parts in ("ia", "sia"))
    assert (block.channel is not None) == (parts in ("ia", "cia"))
    assert torch.equal(block(x), x)  # train mode
    assert torch.equal(block.eval()(x), x)
    block.train()
    xr = x.clone().requires_grad_(True)
    (block(xr) ** 2).sum().backward()
    # the zero-initialised BN weights get a gradient, so the block can leave the identity
    for sub in (block.spatial, block.channel):
        if sub is not None:
            assert sub.bn.weight.grad is not None and sub.bn.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="parts"):
        IABlock(8, parts="both")


def test_shapes_any_size_and_stage_defaults() -> None:
    ax, ay = IANET_STAGE_SIGMAS["layer3"]
    block = IABlock(16, ax, ay, kernel=3)
    for size in ((16, 8), (7, 5)):
        x = torch.randn(2, 16, *size)
        assert block(x).shape == x.shape
        assert block.spatial.relation(x).shape == (2, size[0] * size[1], size[0] * size[1])
    assert "ax=5, ay=10, kernel=3" in repr(block)
    with pytest.raises(ValueError, match=r"expected \(B, 16, H, W\)"):
        block(torch.randn(2, 8, 4, 4))


def test_float16_and_autocast_keep_relations_in_float32() -> None:
    """Unscaled Z Z^T of post-ReLU maps overflows float16; relations are float32 and finite."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 64, 8, 4, generator=g) * 80  # dot products ~ 64 * 2100: > 65504
    assert torch.isinf(x.half().flatten(2) @ x.half().flatten(2).transpose(1, 2)).any()
    r_half = spatial_relation(x.half(), 5.0, 10.0)
    c_half = channel_relation(x.half())
    assert r_half.dtype == c_half.dtype == torch.float32
    assert torch.isfinite(r_half).all() and torch.isfinite(c_half).all()
    torch.testing.assert_close(r_half, spatial_relation(x.half().float(), 5.0, 10.0))
    block = IABlock(64, 5.0, 10.0)
    torch.nn.init.ones_(block.spatial.bn.weight)
    torch.nn.init.ones_(block.channel.bn.weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
        r = block.spatial.relation(x)
    assert r.dtype == torch.float32 and torch.isfinite(y).all()
    torch.testing.assert_close(r, spatial_relation(x, 5.0, 10.0))
    torch.testing.assert_close(y.float(), block(x), rtol=2e-2, atol=2e-1)


def test_cpu_relations_have_no_subnormals() -> None:
    """Large unscaled logits: the CPU softmax cuts the subnormal tail (x86 computes with
    subnormals ~20x slower) and changes no entry by more than 1.8e-35."""
    z = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(6)) * 3
    rel = channel_relation(z)
    plain = torch.bmm(z, z.transpose(1, 2)).softmax(dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    assert ((plain > 0) & (plain < tiny)).any()  # the case exists
    assert not ((rel > 0) & (rel < tiny)).any()
    assert float((rel - plain).abs().max()) < 1.9e-35
