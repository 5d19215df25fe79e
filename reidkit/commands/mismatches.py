"""``reidkit mismatches``: browse and tag every rank-1 mismatch (SCR supplementary, Sec. 2).

    reidkit mismatches -c CONFIG --weights runs/x/checkpoints/best.pt --out DIR [--tags FILE]

Evaluates the weights on the config's query / gallery split (``test.*``: flip, metric,
re-ranking), then writes ``DIR/mismatches.html``: every valid query whose rank-1 gallery
image has another identity, with that wrong rank-1, its best true match, both distances
and the true match's rank. In the page, keys 1-6 tag the selected mismatch as
misalignment, annotation error, detector false positive (distractor), occlusion, very
similar clothes or unsure (0 clears, j / k move, n jumps to the next untagged one); the
counts update as you go, tags survive a reload of the page (browser storage), and "save
tags" downloads them as a JSON file. Give that file to a later run with ``--tags FILE``:
the page starts from it, and the command prints the counts per category (the paper's
list). On the synthetic set the command also prints the share of rank-1 errors that
retrieve another member of the query's look-alike family.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reidkit.commands import _common

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    from reidkit.analysis.families import family_error_share, family_of_pids, synth_meta_for
    from reidkit.data.datasets import dataset_from_config
    from reidkit.engine import evaluate_model, load_model
    from reidkit.engine.distributed import resolve_device
    from reidkit.engine.evaluator import result_distances
    from reidkit.viz.mismatches import (
        MISMATCH_CATEGORIES,
        load_mismatch_tags,
        mismatch_key,
        rank1_mismatches,
        tag_counts,
        write_mismatch_browser,
    )

    cfg = _common.load_config_from_args(args)
    weights = _common.weights_from_args(args)
    tags = load_mismatch_tags(args.tags) if args.tags else None
    out = Path(args.out) / "mismatches.html"
    if args.tags and out.resolve() == Path(args.tags).resolve():
        raise ValueError(f"--out would overwrite the tags file {args.tags}")
    device = resolve_device(args.device or cfg.device, 0)
    dataset = dataset_from_config(cfg.data)
    _common.require_image_files(dataset, "reidkit mismatches")
    model = load_model(cfg, weights, num_classes=args.num_classes, device=device)
    result = evaluate_model(cfg, model, dataset, device, progress=not args.no_progress)
    for note in result.notes:
        print(note)
    print(result.table(title=dataset.name))
    q, g = result.query, result.gallery
    distmat = result_distances(cfg, model, result)
    mism = rank1_mismatches(q.pids, g.pids, q.camids, g.camids, distmat=distmat)
    print(
        f"{len(mism)} rank-1 mismatches among {mism.num_valid} valid queries "
        f"(rank-1 {100 * mism.rank1:.1f}%)"
    )
    meta = synth_meta_for(dataset)
    if meta is not None:
        share = family_error_share(mism, q.pids, g.pids, family_of_pids(meta))
        print(f"look-alike families: {share.summary()}")
    path = write_mismatch_browser(
        mism,
        [r.path for r in dataset.query],
        [r.path for r in dataset.gallery],
        q.pids,
        g.pids,
        q.camids,
        g.camids,
        out_path=out,
        tags=args.tags,
        title=f"{cfg.model.name} on {dataset.name}: rank-1 mismatches",
        subtitle=f"weights {weights}",
    )
    print(f"mismatch browser: {path}")
    if tags is not None:
        keys = [
            mismatch_key(
                Path(dataset.query[m.query].path).name, Path(dataset.gallery[m.wrong].path).name
            )
            for m in mism
        ]
        counts = tag_counts(tags, keys)
        labels = dict(MISMATCH_CATEGORIES)
        print(f"tags from {args.tags} on this run's {len(keys)} mismatches:")
        for cid, n in counts.items():
            print(f"  {n:5d}  {labels.get(cid, cid)}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _common.add_command_parser(
        sub, "mismatches", help="HTML browser to tag every rank-1 mismatch", doc=__doc__
    )
    _common.add_config_arguments(p, weights=True)
    p.add_argument("--out", required=True, help="output folder (mismatches.html)")
    p.add_argument("--tags", default=None, help="tags JSON saved by the page in an earlier run")
    p.add_argument("--device", default=None, help="override cfg.device (cpu, cuda, cuda:1)")
    _common.add_num_classes_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _common.add_debug_argument(p)
    p.set_defaults(func=run)
