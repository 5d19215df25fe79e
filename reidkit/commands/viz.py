"""``reidkit viz``: pictures of what a trained model looks at.

    reidkit viz gradcam -c CONFIG --weights W --images a.jpg b.jpg --target part:p2_s1 --out grid.png
    reidkit viz gradcam -c CONFIG --weights W --split query --num 64 --max-rows 8 \\
        --target part:p2_s1 --target part:p2_s2 --target part:p2_c1 --target part:p2_c2 \\
        --out parts.png --json parts.json
    reidkit viz gradcam -c CONFIG --weights W --images q.jpg --gallery g.jpg --target pair --out pair.png
    reidkit viz relation -c CONFIG --weights W --split query --num 6 --out fields.png

``gradcam``: Grad-CAM (Selvaraju et al.) of ``--layer`` (default: the method's, e.g. the
part's branch for SCR, ``backbone.layer4`` for a global model) for each ``--target``:
``class`` / ``class:K`` (the predicted identity's / class K's logit), ``part:NAME`` /
``part:NAME:K`` (one part classifier's logit for the same class, e.g. SCR's stripes
``p2_s1`` and channel groups ``p2_c1``) or ``pair`` (the similarity of each ``--images``
query with the ``--gallery`` image at the same position; with ``--split query`` each query
is paired with its first same-identity gallery image from another camera). The grid has
one row per image and one overlay per target. With several class / part targets the mean
top-k IoU of their maps over all images is printed (``--overlap-k``, default 20 % of the
cells) and, with ``--json``, saved: how much the targets look at the same cells.

``relation``: IANet's receptive fields, the slides' picture: for chosen positions
(``--positions y,x`` as fractions of the height / width; default head, chest, waist,
knees, an arm) the sub-relation map of a spatial IA block (the row of R) over the image.
Every spatial IA block by default (``--block backbone.ia_layer2.0`` picks one).

Images come from ``--images`` (files, resized and normalised like the test images) or
from the config's dataset: ``--split query|gallery|train --num N`` (N images spread
evenly over the split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from reidkit.commands import _common

__all__ = ["add_parser"]


# ------------------------------------------------------------------------ helpers
def _load_model(args: argparse.Namespace):
    from reidkit.engine import load_model
    from reidkit.engine.distributed import resolve_device

    cfg = _common.load_config_from_args(args)
    weights = _common.weights_from_args(args)
    device = resolve_device(args.device or cfg.device, 0)
    model = load_model(cfg, weights, num_classes=args.num_classes, device=device)
    return cfg, model.eval(), device


def _inputs(args: argparse.Namespace, cfg) -> tuple[object, list[str], list]:
    """``(images (B, 3, H, W), names, records or [])`` from ``--images`` or ``--split``."""
    if bool(args.images) == bool(args.split):
        raise ValueError("give either --images FILE... or --split query|gallery|train")
    if args.images:
        return _common.read_images(cfg.data, args.images), [Path(p).name for p in args.images], []
    records, _ = _common.spread_records(cfg.data, args.split, args.num)
    paths = [r.path for r in records]
    return _common.read_images(cfg.data, paths), [Path(p).name for p in paths], records


def _chunks(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


# ------------------------------------------------------------------------ gradcam
def _gradcam(args: argparse.Namespace) -> int:
    import torch

    from reidkit.viz.explain import (
        default_layer,
        method_grad_cam,
        parse_cam_target,
        predicted_classes,
    )
    from reidkit.viz.grad_cam import map_overlap_matrix
    from reidkit.viz.grid import enlarge_images, overlay_maps, save_image_grid, to_uint8_images

    targets = [parse_cam_target(t) for t in (args.target or ["class"])]
    pair = [t for t in targets if t.kind == "pair"]
    if pair and len(targets) > 1:
        raise ValueError("--target pair cannot be combined with class / part targets")
    if args.max_rows < 1 or args.batch_size < 1:
        raise ValueError("--max-rows and --batch-size must be >= 1")
    cfg, model, device = _load_model(args)
    mean, std = cfg.data.mean, cfg.data.std
    images, names, records = _inputs(args, cfg)
    if pair:
        return _pair(args, cfg, model, device, images, names, records)
    if args.gallery:
        raise ValueError("--gallery is only used with --target pair")
    layers = [args.layer or default_layer(model, t) for t in targets]
    maps = [[] for _ in targets]
    classes_all = []
    for sl in _chunks(len(images), args.batch_size):
        batch = images[sl].to(device)
        classes = predicted_classes(model, batch)
        classes_all.append(classes.cpu())
        for i, (t, layer) in enumerate(zip(targets, layers)):
            res = method_grad_cam(
                model, batch, t, layer, classes=None if t.index is not None else classes
            )
            maps[i].append(res.maps.cpu())
    stacked = torch.stack([torch.cat(m) for m in maps])  # (T, B, h, w)
    classes = torch.cat(classes_all)
    shown = slice(0, min(args.max_rows, len(images)))
    pixels = enlarge_images(to_uint8_images(images[shown], mean, std))
    columns = [overlay_maps(pixels, stacked[i, shown]) for i in range(len(targets))]
    rows = [[pixels[b]] + [col[b] for col in columns] for b in range(len(pixels))]
    labels = [f"{names[b]}\nclass {int(classes[b])}" for b in range(len(pixels))]
    short = [t.part if t.kind == "part" else t.label for t in targets]
    out = save_image_grid(rows, args.out, row_labels=labels, col_labels=["image", *short])
    print(f"Grad-CAM of {', '.join(sorted(set(layers)))} for {len(images)} images: {out}")
    report = {
        "layers": dict(zip([t.label for t in targets], layers)),
        "num_images": len(images),
        "map_size": list(stacked.shape[-2:]),
    }
    if len(targets) > 1:
        if len({tuple(m.shape) for m in stacked}) != 1:
            raise ValueError("--target maps have different sizes; give one --layer")
        mat = map_overlap_matrix(stacked, k=args.overlap_k)
        labels_t = [t.part or t.label for t in targets]
        width = max(len(s) for s in labels_t)
        print(f"mean top-{args.overlap_k:g} IoU of the maps over {len(images)} images:")
        print(" " * width + "  " + "  ".join(f"{s:>{width}}" for s in labels_t))
        for s, row in zip(labels_t, mat.tolist()):
            print(f"{s:>{width}}  " + "  ".join(f"{v:>{width}.3f}" for v in row))
        report["overlap_k"] = args.overlap_k
        report["targets"] = labels_t
        report["overlap"] = mat.tolist()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _pair(args, cfg, model, device, images, names, records) -> int:
    import torch

    from reidkit.viz.explain import method_pair_grad_cam, similarity_metric
    from reidkit.viz.grid import enlarge_images, overlay_maps, save_image_grid, to_uint8_images

    if args.gallery:
        if len(args.gallery) != len(images):
            raise ValueError(
                f"--target pair: {len(images)} --images but {len(args.gallery)} --gallery images"
            )
        gallery = _common.read_images(cfg.data, args.gallery)
        g_names = [Path(p).name for p in args.gallery]
    elif records and args.split == "query":
        from reidkit.data.datasets import dataset_from_config

        ds = dataset_from_config(cfg.data)
        chosen = []
        for r in records:
            match = [g for g in ds.gallery if g.pid == r.pid and g.camid != r.camid]
            if not match:
                raise ValueError(f"query {Path(r.path).name}: no same-identity gallery image")
            chosen.append(match[0].path)
        gallery = _common.read_images(cfg.data, chosen)
        g_names = [Path(p).name for p in chosen]
    else:
        raise ValueError(
            "--target pair needs --gallery FILE... (one per --images) or --split query"
        )
    metric = similarity_metric(cfg.test)
    q_maps, g_maps, sims = [], [], []
    for sl in _chunks(len(images), args.batch_size):
        qm, gm, s = method_pair_grad_cam(
            model,
            images[sl].to(device),
            gallery[sl].to(device),
            args.layer,
            feature=cfg.test.feature,
            metric=metric,
        )
        q_maps.append(qm.cpu())
        g_maps.append(gm.cpu())
        sims.append(s.cpu())
    qm, gm, sim = torch.cat(q_maps), torch.cat(g_maps), torch.cat(sims)
    shown = slice(0, min(args.max_rows, len(images)))
    qp = enlarge_images(to_uint8_images(images[shown], cfg.data.mean, cfg.data.std))
    gp = enlarge_images(to_uint8_images(gallery[shown], cfg.data.mean, cfg.data.std))
    qo, go = overlay_maps(qp, qm[shown]), overlay_maps(gp, gm[shown])
    rows = [[qp[b], qo[b], gp[b], go[b]] for b in range(len(qp))]
    labels = [f"{names[b]}\n{g_names[b]}\n{metric} {float(sim[b]):.3f}" for b in range(len(qp))]
    out = save_image_grid(
        rows, args.out, row_labels=labels, col_labels=["query", "map", "gallery", "map"]
    )
    print(
        f"pair Grad-CAM ({metric} similarity of '{cfg.test.feature}') for {len(images)} pairs: {out}"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"pairs": [[a, b, float(s)] for a, b, s in zip(names, g_names, sim)]}, indent=2
            )
        )
    return 0


# ----------------------------------------------------------------------- relation
def _relation(args: argparse.Namespace) -> int:
    from PIL import Image

    from reidkit.viz.grid import enlarge_images, to_uint8_images
    from reidkit.viz.relation import (
        DEFAULT_POSITIONS,
        find_spatial_ia,
        relation_grid,
        relation_maps,
    )

    cfg, model, device = _load_model(args)
    images, names, _ = _inputs(args, cfg)
    images = images[: args.max_rows]
    names = names[: args.max_rows]
    found = find_spatial_ia(model)
    if not found:
        raise ValueError(
            f"model.name={cfg.model.name}: the model has no spatial IA block (IANet with "
            "model.ianet.parts ia or sia)"
        )
    blocks = args.block or [name for name, _ in found]
    positions = DEFAULT_POSITIONS
    if args.positions:
        positions = []
        for text in args.positions:
            try:
                y, x = (float(v) for v in text.split(","))
            except ValueError:
                raise ValueError(
                    f"--positions '{text}': expected y,x fractions, e.g. 0.3,0.5"
                ) from None
            positions.append((y, x))
    pixels = enlarge_images(to_uint8_images(images, cfg.data.mean, cfg.data.std))
    grids = []
    for block in blocks:
        maps, cells = relation_maps(model, images.to(device), module=block, positions=positions)
        grids.append(
            relation_grid(
                pixels,
                maps.cpu(),
                cells,
                normalize=args.normalize,
                row_labels=[f"{block}\n{n}\ngrid {maps.shape[-2]}x{maps.shape[-1]}" for n in names],
            )
        )
    width = max(g.width for g in grids)
    canvas = Image.new("RGB", (width, sum(g.height for g in grids)), (255, 255, 255))
    y = 0
    for g in grids:
        canvas.paste(g, (0, y))
        y += g.height
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out {out}: expected a .png, .jpg or .webp file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"receptive fields of {', '.join(blocks)} for {len(images)} images: {out}")
    return 0


# ------------------------------------------------------------------------- parser
def _common_args(p: argparse.ArgumentParser) -> None:
    _common.add_config_arguments(p, weights=True)
    p.add_argument("--images", nargs="+", metavar="FILE", help="image files")
    p.add_argument(
        "--split", choices=["query", "gallery", "train"], help="take images from the dataset"
    )
    p.add_argument("--num", type=int, default=8, help="images taken from --split (default 8)")
    p.add_argument("--out", required=True, help="output picture (.png, .jpg)")
    p.add_argument(
        "--max-rows", type=int, default=16, help="rows drawn in the picture (default 16)"
    )
    p.add_argument("--device", default=None, help="override cfg.device (cpu, cuda, cuda:1)")
    _common.add_num_classes_argument(p)
    _common.add_debug_argument(p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = _common.add_command_parser(
        sub, "viz", help="Grad-CAM and IANet receptive-field pictures", doc=__doc__
    )
    tools = parser.add_subparsers(dest="tool", metavar="TOOL", required=True)
    g = tools.add_parser(
        "gradcam",
        help="Grad-CAM of a class, a part classifier or a query-gallery similarity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_args(g)
    g.add_argument(
        "--target",
        action="append",
        help="class, class:K, part:NAME, part:NAME:K or pair (repeat for several columns)",
    )
    g.add_argument("--layer", default=None, help="dotted module name (default: the method's)")
    g.add_argument("--gallery", nargs="+", metavar="FILE", help="gallery images for --target pair")
    g.add_argument(
        "--overlap-k",
        type=float,
        default=0.2,
        help="top-k cells for the overlap (fraction or count)",
    )
    g.add_argument("--batch-size", type=int, default=32, help="images per Grad-CAM pass")
    g.add_argument("--json", default=None, help="write the overlap matrix / layers here")
    g.set_defaults(func=_gradcam)
    r = tools.add_parser(
        "relation",
        help="IANet receptive fields: sub-relation maps of spatial IA blocks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common_args(r)
    r.add_argument("--block", action="append", help="spatial IA block (dotted name); repeatable")
    r.add_argument(
        "--positions", nargs="+", metavar="Y,X", help="relative positions (default: 5 body points)"
    )
    r.add_argument(
        "--normalize", choices=["minmax", "max"], default="minmax", help="map scaling per position"
    )
    r.set_defaults(func=_relation)
