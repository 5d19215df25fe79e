"""``reidkit report``: an explainable ranking report (self-contained HTML).

    reidkit report -c CONFIG --weights runs/x/checkpoints/best.pt --out DIR [--queries 12] [--topk 10]

Evaluates the weights on the config's query/gallery split, then writes ``DIR/report.html``:
summary metrics, the CMC curve, and for each chosen query (about half of them rank-1
misses, ``--failure-fraction``) its top-k gallery images with green/red borders for
true/false matches and ranking activation map overlays (CAMA Eq. 10): the aggregate map
and, for multi-branch models such as CAMA, one map per branch, switchable in the page.
The file embeds every image (base64) and needs no network.
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
) -> Path:
    """Evaluate ``weights`` on ``cfg``'s query / gallery split and write
    ``out_dir/report.html``; returns its path (the body of ``reidkit report``)."""
    import torch

    from reidkit.data.datasets import dataset_from_config
    from reidkit.data.loader import build_test_loader
    from reidkit.engine import evaluate_model, load_model
    from reidkit.engine.distributed import resolve_device
    from reidkit.engine.evaluator import result_distances
    from reidkit.viz.report import build_ranking_report

    if num_queries < 1 or topk < 1:
        raise ValueError(f"--queries and --topk must be >= 1 (got {num_queries}, {topk})")
    if not 0.0 <= failure_fraction <= 1.0:
        raise ValueError(f"--failure-fraction must be in [0, 1], got {failure_fraction}")
    dev = resolve_device(device or cfg.device, 0)
    # the weights first: a wrong file is reported before the dataset is read
    model = load_model(cfg, weights, num_classes=num_classes, device=dev)
    dataset = dataset_from_config(cfg.data)
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
            return torch.cat([b["images"] for b in build_test_loader(row_cfg, records)])

        return load([dataset.query[i] for i in q_idx]), load([dataset.gallery[i] for i in g_idx])

    subtitle = (
        f"weights {weights} · {len(dataset.query)} queries, {len(dataset.gallery)} gallery images"
    )
    if "branch_overlap" in result.metrics:
        overlap = result.metrics["branch_overlap"]
        subtitle += f" · branch overlap (mean top-k CAM IoU, first queries) {overlap:.3f}"
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
    )
    print(f"report: {out}")
    return 0


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
    p.add_argument("--device", default=None, help="override cfg.device (cpu, cuda, cuda:1)")
    _common.add_num_classes_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
