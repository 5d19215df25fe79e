"""``reidkit report``: an explainable ranking report (self-contained HTML).

    reidkit report -c CONFIG --weights runs/x/checkpoints/best.pt --out DIR [--queries 12] [--topk 10]

Evaluates the weights on the config's query/gallery split, then writes ``DIR/report.html``:
summary metrics, the CMC curve, and for each chosen query (about half of them rank-1
misses, ``--failure-fraction``) its top-k gallery images with green/red borders for
true/false matches and ranking activation map overlays (CAMA Eq. 10): the aggregate map
and, for multi-branch models such as CAMA, one map per branch, switchable in the page.
For methods that locate body regions (MGRe) the page also shows the predicted regions (all
seven boxes, coloured by stage) and, when the dataset has keypoints, the keypoint boxes
they are trained towards, with the mean IoU per stage over the shown images.
The file embeds every image (base64) and needs no network.

``--gradcam TARGET`` adds a Grad-CAM view of every image (:mod:`reidkit.viz.explain`):
``class`` (its predicted identity's logit), ``part:NAME`` (one part classifier, e.g.
SCR's ``p2_c1``) or ``pair`` (for each gallery item, what in it matches the query's test
feature; for the query, what matches its rank-1). Models with IANet's spatial IA blocks
get a receptive-field section (the sub-relation maps of a few positions of the first
queries, every block; ``--no-relation`` skips it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reidkit.commands import _common

__all__ = ["add_parser", "run", "write_report"]


def write_report(
    cfg,
    weights: str | Path,
    out_dir: str | Path,
    *,
    num_queries: int = 12,
    topk: int = 10,
    failure_fraction: float = 0.5,
    seed: int = 0,
    device: str | None = None,
    num_classes: int | None = None,
    progress: bool = True,
    print_table: bool = True,
    gradcam: str | None = None,
    gradcam_layer: str | None = None,
    relation: bool = True,
) -> Path:
    """Evaluate ``weights`` on ``cfg``'s query / gallery split and write
    ``out_dir/report.html``; returns its path (the body of ``reidkit report``).

    ``gradcam``: a Grad-CAM target spec (``class``, ``part:NAME``, ``pair``) for an extra
    view of every image, at ``gradcam_layer`` (default: the method's); ``relation``: add
    IANet's receptive-field section when the model has spatial IA blocks."""
    import torch

    from reidkit.data.datasets import dataset_from_config
    from reidkit.data.loader import build_test_loader
    from reidkit.engine import evaluate_model, load_model
    from reidkit.engine.distributed import resolve_device
    from reidkit.engine.evaluator import result_distances
    from reidkit.viz.report import build_ranking_report, select_queries

    if num_queries < 1 or topk < 1:
        raise ValueError(f"--queries and --topk must be >= 1 (got {num_queries}, {topk})")
    if not 0.0 <= failure_fraction <= 1.0:
        raise ValueError(f"--failure-fraction must be in [0, 1], got {failure_fraction}")
    dev = resolve_device(device or cfg.device, 0)
    # the weights first: a wrong file is reported before the dataset is read
    model = load_model(cfg, weights, num_classes=num_classes, device=dev)
    dataset = dataset_from_config(cfg.data)
    _common.require_image_files(dataset, "reidkit report")
    from reidkit.engine.video_eval import is_video_dataset

    if is_video_dataset(dataset):
        raise ValueError(
            f"reidkit report shows image rankings; '{dataset.name}' is a video (tracklet) "
            "dataset: use reidkit eval --mode all (and --save-features) for it"
        )
    _common.note_skipped_images(dataset)
    result = evaluate_model(cfg, model, dataset, dev, progress=progress)
    q, g = result.query, result.gallery
    distmat = result_distances(cfg, model, result)
    if print_table:
        for note in result.notes:
            print(note)
        print(result.table())

    # single-process loading of the few images of each ranking row
    row_cfg = cfg.model_copy(deep=True)
    row_cfg.data.num_workers = 0

    def load_images(q_idx: list[int], g_idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        def load(records) -> torch.Tensor:
            if not records:
                return torch.empty(0, 3, cfg.data.height, cfg.data.width)
            return torch.cat([b["images"] for b in build_test_loader(row_cfg, records)])

        return load([dataset.query[i] for i in q_idx]), load([dataset.gallery[i] for i in g_idx])

    def load_keypoints(q_idx: list[int], g_idx: list[int]):
        """Pixel keypoints of the images as the test loader transforms them (or None)."""

        def load(records):
            batches = list(build_test_loader(row_cfg, records))
            if not all("keypoints" in b for b in batches):
                return None
            return torch.cat([b["keypoints"] for b in batches])

        return load([dataset.query[i] for i in q_idx]), load([dataset.gallery[i] for i in g_idx])

    subtitle = (
        f"weights {weights} · {len(dataset.query)} queries, {len(dataset.gallery)} gallery images"
    )
    if "branch_overlap" in result.metrics:
        overlap = result.metrics["branch_overlap"]
        subtitle += f" · branch overlap (mean top-k CAM IoU, first queries) {overlap:.3f}"
    extra_views = [_gradcam_view(gradcam, gradcam_layer, cfg, model)] if gradcam else []
    sections = []
    if relation:
        chosen, _ = select_queries(
            distmat, q.pids, g.pids, q.camids, g.camids, num_queries, failure_fraction, seed
        )
        section = _relation_section(cfg, model, load_images, chosen[:6], dev)
        if section is not None:
            sections.append(section)
    out = Path(out_dir) / "report.html"
    build_ranking_report(
        model,
        load_images,
        distmat,
        q.pids,
        g.pids,
        q.camids,
        g.camids,
        metrics=result.metrics,
        cmc=result.cmc.tolist(),
        out_path=out,
        num_queries=num_queries,
        topk=topk,
        failure_fraction=failure_fraction,
        feature=cfg.test.feature,
        mean=cfg.data.mean,
        std=cfg.data.std,
        device=dev,
        seed=seed,
        title=f"{cfg.model.name} on {dataset.name}: ranking report",
        subtitle=subtitle,
        load_keypoints=load_keypoints,
        extra_views=extra_views,
        sections=sections,
    )
    return out


def run(args: argparse.Namespace) -> int:
    cfg = _common.load_config_from_args(args)
    weights = _common.weights_from_args(args)
    out = write_report(
        cfg,
        weights,
        args.out,
        num_queries=args.queries,
        topk=args.topk,
        failure_fraction=args.failure_fraction,
        seed=args.seed,
        device=args.device,
        num_classes=args.num_classes,
        progress=not args.no_progress,
        gradcam=args.gradcam,
        gradcam_layer=args.gradcam_layer,
        relation=not args.no_relation,
    )
    print(f"report: {out}")
    return 0


def _gradcam_view(spec: str, layer: str | None, cfg, model):
    """The report's Grad-CAM overlay for target ``spec`` at ``layer``."""
    import torch

    from reidkit.viz.explain import (
        method_grad_cam,
        method_pair_grad_cam,
        method_similarity_cam,
        parse_cam_target,
        similarity_metric,
    )
    from reidkit.viz.report import ExtraView

    target = parse_cam_target(spec)
    if target.kind != "pair":

        def compute(batch, gallery):
            return method_grad_cam(model, batch, target, layer).maps

        return ExtraView("gradcam", f"Grad-CAM ({target.label})", compute)
    metric = similarity_metric(cfg.test)
    feature = cfg.test.feature

    def compute_pair(batch, gallery):
        with torch.no_grad():
            ref = model.encode({"images": batch[:1]})[feature][0]
        g_maps = method_similarity_cam(model, batch[1:], ref, layer, feature, metric)
        q_map, _, _ = method_pair_grad_cam(model, batch[:1], batch[1:2], layer, feature, metric)
        return torch.cat([q_map, g_maps])

    return ExtraView("gradcam", "Grad-CAM (match with the query)", compute_pair)


def _relation_section(cfg, model, load_images, queries: list[int], device):
    """``(title, html)`` with IANet's receptive fields of ``queries``, or ``None`` when the
    model has no spatial IA block."""
    import numpy as np

    from reidkit.viz.grid import enlarge_images, to_uint8_images
    from reidkit.viz.relation import find_spatial_ia, relation_grid, relation_maps
    from reidkit.viz.report import to_data_uri

    blocks = [name for name, _ in find_spatial_ia(model)]
    if not blocks or not queries:
        return None
    images, _ = load_images(queries, [])
    images = images.to(device)
    pixels = enlarge_images(to_uint8_images(images, cfg.data.mean, cfg.data.std))
    parts = []
    for block in blocks:
        maps, cells = relation_maps(model, images, module=block)
        grid = relation_grid(pixels, maps.cpu(), cells, row_labels=[f"query {i}" for i in queries])
        uri = to_data_uri(np.asarray(grid), fmt="PNG")
        parts.append(
            f"<p><b>{block}</b> ({maps.shape[-2]}x{maps.shape[-1]} grid): for each marked "
            "position, the cells it aggregates (its row of the relation R, min-max scaled)</p>"
            f"<img src='{uri}' alt='{block}'>"
        )
    return ("IANet receptive fields (spatial IA sub-relation maps)", "".join(parts))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub, "report", help="HTML ranking report with ranking activation maps", doc=__doc__
    )
    _common.add_config_arguments(p, weights=True)
    p.add_argument("--out", required=True, help="output folder (report.html is written there)")
    p.add_argument("--queries", type=int, default=12, help="number of queries shown (default 12)")
    p.add_argument("--topk", type=int, default=10, help="gallery images per query (default 10)")
    p.add_argument(
        "--failure-fraction",
        type=float,
        default=0.5,
        help="share of chosen queries that are rank-1 misses (default 0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the query choice")
    p.add_argument(
        "--gradcam",
        default=None,
        metavar="TARGET",
        help="add a Grad-CAM view: class, class:K, part:NAME, part:NAME:K or pair",
    )
    p.add_argument("--gradcam-layer", default=None, help="Grad-CAM layer (default: the method's)")
    p.add_argument("--no-relation", action="store_true", help="no IANet receptive-field section")
    p.add_argument("--device", default=None, help="override cfg.device (cpu, cuda, cuda:1)")
    _common.add_num_classes_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
