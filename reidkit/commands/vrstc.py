"""``reidkit vrstc``: VRSTC's pipeline (occlusion-free video re-ID, docs/vrstc.md).

    reidkit vrstc detect   -c CONFIG [--reid-weights R] --out DIR
    reidkit vrstc complete -c CONFIG --weights W [--reid-weights R] [--scores S] --out DIR [--overwrite]
    reidkit vrstc quality  -c CONFIG --weights W [--out FILE.json]
    reidkit vrstc page     -c CONFIG --weights W [--scores S] --out FILE.html

CONFIG is the STCnet config (``model.name: stcnet``; its ``data`` section names the video
dataset, ``model.stcnet`` holds ``tau``, ``num_regions`` and ``reid_weights``, the trained
re-ID network used to locate occlusion); W is the STCnet run's checkpoint.

``detect`` scores every region of every frame (``DIR/scores.json``); on a dataset with
ground truth (the synthetic video set) it also writes the precision / recall of the
detected regions (``DIR/detection.json``) and the tau curve (``DIR/tau_curve.png``).
``complete`` writes a completed copy of the dataset in the same layout under DIR (the
original is never modified; an existing DIR is refused without ``--overwrite``), with
``DIR/vrstc_completion.json`` (which regions of which frames were replaced, their scores)
and ``DIR/scores.json``; train the re-ID network on it with ``data.root=DIR``.
``quality`` measures the completion inside truly occluded regions against the ground
truth (synthetic set); ``page`` writes the visual page.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from reidkit.commands import _common

__all__ = ["add_parser"]


def _options(cfg: Any, args: argparse.Namespace) -> tuple[float, int, str | None]:
    """``tau``, ``num_regions`` and the re-ID weights: the command line, else
    ``model.stcnet``, else the defaults."""
    opts = _stcnet_options(cfg)
    tau = args.tau if getattr(args, "tau", None) is not None else opts.tau
    regions = (
        args.num_regions if getattr(args, "num_regions", None) is not None else opts.num_regions
    )
    reid = getattr(args, "reid_weights", None) or opts.reid_weights
    return float(tau), int(regions), reid


def _stcnet_options(cfg: Any) -> Any:
    from reidkit.methods.vrstc import STCNetOptions, method_options

    return method_options(cfg, STCNetOptions, "stcnet")


def _threshold(cfg: Any, args: argparse.Namespace, scores: dict) -> tuple[float, dict]:
    """The threshold applied to ``scores`` (all the splits at hand) and how it was chosen:
    ``--tau-rule`` / ``model.stcnet.tau_rule`` ``fixed`` (tau) or ``robust``
    (median - tau_mad * MAD of the scores)."""
    from reidkit.methods.vrstc import resolve_tau

    opts = _stcnet_options(cfg)
    tau, _, _ = _options(cfg, args)
    rule = getattr(args, "tau_rule", None) or opts.tau_rule
    k = getattr(args, "tau_mad", None) or opts.tau_mad
    resolved = resolve_tau([x for v in scores.values() for x in v], tau, rule, k)
    info = {"tau_rule": rule, "tau_given": tau, "tau_mad": k if rule == "robust" else None}
    if rule == "robust":
        print(f"tau (robust: median - {k} MAD of {sum(len(v) for v in scores.values())} "
              f"tracklets' region scores) = {resolved:.4f}")  # fmt: skip
    return resolved, info


def _dataset(cfg: Any) -> Any:
    from reidkit.data.datasets.video import is_video_dataset, video_dataset_from_config

    if not is_video_dataset(cfg.data.dataset):
        raise ValueError(
            f"data.dataset={cfg.data.dataset!r} is not a video dataset: VRSTC works on "
            "tracklets (mars, ilidsvid, prid2011, dukemtmc_video, synth_video)"
        )
    return video_dataset_from_config(cfg.data)


def _device(args: argparse.Namespace, cfg: Any) -> Any:
    from reidkit.engine.distributed import resolve_device

    return resolve_device(args.device or cfg.device, 0)


def _detect(
    cfg: Any, dataset: Any, reid: str | None, regions: int, splits: list[str], args: Any
) -> dict:
    from reidkit.analysis.vrstc import detect_dataset
    from reidkit.methods.vrstc import load_reid_network

    if not reid:
        raise ValueError(
            "no re-ID network to locate occlusion: pass --reid-weights R (the temporal "
            "baseline's checkpoint) or set model.stcnet.reid_weights"
        )
    device = _device(args, cfg)
    net = load_reid_network(reid, device)
    print(f"occlusion scoring with {net.path} ({net.cfg.model.name}, {regions} regions)")
    return detect_dataset(
        net.net,
        net.cfg,
        dataset,
        regions,
        splits,
        device=device,
        num_workers=cfg.data.num_workers,
        progress=not args.no_progress,
        aligned=args.pooling == "aligned",
        feature=args.region_feature,
    )


def _has_truth(dataset: Any) -> bool:
    records = [r for s in ("train", "query", "gallery") for r in getattr(dataset, s)]
    return bool(records) and all(r.extras.get("masks") is not None for r in records)


def _cmd_detect(args: argparse.Namespace) -> int:
    from reidkit.analysis.vrstc import (
        detection_report,
        plot_tau_curve,
        scores_document,
        truth_coverage,
        write_json,
    )

    cfg = _common.load_config_from_args(args)
    _, regions, reid = _options(cfg, args)
    dataset = _dataset(cfg)
    out = Path(args.out)
    if args.scores:  # re-threshold / re-measure existing scores, no network
        scores = _read_scores_file(args.scores, dataset, regions, args.splits)
    else:
        scores = _detect(cfg, dataset, reid, regions, args.splits, args)
    tau, info = _threshold(cfg, args, scores)
    meta = {"region_feature": args.region_feature, "pooling": args.pooling, **info}
    path = write_json(
        out / "scores.json", scores_document(dataset, scores, tau, regions, reid, **meta)
    )
    flagged = sum(int((s < tau).any(dim=1).sum()) for v in scores.values() for s in v)
    frames = sum(s.shape[0] for v in scores.values() for s in v)
    print(f"scores: {path} ({flagged} of {frames} frames have a region below tau={tau:.4f})")
    if _has_truth(dataset):
        coverage = {
            split: [truth_coverage(r, regions) for r in getattr(dataset, split)] for split in scores
        }
        report = detection_report(scores, coverage, tau, args.coverage)
        report.update(info)
        write_json(out / "detection.json", report)
        plot_tau_curve(report, out / "tau_curve.png")
        at = report["at_tau"]
        print(
            f"against the ground truth (region occluded when the occluder covers >= "
            f"{args.coverage:.0%} of it): precision {at['precision']:.3f}, recall "
            f"{at['recall']:.3f}, F1 {at['f1']:.3f} at tau={tau:.4f} ({at['occluded']} occluded "
            f"of {report['regions']} regions, {at['flagged']} flagged)"
        )
        print(f"tau curve: {out / 'tau_curve.png'}, {out / 'detection.json'}")
    return 0


def _load_stcnet(cfg: Any, weights: str, device: Any) -> Any:
    """The STCnet method with ``weights`` (its run's checkpoint), without the ID guider."""
    from reidkit.engine.checkpoint import extract_state_dict, load_checkpoint, resolve_weights
    from reidkit.methods import build_method

    if cfg.model.name != "stcnet":
        raise ValueError(
            f"-c CONFIG must be an STCnet config (model.name: stcnet), got '{cfg.model.name}'"
        )
    path = resolve_weights(weights)
    cfg = cfg.model_copy(deep=True)
    cfg.model.stcnet.id_weight = 0.0  # the guider only trains; not needed to complete
    method = build_method(cfg, 0)
    state = extract_state_dict(load_checkpoint(path))
    try:
        method.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not weights of this STCnet config: {exc}") from None
    return method.to(device).eval()


def _read_scores_file(path: str, dataset: Any, regions: int, splits: list[str]) -> dict:
    from reidkit.analysis.vrstc import read_scores

    doc, scores = read_scores(path, dataset)
    if int(doc.get("num_regions", regions)) != regions:
        raise ValueError(f"{path}: scored with {doc['num_regions']} regions, not {regions}")
    missing = [s for s in splits if s not in scores]
    if missing:
        raise ValueError(f"{path}: no scores for split(s) {missing}")
    return {s: scores[s] for s in splits}


def _scores_for(cfg: Any, dataset: Any, args: Any, splits: list[str]) -> dict:
    """Scores of ``splits``: from ``--scores``, else detected now."""
    _, regions, reid = _options(cfg, args)
    if args.scores:
        return _read_scores_file(args.scores, dataset, regions, splits)
    return _detect(cfg, dataset, reid, regions, splits, args)


def _cmd_complete(args: argparse.Namespace) -> int:
    from reidkit.analysis.vrstc import complete_dataset, scores_document, write_json

    cfg = _common.load_config_from_args(args)
    tau, regions, reid = _options(cfg, args)
    dataset = _dataset(cfg)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} already exists: pass --overwrite to replace it")
    splits = ["train", "query", "gallery"]
    scores = _scores_for(cfg, dataset, args, splits)
    tau, info = _threshold(cfg, args, scores)
    device = _device(args, cfg)
    stc = _load_stcnet(cfg, args.weights, device)
    summary = complete_dataset(
        stc,
        dataset,
        scores,
        out,
        cfg.data.root,
        tau=tau,
        output=args.output,
        overwrite=args.overwrite,
        link=args.link,
        device=device,
        batch_size=args.batch_size,
        num_workers=cfg.data.num_workers,
        progress=not args.no_progress,
        jpeg_quality=args.jpeg_quality,
        meta={
            "weights": str(args.weights),
            "reid_weights": reid,
            "scores_file": args.scores,
            **info,
        },
    )
    write_json(out / "scores.json", scores_document(dataset, scores, tau, regions, reid, **info))
    for split, c in summary["counts"].items():
        print(
            f"{split}: {c['replaced_frames']} of {c['frames']} frames completed "
            f"({c['replaced_regions']} regions, {c['tracklets_with_replacements']} tracklets"
            + (
                f", {c['without_reference']} without an unoccluded frame: x1"
                if c["without_reference"]
                else ""
            )
            + ")"
        )
    print(
        f"completed copy: {out / summary['dataset_dir']} (train / test on it with "
        f"data.root={out}); {out / 'vrstc_completion.json'}"
    )
    return 0


