"""Sweeps of config values on a validation split carved from the training identities.

The MGRe paper chooses its weights (lambda of Eq. 9, lambda^F of Eq. 6, Fig. 6) on "the
validation set ... composed of 100 person IDs, split from the training set"; every method
has such knobs, so the sweep is generic:

1. :func:`validation_split`: ``num_ids`` training identities (seeded choice) are held out;
   the model trains on the others (relabelled ``0..N-1``). The held-out images become a
   query / gallery split by camera, as in Market-1501: per identity seen by two or more
   cameras, one image per camera is a query and the rest is gallery; identities seen by one
   camera only go to the gallery (distractors). Without camera ids, one image per identity
   is the query.
2. :func:`sweep`: for every combination of the swept values (a grid), train the config
   with those ``key=value`` overrides on the rest and evaluate on the held-out split; or,
   with ``eval_only``, train once and evaluate every combination with the same weights
   (values that only change the test feature, like MGRe's ``feature_weights``).
3. :func:`format_sweep_table` / :func:`plot_sweep` / ``tune.json``: the curve.

``reidkit tune`` is the command-line front end.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reidkit.data.records import ImageRecord, ReIDDataset

__all__ = [
    "validation_split",
    "parse_sweep_param",
    "SweepPoint",
    "SweepResult",
    "sweep",
    "format_sweep_table",
    "plot_sweep",
]


# ------------------------------------------------------------------------- split
def validation_split(
    dataset: ReIDDataset, num_ids: int = 100, seed: int = 0
) -> tuple[ReIDDataset, dict[str, Any]]:
    """Hold out ``num_ids`` training identities as a query / gallery split.

    Args:
        dataset: a dataset whose ``train`` split is carved (query / gallery are ignored).
        num_ids: identities held out (at least 1; at least one must remain for training).
        seed: the choice of identities and of the query images.

    Returns:
        ``(split, info)``: ``split.train`` are the other identities' images relabelled
        ``0..N-1``, ``split.query`` / ``split.gallery`` the held-out images with their
        original training labels; ``info`` counts what went where.

    Raises:
        ValueError: too few identities, or no held-out identity seen by two cameras (no
        query would have a cross-camera match).
    """
    pids = sorted({r.pid for r in dataset.train})
    if not 1 <= num_ids < len(pids):
        raise ValueError(
            f"--val-ids {num_ids}: the train split of '{dataset.name}' has {len(pids)} "
            f"identities; hold out between 1 and {len(pids) - 1}"
        )
    rng = random.Random(seed)
    held = set(rng.sample(pids, num_ids))
    rest = [r for r in dataset.train if r.pid not in held]
    relabel = {pid: i for i, pid in enumerate(sorted({r.pid for r in rest}))}
    train = [ImageRecord(r.path, relabel[r.pid], r.camid, dict(r.extras)) for r in rest]
    by_id: dict[int, list[ImageRecord]] = {}
    for r in dataset.train:
        if r.pid in held:
            by_id.setdefault(r.pid, []).append(r)
    no_cameras = all(r.camid < 0 for recs in by_id.values() for r in recs)
    query: list[ImageRecord] = []
    gallery: list[ImageRecord] = []
    single_camera = 0
    for pid in sorted(by_id):
        recs = sorted(by_id[pid], key=lambda r: r.path)
        by_cam: dict[int, list[ImageRecord]] = {}
        for r in recs:
            by_cam.setdefault(r.camid, []).append(r)
        if no_cameras:
            if len(recs) < 2:
                gallery.extend(recs)
                single_camera += 1
                continue
            pick = {id(rng.choice(recs))}
        elif len(by_cam) < 2:
            gallery.extend(recs)
            single_camera += 1
            continue
        else:
            pick = {id(rng.choice(by_cam[c])) for c in sorted(by_cam)}
        for r in recs:
            (query if id(r) in pick else gallery).append(r)
    if not query:
        raise ValueError(
            f"validation split of '{dataset.name}': none of the {num_ids} held-out identities "
            "has images from two cameras, so no query has a match; hold out more identities"
        )
    split = ReIDDataset(
        name=f"{dataset.name}-val{num_ids}",
        root=dataset.root,
        train=train,
        query=query,
        gallery=gallery,
    )
    info = {
        "val_ids": num_ids,
        "train_ids": len(relabel),
        "train_images": len(train),
        "query_images": len(query),
        "gallery_images": len(gallery),
        "gallery_only_ids": single_camera,
        "seed": seed,
    }
    return split, info


# ---------------------------------------------------------------------- params
def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets / braces / quotes: ``1,[1,2],'a,b'``."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return parts


def parse_sweep_param(spec: str) -> tuple[str, list[str]]:
    """``"model.mgre.lam=0.1,0.5,1.0"`` -> ``("model.mgre.lam", ["0.1", "0.5", "1.0"])``.

    Values are kept as text and parsed like ``key=value`` overrides (YAML scalars or flow
    collections: ``model.mgre.stages=[1],[2,3]`` sweeps two lists).
    """
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        raise ValueError(
            f"--param '{spec}': expected KEY=V1,V2,..., e.g. model.mgre.lam=0.1,0.5,1.0"
        )
    items = _split_top_level(values)
    if any(not v for v in items):
        raise ValueError(f"--param '{spec}': empty value in the list")
    if len(set(items)) != len(items):
        raise ValueError(f"--param '{spec}': a value is listed twice")
    return key, items


# ------------------------------------------------------------------------ sweep
@dataclass
class SweepPoint:
    """One combination: ``values`` (key -> text), its ``metrics`` and run folder."""

    values: dict[str, str]
    metrics: dict[str, float]
    run: str


@dataclass
class SweepResult:
    """All combinations of a sweep, in grid order, and the split they were evaluated on."""

    params: list[tuple[str, list[str]]]
    points: list[SweepPoint]
    split: dict[str, Any] = field(default_factory=dict)
    eval_only: bool = False

    def best(self, metric: str = "mAP") -> SweepPoint:
        return max(self.points, key=lambda p: p.metrics.get(metric, float("-inf")))

    def to_json(self) -> dict[str, Any]:
        return {
            "params": [{"key": k, "values": v} for k, v in self.params],
            "split": self.split,
            "eval_only": self.eval_only,
            "points": [
                {"values": p.values, "metrics": p.metrics, "run": p.run} for p in self.points
            ],
            "best": self.best().values if self.points else None,
        }


def _run_name(index: int, values: dict[str, str]) -> str:
    text = "_".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())
    safe = "".join(c if c.isalnum() or c in "=.-_" else "-" for c in text)[:80]
    return f"{index:03d}_{safe}"


def sweep(
    config: str | Path | None,
    params: Sequence[tuple[str, Sequence[str]]],
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    val_ids: int = 100,
    seed: int = 0,
    eval_only: bool = False,
    progress: bool = True,
    log: Any = print,
) -> SweepResult:
    """Train / evaluate every combination of ``params`` on a validation split.

    Args:
        config: the YAML config (``None``: defaults); ``overrides`` apply to every run.
        params: ``[(key, [value text, ...]), ...]``: the grid (:func:`parse_sweep_param`).
        out_dir: one run folder per combination (``NNN_<key>=<value>``), or ``train/`` with
            ``eval_only``; the caller writes the table / plot / JSON there.
        val_ids: identities held out of the training split (:func:`validation_split`).
        seed: the split's seed.
        eval_only: train once with ``config`` + ``overrides`` and evaluate every
            combination with those weights (values must not change the architecture).
        log: a ``print``-like callable for progress lines.

    Each training evaluates once, at its end (``test.eval_period`` is set to the run's
    length), on the held-out split.
    """
    from reidkit.config import load_config
    from reidkit.data.datasets import dataset_from_config
    from reidkit.engine.trainer import total_epochs, train

    if not params:
        raise ValueError("tune: give at least one --param KEY=V1,V2,...")
    keys = [k for k, _ in params]
    if len(set(keys)) != len(keys):
        raise ValueError(f"tune: a --param key is given twice: {keys}")
    out = Path(out_dir)
    base_cfg = load_config(config, list(overrides))
    # every combination must validate before anything trains
    combos = [dict(zip(keys, vals)) for vals in itertools.product(*(v for _, v in params))]
    combo_overrides = [[f"{k}={v}" for k, v in combo.items()] for combo in combos]
    cfgs = [load_config(config, [*overrides, *extra]) for extra in combo_overrides]
    full = dataset_from_config(base_cfg.data)
    split, info = validation_split(full, val_ids, seed)
    log(
        f"validation split of {full.name}: {info['val_ids']} held-out ids -> "
        f"{info['query_images']} query / {info['gallery_images']} gallery images; training on "
        f"{info['train_ids']} ids / {info['train_images']} images"
    )
    result = SweepResult([(k, list(v)) for k, v in params], [], info, eval_only)

    def run_training(extra: list[str], folder: Path) -> None:
        cfg = load_config(config, [*overrides, *extra, f"output_dir={folder}"])
        cfg.test.eval_period = total_epochs(cfg)  # evaluate once, at the end
        train(cfg, overwrite=True, progress=progress, dataset=split)

    if eval_only:
        from reidkit.engine.checkpoint import load_model
        from reidkit.engine.distributed import resolve_device
        from reidkit.engine.evaluator import evaluate_model

        folder = out / "train"
        log(f"training once: {folder}")
        run_training([], folder)
        weights = folder / "checkpoints" / "last.pt"
        for combo, cfg in zip(combos, cfgs):
            device = resolve_device(cfg.device)
            model = load_model(cfg, weights, device=device)
            ev = evaluate_model(cfg, model, split, device, progress=progress)
            assert ev is not None
            result.points.append(SweepPoint(combo, dict(ev.metrics), str(folder)))
            log(_point_line(combo, ev.metrics))
        return result

    for i, (combo, extra) in enumerate(zip(combos, combo_overrides)):
        folder = out / _run_name(i, combo)
        log(f"[{i + 1}/{len(combos)}] {' '.join(extra)}: {folder}")
        run_training(extra, folder)
        summary = json.loads((folder / "metrics.json").read_text())
        metrics = {k: float(v) for k, v in (summary.get("final") or {}).items() if k != "epoch"}
        result.points.append(SweepPoint(combo, metrics, str(folder)))
        log(_point_line(combo, metrics))
    return result


def _point_line(combo: dict[str, str], metrics: dict[str, float]) -> str:
    shown = " ".join(f"{k}={v}" for k, v in combo.items())
    return (
        f"  {shown}: mAP {100 * metrics.get('mAP', float('nan')):.1f}, "
        f"R1 {100 * metrics.get('rank1', float('nan')):.1f}"
    )


# ------------------------------------------------------------------------ output
_COLUMNS = (("mAP", "mAP"), ("rank1", "R1"), ("rank5", "R5"), ("mINP", "mINP"))


def format_sweep_table(result: SweepResult, metric: str = "mAP") -> str:
    """A markdown table: one row per combination, metrics in %, the best row marked."""
    keys = [k for k, _ in result.params]
    best = result.best(metric) if result.points else None
    head = "| " + " | ".join([*keys, *(n for _, n in _COLUMNS), ""]) + " |"
    sep = "|" + "|".join(["---"] * len(keys) + ["---:"] * len(_COLUMNS) + ["---"]) + "|"
    rows = [head, sep]
    for p in result.points:
        cells = [p.values[k] for k in keys]
        cells += [f"{100 * p.metrics[m]:.1f}" if m in p.metrics else "-" for m, _ in _COLUMNS]
        cells.append("best" if p is best else "")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _numeric(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot_sweep(result: SweepResult, path: str | Path, title: str = "") -> Path:
    """mAP and R1 (%) against the first swept key; one line per combination of the others.
    Numeric values are placed on a numeric axis, others evenly."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, values = result.params[0]
    others = result.params[1:]
    xs_num = _numeric(values)
    xs = xs_num if xs_num is not None else list(range(len(values)))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (metric, label) in zip(axes, (("mAP", "mAP (%)"), ("rank1", "Rank-1 (%)"))):
        for combo in itertools.product(*(v for _, v in others)) if others else [()]:
            fixed = {k: v for (k, _), v in zip(others, combo)}
            ys = []
            for v in values:
                point = next(
                    p
                    for p in result.points
                    if p.values[key] == v and all(p.values[k] == fv for k, fv in fixed.items())
                )
                ys.append(100 * point.metrics.get(metric, float("nan")))
            name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in fixed.items()) or label
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        if xs_num is None:
            ax.set_xticks(xs, values, rotation=20)
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize=8)
    split = result.split
    info = (
        f"validation split: {split.get('val_ids')} held-out ids "
        f"({split.get('query_images')} query / {split.get('gallery_images')} gallery)"
        + (" · one training, evaluation sweep" if result.eval_only else "")
    )
    fig.suptitle(f"{title}\n{info}" if title else info, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
