"""Tests of the synthetic pedestrian dataset (reidkit.data.synth, ``reidkit synth``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reidkit.cli import main
from reidkit.data import synth
from reidkit.data.synth import PRESETS, SPLIT_FOLDERS, SynthPreset, generate

MARKET_RE = re.compile(r"([-\d]+)_c(\d)")  # the regex Market-1501 parsers use
FULL_NAME_RE = re.compile(r"^(-1|\d{4})_c(\d)s(\d)_(\d{6})_(\d{2})\.jpg$")
TINY = PRESETS["tiny"]
H, W = 128, 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny preset generated through the CLI, with 2 worker processes and a preview."""
    out = tmp_path_factory.mktemp("data") / "synth-tiny"
    rc = main(
        [
            "synth",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--workers",
            "2",
            "--preview",
            "--no-progress",
        ]
    )
    assert rc == 0
    return out


def _files(root: Path, folder: str) -> list[Path]:
    return sorted((root / folder).glob("*.jpg"))


def _parse(path: Path) -> tuple[int, int]:
    m = MARKET_RE.search(path.name)
    assert m is not None, path.name
    return int(m.group(1)), int(m.group(2))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "preview.png"
    }


# --------------------------------------------------------------------------- layout
def test_layout_names_and_counts(tiny: Path, capsys) -> None:
    for folder in SPLIT_FOLDERS.values():
        assert (tiny / folder).is_dir()
    train, query, gallery = (_files(tiny, f) for f in SPLIT_FOLDERS.values())
    assert len(train) == TINY.num_train_images
    assert len(query) == TINY.num_query
    assert len(gallery) == TINY.num_gallery
    for p in train + query + gallery:
        assert FULL_NAME_RE.match(p.name), p.name
        pid, cam = _parse(p)
        assert 1 <= cam <= TINY.num_cams
    # stored images: Market size, RGB JPEG
    for p in (train[0], query[-1], gallery[len(gallery) // 2]):
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (W, H)
    assert len({_parse(p)[0] for p in train}) == TINY.num_train_ids
    assert len({_parse(p)[0] for p in query}) == TINY.num_test_ids


def test_train_and_test_ids_disjoint(tiny: Path) -> None:
    train_ids = {_parse(p)[0] for p in _files(tiny, "bounding_box_train")}
    test_ids = {_parse(p)[0] for f in ("query", "bounding_box_test") for p in _files(tiny, f)}
    assert train_ids.isdisjoint(test_ids - {0, -1})
    assert 0 not in train_ids and -1 not in train_ids
    assert {_parse(p)[0] for p in _files(tiny, "query")} <= test_ids


def test_every_query_has_cross_camera_gallery(tiny: Path) -> None:
    gallery: dict[int, set[int]] = {}
    for p in _files(tiny, "bounding_box_test"):
        pid, cam = _parse(p)
        gallery.setdefault(pid, set()).add(cam)
    same_cam = 0
    query_per_id_cam: dict[tuple[int, int], int] = {}
    for p in _files(tiny, "query"):
        pid, cam = _parse(p)
        assert gallery.get(pid, set()) - {cam}, f"query {p.name} has no other-camera gallery image"
        same_cam += cam in gallery[pid]
        query_per_id_cam[(pid, cam)] = query_per_id_cam.get((pid, cam), 0) + 1
    # one query per (id, camera) like Market, and same-camera gallery images exist
    assert max(query_per_id_cam.values()) == 1
    assert same_cam == TINY.num_query  # every query camera also has gallery images


def test_distractors_and_junk_in_gallery(tiny: Path) -> None:
    pids = [_parse(p)[0] for p in _files(tiny, "bounding_box_test")]
    assert pids.count(0) == TINY.num_distractors
    assert pids.count(-1) == TINY.num_junk
    assert all(
        p.name.startswith("-1_c") for p in _files(tiny, "bounding_box_test") if _parse(p)[0] == -1
    )


# --------------------------------------------------------------------------- keypoints
def test_keypoints_for_every_image(tiny: Path) -> None:
    visible_counts = []
    order_checks = []
    for folder in SPLIT_FOLDERS.values():
        kp = json.loads((tiny / "keypoints" / f"{folder}.json").read_text())
        names = {p.name for p in _files(tiny, folder)}
        assert set(kp) == names
        for name, rows in kp.items():
            arr = np.asarray(rows, dtype=np.float64)
            assert arr.shape == (17, 3)
            v = arr[:, 2]
            assert set(np.unique(v)) <= {0.0, 1.0, 2.0}
            on = v > 0
            assert np.all(
                (arr[on, 0] >= 0) & (arr[on, 0] < W) & (arr[on, 1] >= 0) & (arr[on, 1] < H)
            )
            assert np.all(arr[~on, :2] == 0)
            if not name.startswith("-1_"):
                visible_counts.append(int(on.sum()))
                if on[[0, 5, 6, 11, 12, 15, 16]].all():
                    y = arr[:, 1]
                    order_checks.append(
                        y[0] < min(y[5], y[6])
                        and max(y[5], y[6]) < min(y[11], y[12])
                        and max(y[11], y[12]) < min(y[15], y[16])
                    )
    # almost every normal detection shows most of the skeleton
    assert np.median(visible_counts) == 17
    assert np.mean(np.asarray(visible_counts) >= 12) > 0.85
    # head above shoulders above hips above ankles
    assert len(order_checks) > 200 and all(order_checks)


def _neutral_camera() -> synth.Camera:
    return synth.Camera(
        index=0,
        background="pavement",
        bg_colours=((128, 128, 128),) * 4,
        gain=1.0,
        cast=(1.0, 1.0, 1.0),
        saturation=1.0,
        gamma=1.0,
        light_gradient=0.0,
        blur=0.0,
        noise=0.0,
        jpeg_quality=95,
        yaw_profile=(1.0,) * 8,
        occlusion_prob=0.0,
        scale=0.9,
    )


def _render(attrs: dict, yaw: float, seed: int = 0, phase: float = 0.5, stride: float = 0.35):
    tr = synth.Tracklet(
        yaw=yaw, phase0=phase, dphase=1.0, stride=stride, hfrac=0.88, xoff=0.0, ytop=0.05
    )
    background = np.zeros((2 * H, 2 * W, 3), np.uint8)
    background[..., 1:] = 255  # cyan: not a body colour
    rng = np.random.default_rng(seed)
    return synth.render_sample(attrs, _neutral_camera(), tr, 0, rng, H, W, background)


def _is_cyan(px: np.ndarray) -> np.ndarray:
    return (px[..., 0] < 40) & (px[..., 1] > 200) & (px[..., 2] > 200)


def test_keypoints_lie_on_the_drawn_body() -> None:
    """Independent check: every keypoint with v > 0 has body pixels (not background) in
    its 3x3 neighbourhood, for random identities, poses and viewpoints."""
    rng = np.random.default_rng(7)
    checked = 0
    for i in range(40):
        attrs = synth.sample_identity(rng)
        img, kps = _render(
            attrs,
            yaw=float(rng.uniform(-math.pi, math.pi)),
            seed=i,
            phase=float(rng.uniform(0, 6.3)),
        )
        for x, y, v in kps:
            if v == 0:
                continue
            xi, yi = int(x), int(y)
            patch = img[max(0, yi - 1) : yi + 2, max(0, xi - 1) : xi + 2]
            assert (~_is_cyan(patch)).any(), (i, x, y, v)
            checked += 1
    assert checked > 500


def test_visibility_follows_viewpoint() -> None:
    rng = np.random.default_rng(3)
    attrs = synth.sample_identity(rng)
    attrs.update(hat="none", hat_colour="none")
    _, front = _render(attrs, yaw=0.0)
    _, back = _render(attrs, yaw=math.pi)
    _, side = _render(attrs, yaw=math.pi / 2)  # walking to the image right: right side faces us
    inside_f = front[:, 2] > 0
    assert np.all(front[inside_f, 2] == 2)  # nothing hidden from the front without occluders
    assert back[0, 2] == 1 and back[1, 2] == 1 and back[2, 2] == 1  # face hidden from the back
    assert front[0, 2] == 2 and front[1, 2] == 2
    # side view: the far (left) shoulder/hip are behind the torso, the near ones are not
    assert side[5, 2] == 1 and side[11, 2] == 1
    assert side[6, 2] == 2 and side[12, 2] == 2
    # front view: person's left is on the image right (COCO convention)
    assert front[5, 0] > front[6, 0] and front[11, 0] > front[12, 0]
    assert back[5, 0] < back[6, 0]


def _base_attrs() -> dict:
    return {
        "height": 1.0,
        "width": 1.0,
        "skin": "light",
        "hair_style": "short",
        "hair_colour": "black",
        "hat": "none",
        "hat_colour": "none",
        "upper_colour": "blue",
        "upper_pattern": "plain",
        "upper_accent": "white",
        "sleeves": "long",
        "lower_type": "trousers",
        "lower_colour": "black",
        "shoes_colour": "white",
        "bag": "none",
        "bag_colour": "none",
    }


def test_viewpoint_decides_which_cues_are_visible() -> None:
    """A backpack is seen from the back (only its straps from the front), a logo only
    from the front."""
    attrs = _base_attrs() | {"bag": "backpack", "bag_colour": "red"}
    front, _ = _render(attrs, yaw=0.0)
    back, _ = _render(attrs, yaw=math.pi)

    def red(img):
        return int(((img[..., 0] > 120) & (img[..., 1] < 70) & (img[..., 2] < 70)).sum())

    assert red(back) > 150 and red(back) > 3 * red(front)
    logo = _base_attrs() | {"upper_pattern": "logo", "upper_accent": "yellow"}
    front, _ = _render(logo, yaw=0.0)
    back, _ = _render(logo, yaw=math.pi)

    def yellow(img):
        return int(((img[..., 0] > 170) & (img[..., 1] > 140) & (img[..., 2] < 90)).sum())

    assert yellow(front) >= 12 and yellow(back) == 0
    plain, _ = _render(_base_attrs(), yaw=0.0)
    assert red(plain) == 0 and yellow(plain) == 0


# --------------------------------------------------------------------------- meta, families
def test_meta_and_families(tiny: Path) -> None:
    meta = json.loads((tiny / "meta.json").read_text())
    assert meta["preset"]["name"] == "tiny" and meta["seed"] == 0
    assert meta["counts"]["train"]["images"] == TINY.num_train_images
    assert meta["counts"]["gallery"]["junk"] == TINY.num_junk
    assert len(meta["cameras"]) == TINY.num_cams
    ids = meta["identities"]
    assert len(ids) == TINY.num_train_ids + TINY.num_test_ids
    # cameras recorded per identity match the file names
    seen: dict[str, set[int]] = {}
    for folder in SPLIT_FOLDERS.values():
        for p in _files(tiny, folder):
            pid, cam = _parse(p)
            if pid > 0:
                seen.setdefault(f"{pid:04d}", set()).add(cam)
    assert {k: set(v["cameras"]) for k, v in ids.items()} == seen

    multi = [f for f in meta["families"].values() if len(f["members"]) >= 2]
    assert multi, "no look-alike family"
    assert any(f["split"] == "test" for f in multi) and any(f["split"] == "train" for f in multi)
    for fam in multi:
        varying = {k for cue in fam["varies"] for k in synth.CUE_KEYS[cue]}
        assert 1 <= len(fam["varies"]) <= 2
        members = [ids[f"{pid:04d}"] for pid in fam["members"]]
        assert {m["split"] for m in members} == {fam["split"]}
        first = members[0]["attributes"]
        for m in members:
            a = m["attributes"]
            assert set(a) == set(first)
            shared = {k: v for k, v in a.items() if k not in varying}
            assert shared == {k: v for k, v in first.items() if k not in varying}
        # members differ from each other in the varying cues
        sigs = {tuple(m["attributes"][k] for k in sorted(varying)) for m in members}
        assert len(sigs) == len(members)
    # look-alikes share the salient cues: upper colour/pattern and lower garment
    for fam in multi:
        attrs = [ids[f"{pid:04d}"]["attributes"] for pid in fam["members"]]
        assert (
            len(
                {
                    (a["upper_colour"], a["upper_pattern"], a["lower_type"], a["lower_colour"])
                    for a in attrs
                }
            )
            == 1
        )


def test_preview_written(tiny: Path, capsys) -> None:
    preview = tiny / "preview.png"
    assert preview.is_file()
    preview.unlink()
    assert main(["synth", "--preview-only", str(tiny)]) == 0
    with Image.open(preview) as im:
        assert im.format == "PNG" and im.width > 4 * W and im.height > 2 * H
    assert "preview.png" in capsys.readouterr().out


# --------------------------------------------------------------------------- determinism
def test_deterministic_across_workers_and_seeds(tiny: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, "tiny", seed=0, workers=1, progress=False)
    a, b = _tree_bytes(tiny), _tree_bytes(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]

    other = tmp_path / "other"
    generate(other, "tiny", seed=1, workers=2, progress=False)
    c = _tree_bytes(other)
    assert c["meta.json"] != a["meta.json"]
    common = set(a) & set(c)
    assert len(a.keys() ^ c.keys()) > 0 or any(a[k] != c[k] for k in common)
    images_a = [v for k, v in sorted(a.items()) if k.endswith(".jpg")]
    images_c = [v for k, v in sorted(c.items()) if k.endswith(".jpg")]
    assert not set(images_a) & set(images_c)  # no image is repeated between seeds


def test_refuses_to_overwrite_and_overwrites(tmp_path: Path) -> None:
    micro = SynthPreset("micro", 3, 3, 6, 6, 8, 2, 2, min_train_images_per_id=2)
    out = tmp_path / "m"
    s = generate(out, micro, seed=5, workers=1, progress=False, height=64, width=32)
    assert s["splits"]["gallery"]["images"] == micro.num_gallery
    with Image.open(next((out / "query").glob("*.jpg"))) as im:
        assert im.size == (32, 64)
    (out / "bounding_box_train" / "stale_c1.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(out, micro, seed=5, workers=1, progress=False)
    generate(out, micro, seed=5, workers=1, progress=False, overwrite=True)
    assert not (out / "bounding_box_train" / "stale_c1.jpg").exists()
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 1


def test_preset_validation_names_the_field() -> None:
    bad = SynthPreset("bad", 4, 4, 16, 3, 8, 0, 0)  # fewer than 2 query cameras per id
    with pytest.raises(ValueError, match="num_query"):
        bad.validate()
    with pytest.raises(ValueError, match="unknown synth preset"):
        generate("/nonexistent/never", "huge")
    for p in PRESETS.values():
        p.validate()
    market = PRESETS["market"]
    assert (market.num_train_ids, market.num_test_ids) == (751, 750)
    assert (market.num_train_images, market.num_query, market.num_gallery) == (12936, 3368, 19732)


def test_sample_counts_bounds_and_total() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        lo = rng.integers(0, 5, n)
        hi = lo + rng.integers(0, 6, n)
        total = int(rng.integers(lo.sum(), hi.sum() + 1))
        out = synth._sample_counts(rng, total, lo, hi)
        assert out.sum() == total and np.all(out >= lo) and np.all(out <= hi)
    with pytest.raises(ValueError):
        synth._sample_counts(rng, 100, np.zeros(3, int), np.full(3, 10))


# --------------------------------------------------------------------------- parser
def test_market_parser_reads_the_tree(tiny: Path) -> None:
    from reidkit.data.datasets import build_dataset

    for ds in (
        build_dataset("market1501", root=str(tiny)),
        build_dataset("synth", root=str(tiny.parent), preset="tiny"),
    ):
        assert len(ds.train) == TINY.num_train_images
        assert ds.num_train_pids == TINY.num_train_ids
        assert sorted({r.pid for r in ds.train}) == list(range(TINY.num_train_ids))
        assert len(ds.query) == TINY.num_query
        # junk (-1) is dropped by the protocol; distractors (0) stay
        assert len(ds.gallery) == TINY.num_gallery - TINY.num_junk
        assert sum(r.pid == 0 for r in ds.gallery) == TINY.num_distractors
        assert {r.camid for r in ds.query} <= set(range(TINY.num_cams))
        rec = ds.query[0]
        kps = rec.extras["keypoints"]
        assert len(kps) == 17 and all(len(row) == 3 for row in kps)


# --------------------------------------------------------------------------- on the fly
def test_rendered_on_the_fly_equals_the_files(tiny: Path) -> None:
    """data.render.preset=tiny (plan=disk) renders the images `reidkit synth` writes:
    the same JPEG bytes, the same records as the Market parser lists (junk dropped, train
    pids relabelled), without any file."""
    from reidkit.data.datasets import build_dataset
    from reidkit.data.synth import SynthRenderConfig, SynthRenderSource

    disk = build_dataset("market1501", root=str(tiny))
    source = SynthRenderSource(SynthRenderConfig(preset="tiny"), H, W)
    for split in ("train", "query", "gallery"):
        rendered, files = source.records(split), getattr(disk, split)
        assert len(rendered) == len(files)
        assert [(r.pid, r.camid) for r in rendered] == [(r.pid, r.camid) for r in files]
        for i in range(0, len(files), 9):  # a spread of images: tasks of every kind
            assert source.render_jpeg(split, i) == Path(files[i].path).read_bytes(), (split, i)
        pixels = np.asarray(Image.open(files[-1].path).convert("RGB"))
        assert np.array_equal(source.render(split, len(files) - 1), pixels)
