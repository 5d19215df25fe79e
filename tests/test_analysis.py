"""CGE analysis tools: hardness levels, stripe precision, loss CDF, saliency, report files."""

from __future__ import annotations

import base64
import math

import pytest
import torch
import torch.nn.functional as F

from reidkit.analysis import cge as an

torch.set_num_threads(1)


def test_count_correct_and_precision_hand_case():
    pids = torch.tensor([0, 1, 2, 3])
    preds = torch.tensor(
        [
            [0, 1, 2, 0],  # stripe 1: 3 of 4 correct
            [0, 0, 2, 0],  # stripe 2: 2 of 4
            [0, 0, 0, 0],  # stripe 3: 1 of 4
        ]
    )
    assert an.count_correct(preds, pids).tolist() == [3, 1, 2, 0]
    assert an.stripe_precision(preds, pids).tolist() == pytest.approx([0.75, 0.5, 0.25])


def test_hardness_levels_paper_grouping_n3():
    # The paper (Sec. 4.2.1): 3 correct = easiest, 2 = mid-easy, 1 = mid-hard, 0 = hardest.
    levels = an.hardness_levels(torch.tensor([3, 2, 1, 0]), 3)
    assert [an.LEVEL_NAMES[i] for i in levels] == ["easiest", "mid-easy", "mid-hard", "hardest"]


@pytest.mark.parametrize("n", [1, 2, 4, 5, 12])
def test_hardness_levels_general_n_matches_rule(n):
    k = torch.arange(n + 1)
    got = an.hardness_levels(k, n).tolist()
    for kk, level in zip(k.tolist(), got):
        if kk == n:
            expect = "easiest"
        elif kk == 0:
            expect = "hardest"
        elif 2 * kk >= n:
            expect = "mid-easy"
        else:
            expect = "mid-hard"
        assert an.LEVEL_NAMES[level] == expect, (n, kk)


def test_hardness_levels_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        an.hardness_levels(torch.tensor([4]), 3)


def test_level_proportions_sum_to_one():
    props = an.level_proportions(torch.tensor([0, 0, 1, 3, 3, 3, 2, 0]))
    assert props == pytest.approx(
        {"easiest": 3 / 8, "mid-easy": 1 / 8, "mid-hard": 1 / 8, "hardest": 3 / 8}
    )
    assert sum(props.values()) == pytest.approx(1.0)


def test_per_sample_ce_matches_torch_label_smoothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g)
    pids = torch.randint(0, 5, (7,), generator=g)
    for eps in (0.0, 0.1, 0.3):
        ref = F.cross_entropy(logits, pids, label_smoothing=eps, reduction="none")
        torch.testing.assert_close(an.per_sample_ce(logits, pids, eps), ref)


def test_per_sample_focal_against_loop():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g)
    pids = torch.randint(0, 4, (6,), generator=g)
    gamma, eps = 1.5, 0.1
    got = an.per_sample_focal(logits, pids, gamma, eps)
    for b in range(6):
        p = torch.softmax(logits[b], 0)
        total = 0.0
        for c in range(4):
            q = (1 - eps) * (c == int(pids[b])) + eps / 4
            total += -q * (1 - float(p[c])) ** gamma * math.log(float(p[c]))
        assert float(got[b]) == pytest.approx(total, rel=1e-5)
    # gamma = 0 is cross entropy
    torch.testing.assert_close(
        an.per_sample_focal(logits, pids, 0.0), an.per_sample_ce(logits, pids, 0.0)
    )


