"""Analyses of the MGRe paper (Yang et al., Neurocomputing 2021) for trained weights.

- **Region IoU**: mean IoU between the predicted regions and the keypoint boxes they are
  trained towards (the visible keypoints of each region grown by the 0.05 margin of Eq.
  3), per stage and per region, on the test split (query + gallery);
- **Regions** drawn on images: the seven predicted boxes coloured by stage beside the
  keypoint boxes;
- **Per-stage class activation maps** (Fig. 4): Grad-CAM of each part's logit of the
  image's identity with respect to the map that part reads, plus the Eq. 6-weighted
  combination ("final"); for a baseline (BoT), Grad-CAM of its logit with respect to the
  layer1..layer4 outputs and their mean, so the two rows compare stage by stage.

:func:`analyze_mgre` writes ``regions.png``, ``cams.png``, ``region_iou.json`` and a
self-contained ``index.html``; ``reidkit analyze mgre`` is its command. Without weights the
freshly initialised model (``cfg.seed``) is analysed: the starting point of the IoU.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["baseline_stage_maps", "analyze_mgre"]


def baseline_stage_maps(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Grad-CAM of a single-head method's logit (class ``targets``; default: predicted)
    with respect to its backbone's stage outputs ``layer1..layer4`` (``stage1..stage4``,
    (B, h, w) in [0, 1]) and ``final``: their mean upsampled to the image, in [0, 1]."""
    from reidkit.viz.grad_cam import class_logit, compute_grad_cam

    names = list(getattr(model.backbone, "stage_names", ()))
    if len(names) != 4:
        raise ValueError(f"{type(model).__name__}: expected a backbone with four stages")
    maps: dict[str, torch.Tensor] = {}
    up = []
    for i, name in enumerate(names, start=1):
        cam = compute_grad_cam(
            model,
            images,
            f"backbone.{name}",
            class_logit(targets),
            forward=lambda x: model({"images": x}),
        ).maps
        maps[f"stage{i}"] = cam
        up.append(F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear")[:, 0])
    final = torch.stack(up).mean(0)
    maps["final"] = final / final.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return maps


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _load(cfg: Any, weights: str | Path | None, num_classes: int, device: torch.device):
    from reidkit.engine.checkpoint import load_model
    from reidkit.methods import build_method

    if weights is None:
        torch.manual_seed(cfg.seed)
        local = cfg.model_copy(deep=True)
        local.model.pretrained = None
        return build_method(local, num_classes).to(device).eval()
    return load_model(cfg, weights, num_classes=num_classes, device=device)


def _batches(cfg: Any, records: Sequence[Any], device: torch.device):
    from reidkit.data.loader import build_test_loader

    loader = build_test_loader(cfg, list(records))
    for batch in loader:
        if hasattr(loader, "prepare"):
            batch = loader.prepare(batch, device)
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def analyze_mgre(
    cfg: Any,
    out_dir: str | Path,
    weights: str | Path | None = None,
    baseline_cfg: Any = None,
    baseline_weights: str | Path | None = None,
    num_images: int = 6,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Write the MGRe analyses of ``weights`` (``None``: the initialised model) to ``out_dir``.

    Args:
        cfg: an MGRe config (its dataset must have keypoints for the IoU / keypoint boxes).
        out_dir: output folder (created).
        baseline_cfg, baseline_weights: a baseline (e.g. BoT) for the CAM comparison.
        num_images: training images (random, ``seed``) in the CAM and region grids.
        max_batches: limit the IoU to the first batches of each test split (None: all).

    Returns:
        ``{"region_iou": {stage: IoU}, "region_iou_per_region": {...}, "images": n, ...}``
        (also written as ``region_iou.json``).
    """
    from reidkit.data.datasets import dataset_from_config
    from reidkit.data.keypoints import normalize_keypoints
    from reidkit.data.loader import batch_keys
    from reidkit.methods.mgre import (
        REGION_NAMES,
        REGION_STAGE,
        STAGE_COLORS,
        STAGE_REGIONS,
        MGRe,
        iou_means,
        keypoint_boxes,
        region_iou_sums,
    )
    from reidkit.viz.grid import overlay_map, save_image_grid, to_uint8_images
    from reidkit.viz.report import draw_boxes

    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset = dataset_from_config(cfg.data)
    model = _load(cfg, weights, dataset.num_train_pids, device)
    if not isinstance(model, MGRe):
        raise ValueError(f"reidkit analyze mgre: {cfg.model.name} is not an MGRe model")
    has_kp = "keypoints" in batch_keys(dataset.query) and "keypoints" in batch_keys(dataset.gallery)
    summary: dict[str, Any] = {
        "weights": str(weights) if weights is not None else "initialisation (cfg.seed)",
        "dataset": dataset.name,
    }

    # ---- region IoU on the test split
    if has_kp and model.located_source:
        from reidkit.data.loader import build_test_loader

        sums: dict[str, tuple[float, int]] = {}
        for split in (dataset.query, dataset.gallery):
            loader = build_test_loader(cfg, split)
            for name, (t, c) in region_iou_sums(model, loader, device, max_batches).items():
                t0, c0 = sums.get(name, (0.0, 0))
                sums[name] = (t0 + t, c0 + c)
        summary["region_iou"] = {str(k): v for k, v in iou_means(sums).items()}
        summary["region_iou_per_region"] = iou_means(sums, per_region=True)
        summary["region_iou_pairs"] = {name: c for name, (_, c) in sums.items()}
        summary["region_iou_split"] = "query + gallery" + (
            f" (first {max_batches} batches each)" if max_batches else ""
        )

    # ---- images for the grids: training images with their identities (Fig. 4)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(dataset.train), generator=g)[:num_images].tolist()
    records = [dataset.train[i] for i in pick]
    batch = next(_batches(cfg, records, device))
    images, pids = batch["images"], batch["pids"]
    pixels = to_uint8_images(images, cfg.data.mean, cfg.data.std)
    colours = [STAGE_COLORS[REGION_STAGE[n]] for n in REGION_NAMES]

    if model.located_source:
        kp = batch.get("keypoints")
        boxes = model.predict_boxes(images, kp).cpu()
        rows = []
        for j in range(len(records)):
            row = [pixels[j], draw_boxes(pixels[j], boxes[j], colours)]
            if kp is not None:
                kp_norm = normalize_keypoints(kp[j : j + 1].float().cpu(), *images.shape[-2:])
                target = torch.full((len(REGION_NAMES), 4), float("nan"))
                for s, region_kps in model.located_region_keypoints().items():
                    idx = [REGION_NAMES.index(n) for n in STAGE_REGIONS[s]]
                    t, valid = keypoint_boxes(kp_norm, region_kps, model.opts.loc_margin)
                    target[idx] = torch.where(valid[0, :, None], t[0], float("nan"))
                row.append(draw_boxes(pixels[j], target, colours))
            rows.append(row)
        cols = ["image", "predicted"] + (["keypoints"] if kp is not None else [])
        save_image_grid(rows, out / "regions.png", col_labels=cols)

    # ---- per-stage CAMs (Fig. 4)
    cam_rows, row_labels = [], []
    mgre_maps = model.stage_activation_maps(images, pids, batch.get("keypoints"))
    keys = [k for k in ("stage1", "stage2", "stage3", "stage4", "final") if k in mgre_maps]
    base_maps = None
    if baseline_cfg is not None:
        baseline = _load(baseline_cfg, baseline_weights, dataset.num_train_pids, device)
        base_maps = baseline_stage_maps(baseline, images, pids)
    for j in range(len(records)):
        cam_rows.append([pixels[j]] + [overlay_map(pixels[j], mgre_maps[k][j].cpu()) for k in keys])
        row_labels.append(f"MGRe\npid {int(pids[j])}")
        if base_maps is not None:
            cam_rows.append(
                [pixels[j]] + [overlay_map(pixels[j], base_maps[k][j].cpu()) for k in keys]
            )
            row_labels.append(f"{baseline_cfg.model.name}\npid {int(pids[j])}")
    save_image_grid(cam_rows, out / "cams.png", row_labels=row_labels, col_labels=["image", *keys])
    summary["images"] = len(records)
    (out / "region_iou.json").write_text(json.dumps(summary, indent=2))

    # ---- index.html
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>MGRe analysis</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:18px} td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:right} table{border-collapse:collapse} img{max-width:100%}"
        "</style></head><body data-ready='1'>",
        f"<h1>MGRe analysis</h1><p>{html.escape(summary['weights'])} on "
        f"{html.escape(dataset.name)}</p>",
    ]
    if "region_iou" in summary:
        rows_html = "".join(
            f"<tr><th>stage {s}</th><td>{v:.3f}</td></tr>" for s, v in summary["region_iou"].items()
        )
        rows_html += "".join(
            f"<tr><th>{html.escape(k)}</th><td>{v:.3f}</td></tr>"
            for k, v in summary["region_iou_per_region"].items()
        )
        parts.append(
            f"<h2>Region IoU with the keypoint boxes ({summary['region_iou_split']})</h2>"
            f"<table>{rows_html}</table>"
        )
    if (out / "regions.png").is_file():
        parts.append(
            "<h2>Regions</h2><p>stage 1 red, stage 2 green, stage 3 blue</p>"
            f"<img src='{_png_uri(out / 'regions.png')}' alt='regions'>"
        )
    parts.append(
        "<h2>Per-stage class activation maps (Fig. 4)</h2><p>Grad-CAM of each part's logit of "
        "the image's identity on the map the part reads; final: Eq. 6-weighted mean"
        + ("; baseline rows: its logit on layer1..layer4 and their mean" if base_maps else "")
        + f"</p><img src='{_png_uri(out / 'cams.png')}' alt='class activation maps'>"
    )
    parts.append("</body></html>")
    (out / "index.html").write_text("".join(parts), encoding="utf-8")
    return summary