def _cmd_quality(args: argparse.Namespace) -> int:
    from reidkit.analysis.vrstc import completion_quality, format_quality_table, write_json

    cfg = _common.load_config_from_args(args)
    dataset = _dataset(cfg)
    if not _has_truth(dataset):
        raise ValueError(
            f"{dataset.name}: no ground-truth masks; completion quality needs the synthetic "
            "video set (reidkit synth --video)"
        )
    device = _device(args, cfg)
    stc = _load_stcnet(cfg, args.weights, device)
    result = completion_quality(
        stc, dataset, args.splits, args.coverage, device, progress=not args.no_progress
    )
    result["weights"] = str(args.weights)
    print(
        f"{result['frames']} truly occluded frames in {result['tracklets']} tracklets "
        f"({', '.join(args.splits)}), {result['size'][0]}x{result['size'][1]}, regions with "
        f">= {args.coverage:.0%} occluder coverage; L1 on 0-255, PSNR in dB:"
    )
    print(format_quality_table(result))
    if args.out:
        print(f"written: {write_json(args.out, result)}")
    return 0


def _cmd_page(args: argparse.Namespace) -> int:
    from reidkit.analysis.vrstc import page_tracklets
    from reidkit.viz.vrstc import render_vrstc_page, write_vrstc_page

    cfg = _common.load_config_from_args(args)
    tau, regions, reid = _options(cfg, args)
    dataset = _dataset(cfg)
    if args.scores:  # the threshold from every split of the file, as `complete` does
        every = _read_scores_file(args.scores, dataset, regions, ["train", "query", "gallery"])
        tau, _ = _threshold(cfg, args, every)
        scores = {s: every[s] for s in args.splits}
    else:
        scores = _scores_for(cfg, dataset, args, args.splits)
        tau, _ = _threshold(cfg, args, scores)
    device = _device(args, cfg)
    stc = _load_stcnet(cfg, args.weights, device)
    tracklets = page_tracklets(
        stc, dataset, scores, tau, args.tracklets, args.frames, args.splits, args.coverage, device
    )
    summary = {
        "dataset": f"{dataset.name} ({getattr(dataset, 'dataset_dir', dataset.root)})",
        "STCnet weights": args.weights,
        "re-ID network": reid or "(scores file)",
        "tau / regions": f"{tau:.4f} / {regions}",
        "input size": f"{cfg.data.height}x{cfg.data.width}",
    }
    page = render_vrstc_page(
        tracklets,
        subtitle=f"{len(tracklets)} sample tracklets of {', '.join(args.splits)}",
        summary=summary,
    )
    path = write_vrstc_page(args.out, page)
    print(f"page: {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub,
        "vrstc",
        help="VRSTC: detect occlusion, complete it, write the completed dataset",
        doc=__doc__,
    )
    vsub = p.add_subparsers(dest="vrstc_command", metavar="STEP")

    def common(q: argparse.ArgumentParser, weights: bool) -> None:
        _common.add_config_arguments(q, weights=weights, weights_help="the STCnet run's checkpoint")
        q.add_argument(
            "--reid-weights", default=None, help="re-ID network (default model.stcnet.reid_weights)"
        )
        q.add_argument(
            "--tau",
            type=float,
            default=None,
            help="region score threshold (default model.stcnet.tau, 0.89)",
        )
        q.add_argument(
            "--tau-rule",
            choices=["fixed", "robust"],
            default=None,
            help="fixed: tau as given (default model.stcnet.tau_rule); robust: median - "
            "--tau-mad x MAD of all region scores (label-free)",
        )
        q.add_argument(
            "--tau-mad",
            type=float,
            default=None,
            help="k of the robust rule (default model.stcnet.tau_mad, 3)",
        )
        q.add_argument(
            "--num-regions",
            type=int,
            default=None,
            help="horizontal regions (default model.stcnet.num_regions, 3)",
        )
        q.add_argument(
            "--pooling",
            choices=["aligned", "rows"],
            default="aligned",
            help="region features: map rows weighted by their overlap with the pixel regions "
            "(default) or a partition of the map rows",
        )
        q.add_argument(
            "--region-feature",
            choices=["test", "post_bn", "pre_bn"],
            default="test",
            help="region features: the re-ID config's test.feature (default), BNNeck's "
            "post-BN feature, or the pooled map (pre-BN)",
        )
        q.add_argument(
            "--coverage",
            type=float,
            default=0.2,
            help="ground truth: a region is truly occluded when the occluder covers this share "
            "of its pixels (default 0.2)",
        )
        q.add_argument("--device", default=None, help="override cfg.device")
        q.add_argument("--no-progress", action="store_true", help="no progress bars")
        _common.add_debug_argument(q)

    q = vsub.add_parser(
        "detect", help="score every region of every frame (+ P/R and tau curve on ground truth)"
    )
    common(q, weights=False)
    q.add_argument(
        "--out", required=True, help="output folder (scores.json, detection.json, tau_curve.png)"
    )
    q.add_argument(
        "--scores", default=None, help="re-threshold / re-measure this scores.json (no network)"
    )
    q.add_argument(
        "--splits",
        nargs="+",
        default=["train", "query", "gallery"],
        choices=["train", "query", "gallery"],
    )
    q.set_defaults(vrstc_func=_cmd_detect)

    q = vsub.add_parser("complete", help="write a completed copy of the dataset")
    common(q, weights=True)
    q.add_argument(
        "--out", required=True, help="folder of the completed copy (refused if it exists)"
    )
    q.add_argument(
        "--scores", default=None, help="scores.json of `vrstc detect` (default: detect now)"
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    q.add_argument(
        "--link", action="store_true", help="hard-link unchanged files instead of copying them"
    )
    q.add_argument(
        "--output",
        choices=["x2", "x1"],
        default="x2",
        help="which completion replaces the regions (default x2)",
    )
    q.add_argument("--batch-size", type=int, default=16, help="frames per STCnet batch")
    q.add_argument(
        "--jpeg-quality", type=int, default=95, help="quality of re-written JPEG frames (95)"
    )
    q.set_defaults(vrstc_func=_cmd_complete)

    q = vsub.add_parser(
        "quality", help="completion quality against the ground truth (synthetic set)"
    )
    common(q, weights=True)
    q.add_argument("--out", default=None, help="write the result as JSON here")
    q.add_argument(
        "--splits", nargs="+", default=["query", "gallery"], choices=["train", "query", "gallery"]
    )
    q.set_defaults(vrstc_func=_cmd_quality)

    q = vsub.add_parser("page", help="visual page: occluded frames, regions, x1, x2, ground truth")
    common(q, weights=True)
    q.add_argument("--out", required=True, help="the HTML file to write")
    q.add_argument(
        "--scores", default=None, help="scores.json of `vrstc detect` (default: detect now)"
    )
    q.add_argument(
        "--splits", nargs="+", default=["query", "gallery"], choices=["train", "query", "gallery"]
    )
    q.add_argument("--tracklets", type=int, default=8, help="sample tracklets (default 8)")
    q.add_argument(
        "--frames", type=int, default=6, help="occluded frames shown per tracklet (default 6)"
    )
    q.set_defaults(vrstc_func=_cmd_page)

    def run(args: argparse.Namespace) -> int:
        fn = getattr(args, "vrstc_func", None)
        if fn is None:
            p.print_help()
            return 2
        return fn(args)

    p.set_defaults(func=run)
