"""Analysis tools of the CGE paper (Xia et al. 2023, Sec. 4.2-4.3).

- sample hardness levels (Fig. 4): how many stripe memories classify a training sample
  correctly, grouped into easiest / mid-easy / mid-hard / hardest;
- per-stripe memory precision on the training set (Tables 1b and 2);
- cumulative distribution of the normalised per-sample loss (Fig. 5a) for the baseline
  CE, focal loss and the revised CE of CGE;
- saliency maps (max over channels of the final map, Fig. 1 / Fig. 7).

The pure functions below take tensors; :func:`analyze_runs` loads run folders, extracts
on the training set with the test transforms and writes PNGs, CSV/markdown tables and a
self-contained ``index.html``. Used by ``reidkit analyze cge``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "LEVEL_NAMES",
    "count_correct",
    "hardness_levels",
    "level_proportions",
    "stripe_precision",
    "per_sample_ce",
    "per_sample_focal",
    "normalized_loss_cdf",
    "saliency_maps",
    "RunAnalysis",
    "collect_run",
    "analyze_runs",
]

LEVEL_NAMES: tuple[str, ...] = ("easiest", "mid-easy", "mid-hard", "hardest")


# ------------------------------------------------------------------- pure helpers
def count_correct(predictions: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Number of stripe memories that classify each sample correctly.

    Args:
        predictions: (n, S) memory argmax per stripe and sample.
        pids: (S,) train labels.

    Returns:
        (S,) long in [0, n].
    """
    return (predictions == pids.to(predictions.device)[None, :]).sum(dim=0)


def hardness_levels(num_correct: torch.Tensor, num_stripes: int) -> torch.Tensor:
    """Group the n+1 correct-counts into the paper's four levels (index into LEVEL_NAMES).

    k = number of correct stripes out of n: k = n -> easiest (0); k = 0 -> hardest (3);
    otherwise mid-easy (1) when 2k >= n, else mid-hard (2). For n = 3 this is exactly the
    paper's grouping (3 easiest, 2 mid-easy, 1 mid-hard, 0 hardest); n = 1 has only the
    two extremes.

    Args:
        num_correct: (S,) counts in [0, n].
        num_stripes: n.

    Returns:
        (S,) long level indices.
    """
    k = num_correct.long()
    if k.numel() and (int(k.min()) < 0 or int(k.max()) > num_stripes):
        raise ValueError(f"hardness_levels: counts must be in [0, {num_stripes}]")
    levels = torch.where(2 * k >= num_stripes, 1, 2)
    levels = torch.where(k == num_stripes, 0, levels)
    levels = torch.where(k == 0, 3, levels)
    return levels


def level_proportions(levels: torch.Tensor) -> dict[str, float]:
    """Fraction of samples in each named level (sums to 1). {name: fraction}."""
    total = max(int(levels.numel()), 1)
    counts = torch.bincount(levels.long().flatten(), minlength=len(LEVEL_NAMES))
    return {name: float(counts[i]) / total for i, name in enumerate(LEVEL_NAMES)}


