"""Regression tests from the evaluation/data correctness review."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reidkit.data.loader import ImageDataset
from reidkit.data.records import ImageRecord
from reidkit.data.transforms import Resize


def test_keypoint_transform_does_not_mutate_record_extras(tmp_path: Path) -> None:
    """A bare (non-Compose) geometric transform scales keypoints in place; the dataset
    must hand it a copy, or float32 numpy keypoints stored on the record are rescaled
    again on every access (every epoch)."""
    path = tmp_path / "0001_c1s1_000001_00.jpg"
    Image.new("RGB", (4, 8), (10, 20, 30)).save(path)
    kp = np.zeros((17, 3), dtype=np.float32)
    kp[:, 0], kp[:, 1], kp[:, 2] = 2.0, 4.0, 1.0
    rec = ImageRecord(str(path), 0, 0, extras={"keypoints": kp})
    ds = ImageDataset([rec], Resize((16, 8)))
    first = ds[0]["keypoints"]
    second = ds[0]["keypoints"]
    # hand-worked: (x, y) = (2, 4) scaled by (8 / 4, 16 / 8) = (4, 8)
    expected = torch.tensor([4.0, 8.0, 1.0]).expand(17, 3)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    np.testing.assert_array_equal(rec.extras["keypoints"][:, :2], np.tile([2.0, 4.0], (17, 1)))
