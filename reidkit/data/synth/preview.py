"""Contact sheets of a synthetic dataset (``preview.png``): look-alike families of the
image set across cameras; tracklets of the video set with their occlusion ground truth."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .identity import CUE_KEYS

__all__ = ["write_preview", "write_video_preview"]

_NAME_RE = re.compile(r"([-\d]+)_c(\d)")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _preview_cells(images: dict[int, list[Path]], max_cols: int) -> list[tuple[int, Path]]:
    """Round-robin over cameras: first image of every camera, then second ones, ..."""
    cells: list[tuple[int, Path]] = []
    depth = 0
    while len(cells) < max_cols:
        added = False
        for cam in sorted(images):
            if depth < len(images[cam]) and len(cells) < max_cols:
                cells.append((cam, images[cam][depth]))
                added = True
        if not added:
            break
        depth += 1
    return sorted(cells, key=lambda t: t[0])


def write_preview(
    root: str | os.PathLike,
    path: str | os.PathLike | None = None,
    num_families: int = 2,
    max_members: int = 4,
    max_cols: int = 8,
    zoom: int = 2,
) -> Path:
    """Contact sheet of look-alike families: one row per family member, its images across
    cameras in the columns (every camera it appears in first, then more views).

    Reads ``root/meta.json`` and the image folders; picks the largest test families (train
    when there are none). Each cell is labelled ``pid/camera``; each row names the cues that
    vary inside the family. Returns the PNG path (default ``root/preview.png``).
    """
    root = Path(root)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: is {root} a dataset made by `reidkit synth`?"
        )
    meta = json.loads(meta_path.read_text())
    by_pid: dict[int, dict[int, list[Path]]] = {}
    for folder in ("query", "bounding_box_test", "bounding_box_train"):
        d = root / folder
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.jpg")):
            m = _NAME_RE.match(p.name)
            if m and int(m.group(1)) > 0:
                by_pid.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), []).append(p)
    fams = [
        (fid, f)
        for fid, f in meta["families"].items()
        if len(f["members"]) >= 2 and all(p in by_pid for p in f["members"])
    ]
    fams.sort(key=lambda t: (t[1]["split"] != "test", -len(t[1]["members"]), int(t[0])))
    fams = fams[:num_families]
    if not fams:
        raise ValueError(f"{root}: no look-alike family with images on disk to preview")
    h, w = int(meta["height"]) * zoom, int(meta["width"]) * zoom
    label_h, head_w, pad, title_h = 14, 150, 4, 18
    rows = [(fid, f, pid) for fid, f in fams for pid in f["members"][:max_members]]
    sheet_w = head_w + max_cols * (w + pad) + pad
    sheet_h = len(fams) * title_h + len(rows) * (h + label_h + pad) + pad
    sheet = Image.new("RGB", (sheet_w, sheet_h), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    y = pad
    last_fid = None
    for fid, fam, pid in rows:
        attrs = meta["identities"][f"{pid:04d}"]["attributes"]
        if fid != last_fid:
            draw.text(
                (pad, y + 2),
                f"family {fid} ({fam['split']}): {attrs['upper_colour']} {attrs['upper_pattern']} "
                f"top, {attrs['lower_colour']} {attrs['lower_type']}; members differ in: "
                f"{', '.join(fam['varies'])}",
                fill=(0, 0, 0),
                font=font,
            )
            y += title_h
            last_fid = fid
        cue_lines = [f"pid {pid:04d}"]
        for cue in fam["varies"]:
            cue_lines.append(f"{cue}: " + "/".join(str(attrs[k]) for k in CUE_KEYS[cue]))
        draw.multiline_text(
            (pad, y + 4), "\n".join(cue_lines), fill=(0, 0, 0), font=font, spacing=2
        )
        for col, (cam, p) in enumerate(_preview_cells(by_pid[pid], max_cols)):
            x = head_w + col * (w + pad)
            with Image.open(p) as im:
                sheet.paste(im.convert("RGB").resize((w, h), Image.BILINEAR), (x, y))
            draw.text((x + 2, y + h + 1), f"{pid:04d}/c{cam}", fill=(40, 40, 40), font=font)
        y += h + label_h + pad
    out = Path(path) if path is not None else root / "preview.png"
    sheet.save(out)
    return out


def write_video_preview(
    root: str | os.PathLike,
    path: str | os.PathLike | None = None,
    num_tracklets: int = 4,
    max_frames: int = 10,
    zoom: int = 2,
) -> Path:
    """Contact sheet of a synthetic video set: occluded tracklets first, each as a row of
    frames (evenly spread over the tracklet) with, under it, the ground-truth frames
    without the occluder and the occluder masks of its occluded frames.

    Reads ``root/meta.json``, ``root/occlusion.json`` and ``root/info/train_name.txt``.
    Returns the PNG path (default ``root/preview.png``).
    """
    root = Path(root)
    for name in ("meta.json", "occlusion.json", "info/train_name.txt"):
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{root / name} not found: is {root} a video set made by `reidkit synth --video`?"
            )
    meta = json.loads((root / "meta.json").read_text())
    occ = json.loads((root / "occlusion.json").read_text())
    names = (root / "info" / "train_name.txt").read_text().split()
    # tracklets of the train split by their first frame (name up to the frame number)
    tracks: dict[str, list[str]] = {}
    for n in names:
        tracks.setdefault(n[: n.index("F")], []).append(n)
    occluded = [r for r in occ["tracklets"] if r["split"] == "train"]
    chosen = [r["first_frame"] for r in occluded[:num_tracklets]]
    for key in tracks:
        if len(chosen) >= num_tracklets:
            break
        first = tracks[key][0]
        if first not in chosen:
            chosen.append(first)
    h, w = int(meta["height"]) * zoom, int(meta["width"]) * zoom
    pad, label_h, head_w = 4, 14, 120
    rows: list[tuple[str, list[tuple[Path, str] | None]]] = []
    for first in chosen:
        frames = tracks[first[: first.index("F")]]
        pick = sorted(
            {round(i * (len(frames) - 1) / max(1, max_frames - 1)) for i in range(max_frames)}
        )
        folder = root / "bbox_train" / first[:4]
        kind = next((r["kind"] for r in occluded if r["first_frame"] == first), None)
        rows.append(
            (
                f"{first[:-8]}\n{len(frames)} frames" + (f"\n{kind}" if kind else ""),
                [(folder / frames[i], frames[i][-8:-4]) for i in pick],
            )
        )
        if kind:
            truth, masks = [], []
            for i in pick:
                stem = frames[i][:-4]
                t_path, m_path = root / "truth" / f"{stem}.png", root / "masks" / f"{stem}.png"
                truth.append((t_path, "truth") if t_path.is_file() else None)
                masks.append((m_path, "mask") if m_path.is_file() else None)
            rows.append(("without occluder", truth))
            rows.append(("occluder mask", masks))
    cols = max(len(r[1]) for r in rows)
    sheet = Image.new(
        "RGB",
        (head_w + cols * (w + pad) + pad, len(rows) * (h + label_h + pad) + pad),
        (245, 245, 245),
    )
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    y = pad
    for label, cells in rows:
        draw.multiline_text((pad, y + 4), label, fill=(0, 0, 0), font=font, spacing=2)
        for col, cell in enumerate(cells):
            if cell is None:
                continue
            p, text = cell
            x = head_w + col * (w + pad)
            with Image.open(p) as im:
                sheet.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
            draw.text((x + 2, y + h + 1), text, fill=(40, 40, 40), font=font)
        y += h + label_h + pad
    out = Path(path) if path is not None else root / "preview.png"
    sheet.save(out)
    return out