def stripe_precision(predictions: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Precision of each stripe memory as a classifier on the given samples. (n,) float."""
    correct = predictions == pids.to(predictions.device)[None, :]
    return correct.float().mean(dim=1)


def per_sample_ce(logits: torch.Tensor, pids: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Label-smoothed cross entropy per sample (Eqs. 4-5). logits (S, N), pids (S,) -> (S,)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    num_classes = logits.shape[1]
    nll = -log_p.gather(1, pids.long()[:, None]).squeeze(1)
    return (1.0 - epsilon) * nll - epsilon * log_p.sum(dim=1) / num_classes


def per_sample_focal(
    logits: torch.Tensor, pids: torch.Tensor, gamma: float, epsilon: float = 0.0
) -> torch.Tensor:
    """Focal loss per sample (Lin et al.), with optional label smoothing.

    ``sum_c -q_c (1 - p_c)^gamma log p_c`` with ``q = (1 - eps) onehot + eps / N``; for
    ``eps = 0`` this is ``-(1 - p_y)^gamma log p_y``. logits (S, N), pids (S,) -> (S,).
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    q = F.one_hot(pids.long(), logits.shape[1]).float()
    if epsilon > 0:
        q = (1.0 - epsilon) * q + epsilon / logits.shape[1]
    return (-q * (1.0 - log_p.exp()).clamp(min=0).pow(gamma) * log_p).sum(dim=1)


def normalized_loss_cdf(losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative distribution of the normalised loss (the paper's Fig. 5a, after Lin et al.).

    Losses are normalised to sum to one and sorted from lowest to highest; the curve is
    (fraction of samples, cumulative normalised loss).

    Args:
        losses: (S,) non-negative per-sample losses.

    Returns:
        x (S,) in (0, 1], y (S,) cumulative share of the total loss, y[-1] = 1.
    """
    losses = losses.double().flatten().clamp(min=0)
    if losses.numel() == 0:
        raise ValueError("normalized_loss_cdf: no losses given")
    total = losses.sum()
    normed = losses / total if total > 0 else torch.full_like(losses, 1.0 / losses.numel())
    y = torch.cumsum(torch.sort(normed).values, dim=0)
    x = torch.arange(1, losses.numel() + 1, dtype=torch.float64) / losses.numel()
    return x, y


def saliency_maps(feat_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Saliency = max over channels of the final map, upsampled and min-max normalised.

    Args:
        feat_map: (B, C, h, w).
        size: (H, W) output size (the image size).

    Returns:
        (B, H, W) in [0, 1].
    """
    sal = feat_map.float().amax(dim=1, keepdim=True)
    sal = F.interpolate(sal, size=size, mode="bilinear", align_corners=False).squeeze(1)
    lo = sal.flatten(1).amin(dim=1)[:, None, None]
    hi = sal.flatten(1).amax(dim=1)[:, None, None]
    return (sal - lo) / (hi - lo).clamp(min=1e-12)


# -------------------------------------------------------------------- run loading
@dataclass
class RunAnalysis:
    """What :func:`collect_run` extracts from one run on the training set."""

    run_dir: Path
    method: str
    pids: torch.Tensor  # (S,)
    ce: torch.Tensor  # (S,) label-smoothed CE on the (unrevised) logits
    focal: torch.Tensor | None = None  # (S,) focal loss on the logits (if gamma given)
    revised_ce: torch.Tensor | None = None  # (S,) CE on the revised prediction (CGE)
    predictions: torch.Tensor | None = None  # (n, S) stripe-memory argmax (CGE)
    saliency: torch.Tensor | None = None  # (K, H, W) for the chosen samples
    images: torch.Tensor | None = None  # (K, 3, H, W) de-normalised to [0, 1]
    extra: dict = field(default_factory=dict)


def _model_outputs(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eval-mode feature map, logits and (for CGE) stripe features / revised prediction."""
    if hasattr(model, "extract"):
        feat_map = model.extract(images)
    else:
        feat_map = model.backbone(images)
    pooled = model.pool(feat_map).flatten(1)
    _, logits = model.neck(pooled)
    out = {"feat_map": feat_map}
    if logits is not None:
        out["logits"] = logits
    if hasattr(model, "stripe_features") and hasattr(model, "memory"):
        stripes = model.stripe_features(feat_map)
        base, _, revised = model.revise(dict(out), stripes)
        out["logits"] = base
        out["stripe_feats"] = stripes
        out["revised_logits"] = revised
    return out


def _find_checkpoint(run_dir: Path, which: str) -> Path:
    ckpt_dir = run_dir / "checkpoints"
    order = ["best.pt", "last.pt"] if which == "best" else ["last.pt", "best.pt"]
    for name in order:
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise FileNotFoundError(f"{ckpt_dir}: no best.pt or last.pt (is {run_dir} a run folder?)")


@torch.no_grad()
def collect_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    device: str | torch.device = "cpu",
    focal_gamma: float | None = None,
    saliency_indices: list[int] | None = None,
    max_samples: int | None = None,
) -> RunAnalysis:
    """Load a run (config + checkpoint) and extract per-sample statistics on its train set.

    Args:
        run_dir: a run folder written by ``reidkit train`` (``config.yaml``, ``checkpoints/``).
        checkpoint: ``"best"`` or ``"last"`` (falls back to the other when missing).
        device: where to run the model.
        focal_gamma: compute per-sample focal loss with this gamma (None: skip).
        saliency_indices: train-set indices whose saliency maps/images to keep.
        max_samples: only the first ``max_samples`` training images (quick looks).

    Returns:
        A :class:`RunAnalysis`.
    """
    from reidkit.config import load_config
    from reidkit.data.datasets import dataset_from_config
    from reidkit.data.loader import build_test_loader
    from reidkit.engine import load_model

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (is {run_dir} a run folder?)")
    cfg = load_config(cfg_path)
    dataset = dataset_from_config(cfg.data)
    records = list(dataset.train)
    if max_samples is not None:
        records = records[:max_samples]
    num_classes = len({r.pid for r in dataset.train})
    model = load_model(cfg, _find_checkpoint(run_dir, checkpoint), num_classes=num_classes)
    model = model.to(device).eval()
    loader = build_test_loader(cfg, records)
    keep = set(saliency_indices or [])
    eps = float(cfg.loss.label_smoothing)
    mean = torch.tensor(cfg.data.mean).view(3, 1, 1)
    std = torch.tensor(cfg.data.std).view(3, 1, 1)

    pids_all, ce_all, focal_all, rce_all, preds_all = [], [], [], [], []
    sal_keep: dict[int, torch.Tensor] = {}
    img_keep: dict[int, torch.Tensor] = {}
    offset = 0
    for batch in loader:
        images = batch["images"].to(device)
        pids = batch["pids"].to(device)
        out = _model_outputs(model, images)
        pids_all.append(pids.cpu())
        ce_all.append(per_sample_ce(out["logits"], pids, eps).cpu())
        if focal_gamma is not None:
            focal_all.append(per_sample_focal(out["logits"], pids, focal_gamma, eps).cpu())
        if "revised_logits" in out:
            rce_all.append(per_sample_ce(out["revised_logits"], pids, eps).cpu())
            preds_all.append(model.memory_predictions(out["stripe_feats"]).cpu())
        idx = [i for i in range(images.shape[0]) if offset + i in keep]
        if idx:
            sal = saliency_maps(out["feat_map"][idx], tuple(images.shape[-2:]))
            for j, i in enumerate(idx):
                sal_keep[offset + i] = sal[j].cpu()
                img_keep[offset + i] = (images[i].cpu().float() * std + mean).clamp(0, 1)
        offset += images.shape[0]

    order = [i for i in (saliency_indices or []) if i in sal_keep]
    return RunAnalysis(
        run_dir=run_dir,
        method=cfg.model.name,
        pids=torch.cat(pids_all),
        ce=torch.cat(ce_all),
        focal=torch.cat(focal_all) if focal_all else None,
        revised_ce=torch.cat(rce_all) if rce_all else None,
        predictions=torch.cat(preds_all, dim=1) if preds_all else None,
        saliency=torch.stack([sal_keep[i] for i in order]) if order else None,
        images=torch.stack([img_keep[i] for i in order]) if order else None,
        extra={"num_stripes": getattr(model, "num_stripes", None), "config": str(cfg_path)},
    )


# ------------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pie(proportions: dict[str, float], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    names = [n for n in LEVEL_NAMES if proportions.get(n, 0) > 0]
    ax.pie(
        [proportions[n] for n in names],
        labels=[f"{n}\n{100 * proportions[n]:.1f}%" for n in names],
        colors=[
            {
                "easiest": "#4c9f70",
                "mid-easy": "#a6d96a",
                "mid-hard": "#fdae61",
                "hardest": "#d7191c",
            }[n]
            for n in names
        ],
        startangle=90,
        counterclock=False,
    )
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cdf(curves: dict[str, torch.Tensor], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, losses in curves.items():
        x, y = normalized_loss_cdf(losses)
        ax.plot(x.numpy(), y.numpy(), label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
    ax.set_xlabel("fraction of training samples (sorted by loss)")
    ax.set_ylabel("cumulative normalised loss")
    ax.set_title("CDF of the normalised per-sample loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_saliency(images: torch.Tensor, columns: dict[str, torch.Tensor], path: Path) -> None:
    """Grid: one row per image; the image, then one overlay per run."""
    plt = _plt()
    rows = images.shape[0]
    cols = 1 + len(columns)
    h, w = images.shape[-2:]
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows * h / w), squeeze=False)
    for r in range(rows):
        img = images[r].permute(1, 2, 0).numpy()
        axes[r][0].imshow(img)
        if r == 0:
            axes[r][0].set_title("image", fontsize=8)
        for c, (name, sal) in enumerate(columns.items(), start=1):
            axes[r][c].imshow(img)
            axes[r][c].imshow(sal[r].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if r == 0:
                axes[r][c].set_title(name, fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------- driver
def _pick_saliency_indices(pids: list[int], count: int) -> list[int]:
    """The first image of ``count`` distinct identities, spread over the train set."""
    first: dict[int, int] = {}
    for i, p in enumerate(pids):
        first.setdefault(p, i)
    ids = sorted(first)
    if not ids:
        return []
    step = max(len(ids) // max(count, 1), 1)
    return [first[p] for p in ids[::step][:count]]


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def analyze_runs(
    run: str | Path,
    out_dir: str | Path,
    baseline_run: str | Path | None = None,
    focal_run: str | Path | None = None,
    checkpoint: str = "best",
    device: str = "cpu",
    focal_gamma: float = 1.0,
    num_saliency: int = 6,
    max_samples: int | None = None,
) -> dict:
    """Run every CGE analysis and write the outputs into ``out_dir``.

    Args:
        run: the CGE run folder.
        out_dir: where ``hardness_pie.png``, ``stripe_precision.{csv,md}``,
            ``loss_cdf.png``, ``saliency.png``, ``summary.json`` and ``index.html`` go.
        baseline_run: the baseline (BoT/AGW) run, for the CE curve and saliency column.
        focal_run: a run trained with focal loss (``loss.focal_gamma``); without it the
            focal curve is the focal loss on the baseline's logits (labelled so).
        focal_gamma: gamma when the focal curve is computed on the baseline's logits.
        num_saliency: rows of the saliency grid.

    Returns:
        The summary dict (also written as ``summary.json``).
    """
    from reidkit.config import load_config
    from reidkit.data.datasets import dataset_from_config

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(Path(run) / "config.yaml")
    if cfg.model.name != "cge":
        raise ValueError(f"{run}: model.name is '{cfg.model.name}', expected a 'cge' run for --run")
    train_pids = [r.pid for r in dataset_from_config(cfg.data).train]
    if max_samples is not None:
        train_pids = train_pids[:max_samples]
    sal_idx = _pick_saliency_indices(train_pids, num_saliency)

    cge = collect_run(run, checkpoint, device, saliency_indices=sal_idx, max_samples=max_samples)
    assert cge.predictions is not None and cge.revised_ce is not None
    n = cge.predictions.shape[0]
    correct = count_correct(cge.predictions, cge.pids)
    levels = hardness_levels(correct, n)
    props = level_proportions(levels)
    hist = torch.bincount(correct, minlength=n + 1).tolist()
    prec = stripe_precision(cge.predictions, cge.pids).tolist()

    summary: dict = {
        "run": str(run),
        "num_samples": int(cge.pids.numel()),
        "num_stripes": n,
        "hardness": props,
        "correct_count_histogram": {str(k): int(v) for k, v in enumerate(hist)},
        "stripe_precision": {f"M_{i + 1}": p for i, p in enumerate(prec)},
    }

    plot_pie(props, out / "hardness_pie.png", f"hardness levels (n={n}, {cge.pids.numel()} images)")

    with open(out / "stripe_precision.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["memory", "precision"])
        for i, p in enumerate(prec):
            writer.writerow([f"M_{i + 1}", f"{p:.4f}"])
    md = ["| memory | precision |", "|---|---|"] + [
        f"| M_{i + 1} | {100 * p:.1f}% |" for i, p in enumerate(prec)
    ]
    (out / "stripe_precision.md").write_text("\n".join(md) + "\n")

    curves: dict[str, torch.Tensor] = {}
    base = None
    if baseline_run is not None:
        base = collect_run(
            baseline_run,
            checkpoint,
            device,
            focal_gamma=focal_gamma,
            saliency_indices=sal_idx,
            max_samples=max_samples,
        )
        if not torch.equal(base.pids, cge.pids):
            raise ValueError(
                f"--baseline-run {baseline_run} was trained on another training set than "
                f"--run {run} (different images/labels); compare runs of the same dataset"
            )
        curves[f"baseline CE ({base.method})"] = base.ce
    if focal_run is not None:
        fcfg = load_config(Path(focal_run) / "config.yaml")
        gamma = fcfg.loss.focal_gamma if fcfg.loss.focal_gamma is not None else focal_gamma
        foc = collect_run(focal_run, checkpoint, device, focal_gamma=gamma, max_samples=max_samples)
        assert foc.focal is not None
        curves[f"focal loss (gamma={gamma:g})"] = foc.focal
    elif base is not None and base.focal is not None:
        curves[f"focal (gamma={focal_gamma:g}) on baseline logits"] = base.focal
    curves[f"CGE revised CE (n={n})"] = cge.revised_ce
    plot_cdf(curves, out / "loss_cdf.png")
    summary["loss_share_of_top10pct"] = {
        name: float(1.0 - normalized_loss_cdf(v)[1][int(0.9 * v.numel()) - 1])
        if v.numel() >= 10
        else None
        for name, v in curves.items()
    }

    if cge.saliency is not None and cge.images is not None:
        cols = {}
        if base is not None and base.saliency is not None:
            sal = base.saliency
            if sal.shape[-2:] != cge.saliency.shape[-2:]:  # runs trained at other sizes
                sal = F.interpolate(sal[:, None], size=cge.saliency.shape[-2:], mode="bilinear")[
                    :, 0
                ]
            cols[f"baseline ({base.method})"] = sal
        cols["CGE"] = cge.saliency
        plot_saliency(cge.images, cols, out / "saliency.png")

    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_index(out, summary)
    return summary


def _write_index(out: Path, summary: dict) -> None:
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{100 * v:.1f}%</td></tr>"
        for k, v in summary["hardness"].items()
    )
    prec_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{100 * v:.1f}%</td></tr>"
        for k, v in summary["stripe_precision"].items()
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>CGE analysis</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>CGE analysis</h1><p>run: <code>{html.escape(summary['run'])}</code>, "
        f"{summary['num_samples']} training images, n = {summary['num_stripes']} stripes</p>",
        "<h2>Sample hardness levels (Fig. 4)</h2>",
        f"<table><tr><th>level</th><th>share</th></tr>{rows}</table>",
    ]
    for name, title in [
        ("hardness_pie.png", ""),
        ("loss_cdf.png", "<h2>Normalised per-sample loss CDF (Fig. 5a)</h2>"),
        ("saliency.png", "<h2>Saliency: max over channels of the final map (Fig. 7)</h2>"),
    ]:
        if (out / name).is_file():
            parts.append(title + _img_tag(out / name))
        if name == "hardness_pie.png":
            parts.append(
                "<h2>Per-stripe memory precision (Tables 1b, 2)</h2>"
                f"<table><tr><th>memory</th><th>precision</th></tr>{prec_rows}</table>"
            )
    parts.append("</body></html>")
    (out / "index.html").write_text("\n".join(parts))