def test_normalized_loss_cdf_hand_case():
    x, y = an.normalized_loss_cdf(torch.tensor([3.0, 1.0]))
    assert x.tolist() == pytest.approx([0.5, 1.0])
    assert y.tolist() == pytest.approx([0.25, 1.0])
    x, y = an.normalized_loss_cdf(torch.tensor([2.0, 0.0, 1.0, 1.0]))
    assert y.tolist() == pytest.approx([0.0, 0.25, 0.5, 1.0])
    # all-zero losses: a uniform share, not NaN
    _, y = an.normalized_loss_cdf(torch.zeros(4))
    assert y.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_saliency_is_channel_max_normalised():
    fm = torch.zeros(1, 3, 2, 2)
    fm[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    fm[0, 2] = torch.tensor([[0.0, 3.0], [0.0, 2.0]])
    sal = an.saliency_maps(fm, (2, 2))
    expect = torch.tensor([[1.0, 3.0], [0.0, 2.0]]) / 3.0
    torch.testing.assert_close(sal[0], expect)
    big = an.saliency_maps(torch.rand(2, 4, 4, 2), (16, 8))
    assert big.shape == (2, 16, 8)
    assert float(big.amin()) == pytest.approx(0.0, abs=1e-6) and float(big.amax()) == pytest.approx(
        1.0
    )


def test_pick_saliency_indices_distinct_identities():
    pids = [0, 0, 1, 1, 2, 2, 3, 3, 4]
    idx = an._pick_saliency_indices(pids, 3)
    assert len(idx) == 3 and len({pids[i] for i in idx}) == 3
    assert all(pids.index(pids[i]) == i for i in idx)  # first image of each identity


def test_figures_and_index_html(tmp_path):
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    an.plot_pie(
        {"easiest": 0.7, "mid-easy": 0.2, "mid-hard": 0.1, "hardest": 0.0},
        tmp_path / "hardness_pie.png",
        "t",
    )
    an.plot_cdf(
        {"a": torch.rand(50, generator=g), "b": torch.rand(50, generator=g) ** 3},
        tmp_path / "loss_cdf.png",
    )
    an.plot_saliency(
        torch.rand(2, 3, 16, 8, generator=g),
        {"base": torch.rand(2, 16, 8), "CGE": torch.rand(2, 16, 8)},
        tmp_path / "saliency.png",
    )
    summary = {
        "run": "runs/x",
        "num_samples": 10,
        "num_stripes": 3,
        "hardness": {"easiest": 0.7, "mid-easy": 0.2, "mid-hard": 0.1, "hardest": 0.0},
        "stripe_precision": {"M_1": 0.9, "M_2": 0.8, "M_3": 0.5},
    }
    an._write_index(tmp_path, summary)
    page = (tmp_path / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    # the embedded pictures are the PNGs themselves (self-contained page)
    png = (tmp_path / "loss_cdf.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert base64.b64encode(png).decode() in page
    assert "M_3" in page and "50.0%" in page


def test_analyze_runs_end_to_end(tmp_path):
    """Two fake run folders (CGE with zero memories, BoT) on the tiny synthetic set.

    Zero memories give cosine 0 for every class, so every stripe predicts class 0: each
    stripe's precision is the share of pid-0 samples, pid-0 samples are 'easiest' and all
    others 'hardest' - values we can state without running the model.
    """
    pytest.importorskip("matplotlib")
    from reidkit.config import dump_config, load_config
    from reidkit.data.datasets import dataset_from_config
    from reidkit.data.synth import generate
    from reidkit.methods import build_method

    generate(tmp_path / "data" / "synth-tiny", preset="tiny", seed=0, workers=1)
    common = [
        "model.backbone=resnet18",
        "data.dataset=synth",
        f"data.root={tmp_path / 'data'}",
        "data.synth_preset=tiny",
        "data.height=64",
        "data.width=32",
        "data.num_workers=0",
        "data.test_batch_size=16",
        "model.cge.num_stripes=2",
    ]
    runs = {}
    for name in ("cge", "bot"):
        cfg = load_config(None, [f"model.name={name}", *common])
        train = dataset_from_config(cfg.data).train
        num_classes = len({r.pid for r in train})
        torch.manual_seed(0)
        model = build_method(cfg, num_classes)
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        torch.save(
            {"model": model.state_dict(), "num_classes": num_classes},
            run / "checkpoints" / "best.pt",
        )
        dump_config(cfg, run / "config.yaml")
        runs[name] = run
    max_samples = 24
    summary = an.analyze_runs(
        runs["cge"],
        tmp_path / "out",
        baseline_run=runs["bot"],
        max_samples=max_samples,
        num_saliency=3,
    )
    pids = [r.pid for r in train[:max_samples]]
    share0 = pids.count(0) / max_samples
    assert summary["num_samples"] == max_samples and summary["num_stripes"] == 2
    assert summary["stripe_precision"] == pytest.approx({"M_1": share0, "M_2": share0})
    assert summary["hardness"]["easiest"] == pytest.approx(share0)
    assert summary["hardness"]["hardest"] == pytest.approx(1 - share0)
    for name in (
        "hardness_pie.png",
        "loss_cdf.png",
        "saliency.png",
        "stripe_precision.csv",
        "index.html",
    ):
        assert (tmp_path / "out" / name).is_file(), name
    assert (tmp_path / "out" / "index.html").read_text().count("data:image/png;base64,") == 3
    with pytest.raises(ValueError, match="expected a 'cge' run"):
        an.analyze_runs(runs["bot"], tmp_path / "out2")
