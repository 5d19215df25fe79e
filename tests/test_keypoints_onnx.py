"""``reidkit keypoints``: ONNX heatmap models built here (onnx.helper) whose heatmaps peak
at known points; decoded coordinates checked against the letterbox geometry by hand."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from reidkit.cli import main  # noqa: E402
from reidkit.data.datasets import build_dataset  # noqa: E402
from reidkit.data.pose import (  # noqa: E402
    OnnxPoseModel,
    decode_heatmaps,
    estimate_keypoints,
    letterbox,
    preprocess_image,
)


# ------------------------------------------------------------------------ models
def save_model(path: Path, nodes, inits, batch, channels: int = 17) -> Path:
    graph = helper.make_graph(
        nodes,
        "pose",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 256, 192])],
        [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, [batch, channels, 64, 48])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def red_pooling_model(path: Path, channels: int = 17) -> Path:
    """Every heatmap = the red channel averaged over 4x4 cells (dynamic batch)."""
    w = np.zeros((channels, 3, 4, 4), np.float32)
    w[:, 0] = 1 / 16
    conv = helper.make_node("Conv", ["image", "w"], ["heatmaps"], strides=[4, 4])
    return save_model(path, [conv], [numpy_helper.from_array(w, "w")], "N", channels)


def constant_model(path: Path, heatmaps: np.ndarray) -> Path:
    """Heatmaps that ignore the image (0 * conv + constant); static batch 1."""
    zero = np.zeros((17, 3, 4, 4), np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["pooled"], strides=[4, 4]),
        helper.make_node("Add", ["pooled", "c"], ["heatmaps"]),
    ]
    inits = [
        numpy_helper.from_array(zero, "w"),
        numpy_helper.from_array(heatmaps[None].astype(np.float32), "c"),
    ]
    return save_model(path, nodes, inits, 1)


def make_market(root: Path, size: tuple[int, int], dots: dict[str, tuple[int, int]] | None = None):
    layout = {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg"],
        "query": ["0001_c1s1_001051_00.jpg"],
        "bounding_box_test": ["0001_c2s1_000301_01.jpg"],
    }
    base = root / "market1501"
    for folder, names in layout.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            arr = np.zeros((size[1], size[0], 3), np.uint8)
            if dots and name in dots:
                x, y = dots[name]
                arr[y : y + 2, x : x + 2] = 255
            Image.fromarray(arr).save(base / folder / name.replace(".jpg", ".png"))
    return base


# ------------------------------------------------------------------------- decoding
def naive_decode(heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, k, h, w = heat.shape
    coords, scores = np.zeros((n, k, 2)), np.zeros((n, k))
    for i in range(n):
        for j in range(k):
            hm = heat[i, j]
            py, px = np.unravel_index(int(np.argmax(hm)), hm.shape)
            x, y = px + 0.5, py + 0.5
            if 0 < px < w - 1:
                x += 0.25 * np.sign(hm[py, px + 1] - hm[py, px - 1])
            if 0 < py < h - 1:
                y += 0.25 * np.sign(hm[py + 1, px] - hm[py - 1, px])
            coords[i, j], scores[i, j] = (x, y), hm[py, px]
    return coords, scores


def test_decode_heatmaps_matches_loops_and_hand_cases():
    rng = np.random.default_rng(0)
    heat = rng.random((3, 17, 8, 6)).astype(np.float32)
    coords, scores = decode_heatmaps(torch.from_numpy(heat))
    want_c, want_s = naive_decode(heat)
    np.testing.assert_allclose(coords.numpy(), want_c)
    np.testing.assert_allclose(scores.numpy(), want_s, rtol=1e-6)

    hand = torch.zeros(1, 3, 8, 6)
    hand[0, 0, 3, 2], hand[0, 0, 3, 3], hand[0, 0, 3, 1] = 1.0, 0.5, 0.2  # towards +x
    hand[0, 0, 2, 2] = 0.3  # and towards -y
    hand[0, 1, 0, 0], hand[0, 1, 1, 0] = 0.9, 0.4  # corner: no refinement on either axis
    hand[0, 2, 5, 4] = 0.7  # equal neighbours: no refinement
    coords, scores = decode_heatmaps(hand)
    torch.testing.assert_close(coords[0], torch.tensor([[2.75, 3.25], [0.5, 0.5], [4.5, 5.5]]))
    torch.testing.assert_close(scores[0], torch.tensor([1.0, 0.9, 0.7]))


def test_letterbox_geometry_by_hand():
    box = letterbox(96, 128, (256, 192), padding=1.0)  # aspect already 3:4
    assert (box.scale, box.offset_x, box.offset_y) == (2.0, 0.0, 0.0)
    box = letterbox(64, 128, (256, 192), padding=1.25)  # widened to 96, then 120 x 160
    assert box.scale == pytest.approx(1.6)
    assert box.offset_x == pytest.approx(96 - 1.6 * 32) and box.offset_y == pytest.approx(25.6)
    box = letterbox(300, 100, (256, 192), padding=1.0)  # wide: heightened to 400
    assert box.scale == pytest.approx(0.64) and box.offset_y == pytest.approx(128 - 32)
    # a white pixel lands where the letterbox says (continuous pixel centres)
    img = np.zeros((128, 64, 3), np.uint8)
    img[40, 20] = 255
    x, box = preprocess_image(Image.fromarray(img), padding=1.25)
    assert x.shape == (3, 256, 192) and x.dtype == np.float32
    v, u = np.unravel_index(int(np.argmax(x[0])), x[0].shape)
    assert abs(u + 0.5 - (box.offset_x + box.scale * 20.5)) <= 0.5
    assert abs(v + 0.5 - (box.offset_y + box.scale * 40.5)) <= 0.5
    assert x[0, 0, 0] == pytest.approx((0 - 0.485) / 0.229)  # black padding, normalised


# --------------------------------------------------------------------------- command
def run_cli(*args: str) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["keypoints", "--no-progress", "--threads", "1", "--workers", "1", *args])


def test_command_decodes_known_peaks_to_image_pixels(tmp_path, capsys):
    make_market(tmp_path, size=(64, 128))
    heat = np.zeros((17, 64, 48), np.float32)
    peaks = {}
    for k in range(17):
        r, c = 8 + 3 * k, 14 + k
        heat[k, r, c] = 1.0
        heat[k, r, c + 1] = 0.5 if k % 2 else 0.0  # odd channels lean right
        heat[k, r - 1, c] = 0.3 if k % 3 == 0 else 0.0  # every third leans up
        peaks[k] = (c + 0.5 + (0.25 if k % 2 else 0.0), r + 0.5 - (0.25 if k % 3 == 0 else 0.0))
    heat[5] *= 0.1  # below the 0.2 threshold: invisible
    heat[16] = 0
    heat[16, 30, 1] = 1.0  # decodes into the padding left of the crop: invisible
    peaks[16] = (1.5, 30.5)
    model = constant_model(tmp_path / "const.onnx", heat)
    out = tmp_path / "kp.json"
    assert run_cli("--onnx", str(model), "--dataset", "market1501", "--root", str(tmp_path), "--out", str(out), "--batch-size", "3") == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "4 images" in printed and "data.keypoints=" in printed

    data = json.loads(out.read_text())
    assert sorted(data) == [
        "bounding_box_test/0001_c2s1_000301_01.png",
        "bounding_box_train/0002_c1s1_000451_03.png",
        "bounding_box_train/0002_c2s1_000301_01.png",
        "query/0001_c1s1_001051_00.png",
    ]
    scale, ox, oy = 1.6, 96 - 1.6 * 32, 128 - 1.6 * 64  # letterbox of a 64 x 128 crop
    for rows in data.values():
        for k, (x, y, v) in enumerate(rows):
            hx, hy = peaks[k]
            assert x == pytest.approx((hx * 4 - ox) / scale, abs=0.006)
            assert y == pytest.approx((hy * 4 - oy) / scale, abs=0.006)
            assert v == (0 if k in (5, 16) else 2)

    # the file loads as dataset keypoints (the invisible point outside the crop is fine)
    ds = build_dataset("market1501", tmp_path, keypoints=str(out))
    assert ds.query[0].extras["keypoints"] == data["query/0001_c1s1_001051_00.png"]

    assert run_cli("--onnx", str(model), "--dataset", "market1501", "--root", str(tmp_path), "--out", str(out)) == 1  # fmt: skip
    assert "exists; pass --overwrite" in capsys.readouterr().err

    coco = tmp_path / "kp_coco.json"
    assert run_cli("--onnx", str(model), "--dataset", "market1501", "--root", str(tmp_path), "--out", str(coco), "--format", "coco", "--split", "query") == 0  # fmt: skip
    obj = json.loads(coco.read_text())
    assert [im["file_name"] for im in obj["images"]] == ["query/0001_c1s1_001051_00.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train / gallery have no record
        ds = build_dataset("market1501", tmp_path, keypoints=str(coco))
    assert ds.query[0].extras["keypoints"] == data["query/0001_c1s1_001051_00.png"]


@pytest.mark.parametrize("flip", [False, True])
def test_command_finds_dots_through_an_image_driven_model(tmp_path, flip):
    # 96 x 128 crops with --padding 1: the crop fills the input at scale 2, so a 2 x 2 dot
    # at (2j, 2i) fills heatmap cell (i, j) and decodes to its centre (2j + 1, 2i + 1)
    dots = {
        "0002_c1s1_000451_03.jpg": (10, 20),
        "0002_c2s1_000301_01.jpg": (60, 100),
        "0001_c1s1_001051_00.jpg": (0, 126),
        "0001_c2s1_000301_01.jpg": (94, 0),
    }
    make_market(tmp_path, size=(96, 128), dots=dots)
    model = red_pooling_model(tmp_path / "red.onnx")
    out = tmp_path / "kp.json"
    args = ["--onnx", str(model), "--dataset", "market1501", "--root", str(tmp_path)]
    args += ["--out", str(out), "--padding", "1", "--batch-size", "3", "--threshold", "0"]
    assert run_cli(*args, *(["--flip-test"] if flip else [])) == 0
    data = json.loads(out.read_text())
    for key, rows in data.items():
        x0, y0 = dots[Path(key).name.replace(".png", ".jpg")]
        assert rows == [[x0 + 1.0, y0 + 1.0, 2]] * 17, key


def mirror_equivariant_model(path: Path) -> Path:
    """Left-side channels (odd) pool red * ramp, right-side channels (even) red * mirrored
    ramp: mirroring the image mirrors the heatmaps and swaps left / right, like a real
    pose model. The ramp grows to the right, so of two equal dots left channels peak at the
    right one and right channels at the left one."""
    ramp = np.broadcast_to(1 + np.arange(192, dtype=np.float32) / 192, (1, 3, 256, 192))
    w_left = np.zeros((17, 3, 4, 4), np.float32)
    w_left[1::2, 0] = 1 / 16
    w_right = np.zeros((17, 3, 4, 4), np.float32)
    w_right[0::2, 0] = 1 / 16
    nodes = [
        helper.make_node("Add", ["image", "shift"], ["positive"]),  # black = -2.12 -> 0.38
        helper.make_node("Mul", ["positive", "ramp"], ["a"]),
        helper.make_node("Mul", ["positive", "ramp_mirrored"], ["b"]),
        helper.make_node("Conv", ["a", "w_left"], ["left"], strides=[4, 4]),
        helper.make_node("Conv", ["b", "w_right"], ["right"], strides=[4, 4]),
        helper.make_node("Add", ["left", "right"], ["heatmaps"]),
    ]
    inits = [
        numpy_helper.from_array(np.asarray(2.5, np.float32), "shift"),
        numpy_helper.from_array(np.ascontiguousarray(ramp), "ramp"),
        numpy_helper.from_array(np.ascontiguousarray(ramp[..., ::-1]), "ramp_mirrored"),
        numpy_helper.from_array(w_left, "w_left"),
        numpy_helper.from_array(w_right, "w_right"),
    ]
    return save_model(path, nodes, inits, "N")


def test_flip_test_swaps_left_and_right(tmp_path):
    arr = np.zeros((128, 96, 3), np.uint8)
    arr[40:42, 10:12] = 255  # dot A, left in the image
    arr[70:72, 80:82] = 255  # dot B, right
    Image.fromarray(arr).save(tmp_path / "crop.png")
    model = OnnxPoseModel(mirror_equivariant_model(tmp_path / "m.onnx"), "cpu", threads=1)
    for flip in (False, True):
        coords, scores, sizes = estimate_keypoints(
            model, [str(tmp_path / "crop.png")], padding=1.0, flip_test=flip, progress=False
        )
        assert sizes.tolist() == [[96, 128]]
        for k in range(1, 17):
            # left points at B, right ones at A; the ramp tilts the quarter-pixel step in x
            # (in y the neighbours tie up to float rounding: a quarter step either way)
            want_x, want_y = (81.5, 71.0) if k % 2 else (10.5, 41.0)
            assert coords[0, k, 0] == want_x, (flip, k)
            assert abs(coords[0, k, 1] - want_y) <= 0.5, (flip, k)
        assert (scores[0] > 0).all()


def test_model_shape_errors(tmp_path):
    bad = red_pooling_model(tmp_path / "bad.onnx", channels=16)
    model = OnnxPoseModel(bad, device="cpu", threads=1)
    assert model.input_size == (256, 192) and model.fixed_batch is None
    with pytest.raises(
        ValueError,
        match=r"bad.onnx: expected COCO-17 heatmaps \(N=2, 17, h, w\).*\(2, 16, 64, 48\)",
    ):
        model(np.zeros((2, 3, 256, 192), np.float32))
    with pytest.raises(ValueError, match="input is 256x192"):
        OnnxPoseModel(bad, device="cpu", input_size=(384, 288))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx: onnxruntime cannot load"):
        OnnxPoseModel(tmp_path / "junk.onnx", device="cpu")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OnnxPoseModel(tmp_path / "missing.onnx")
