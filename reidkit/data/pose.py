"""Run a user's heatmap-style COCO-17 pose model (ONNX, HRNet-like) over re-ID crops.

Pipeline per image (docs/keypoints.md):

1. **Letterbox** (:func:`letterbox`): the whole crop is the person box. As in top-down pose
   estimators (HRNet, mmpose) the box is widened or heightened to the model's aspect ratio
   (192 / 256), enlarged by ``padding`` (1.25), and mapped onto the ``H x W`` input by
   one scale and offset; the rest is black. No stretching, so the person keeps the
   proportions the model was trained on.
2. **Normalise** with the ImageNet mean / std (RGB) and run the model: ``(N, 3, H, W)`` ->
   ``(N, 17, h, w)`` heatmaps (HRNet: 256 x 192 -> 64 x 48). Optional flip test: the
   mirrored input's heatmaps, mirrored back with left / right channels swapped, are
   averaged in.
3. **Decode** (:func:`decode_heatmaps`): argmax per channel, then the usual quarter-pixel
   step towards the higher neighbour on each axis; the peak value is the score.
4. **Map back** to the crop's pixels by the heatmap stride and the inverse letterbox.

Coordinates use the continuous pixel convention of :mod:`reidkit.data.transforms`: pixel
``i`` covers ``[i, i + 1)``, so a peak in heatmap cell ``j`` without refinement decodes to
``x = j + 0.5`` heatmap pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from reidkit.data.transforms import COCO_FLIP_INDEX, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "Letterbox",
    "letterbox",
    "preprocess_image",
    "decode_heatmaps",
    "OnnxPoseModel",
    "estimate_keypoints",
]

#: (height, width) of HRNet-W32/W48 COCO top-down models.
DEFAULT_INPUT_SIZE: tuple[int, int] = (256, 192)


@dataclass(frozen=True)
class Letterbox:
    """``input = offset + scale * image`` on both axes (continuous pixel coordinates)."""

    scale: float
    offset_x: float
    offset_y: float

    def to_image(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model-input coordinates -> image coordinates."""
        return (u - self.offset_x) / self.scale, (v - self.offset_y) / self.scale


def letterbox(
    width: int, height: int, input_size: tuple[int, int] = DEFAULT_INPUT_SIZE, padding: float = 1.25
) -> Letterbox:
    """The map from a ``width x height`` crop to the centre of the model input.

    The crop (the person box) is grown to the input's aspect ratio, then by ``padding``;
    the grown box fills the input exactly.
    """
    in_h, in_w = input_size
    aspect = in_w / in_h
    box_w, box_h = float(width), float(height)
    if box_w > aspect * box_h:
        box_h = box_w / aspect
    else:
        box_w = aspect * box_h
    scale = in_w / (box_w * padding)
    return Letterbox(scale, in_w / 2 - scale * width / 2, in_h / 2 - scale * height / 2)


def preprocess_image(
    image: Image.Image,
    input_size: tuple[int, int] = DEFAULT_INPUT_SIZE,
    padding: float = 1.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> tuple[np.ndarray, Letterbox]:
    """One crop -> ``(3, H, W)`` float32 model input and its :class:`Letterbox`."""
    img = image.convert("RGB")
    w, h = img.size
    box = letterbox(w, h, input_size, padding)
    in_h, in_w = input_size
    sx = sy = 1.0
    if box.scale < 1:  # shrink with Pillow's antialiased resize first, then place exactly
        small = (max(1, round(w * box.scale)), max(1, round(h * box.scale)))
        img = img.resize(small, Image.Resampling.BILINEAR)
        sx, sy = small[0] / w, small[1] / h
    # output pixel centre u -> source x: Pillow's affine maps pixel centres
    data = (
        sx / box.scale,
        0.0,
        -box.offset_x * sx / box.scale,
        0.0,
        sy / box.scale,
        -box.offset_y * sy / box.scale,
    )
    out = img.transform(
        (in_w, in_h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
    )
    arr = np.asarray(out, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), box


def decode_heatmaps(heatmaps: Tensor) -> tuple[Tensor, Tensor]:
    """Argmax decoding with the quarter-pixel refinement.

    For each channel the peak cell ``(py, px)`` moves by 0.25 towards its higher
    neighbour on each axis (not at all when both are equal, or on the axis where the peak
    lies on the border, which has only one neighbour).

    Args:
        heatmaps: (N, K, h, w).

    Returns:
        ``(coords, scores)``: (N, K, 2) ``(x, y)`` in heatmap pixels, continuous
        convention (``px + 0.5 +- 0.25``), and (N, K) peak values.
    """
    if heatmaps.dim() != 4:
        raise ValueError(f"heatmaps must be (N, K, h, w), got {tuple(heatmaps.shape)}")
    n, k, h, w = heatmaps.shape
    flat = heatmaps.reshape(n, k, h * w)
    scores, idx = flat.max(-1)
    py, px = idx // w, idx % w

    def at(y: Tensor, x: Tensor) -> Tensor:
        return flat.gather(-1, (y * w + x)[..., None])[..., 0]

    left, right = at(py, (px - 1).clamp(min=0)), at(py, (px + 1).clamp(max=w - 1))
    up, down = at((py - 1).clamp(min=0), px), at((py + 1).clamp(max=h - 1), px)
    zero = torch.zeros_like(scores)
    dx = torch.where((px > 0) & (px < w - 1), torch.sign(right - left) * 0.25, zero)
    dy = torch.where((py > 0) & (py < h - 1), torch.sign(down - up) * 0.25, zero)
    coords = torch.stack([px.to(scores.dtype) + 0.5 + dx, py.to(scores.dtype) + 0.5 + dy], -1)
    return coords, scores


class OnnxPoseModel:
    """An ONNX heatmap pose model: ``(N, 3, H, W)`` float32 -> ``(N, 17, h, w)``.

    A model exported with a fixed batch size is fed in chunks of that size (the last one
    zero-padded). The input size comes from the model when its graph fixes it, otherwise
    from ``input_size``.

    Args:
        path: the ``.onnx`` file.
        device: ``"auto"`` (CUDA when onnxruntime has it, else CPU), ``"cuda"`` or ``"cpu"``.
        input_size: ``(H, W)`` for a model whose input size is dynamic.
        threads: onnxruntime intra-op threads (0: its default).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "auto",
        input_size: tuple[int, int] | None = None,
        threads: int = 0,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError(
                "reidkit keypoints needs onnxruntime: pip install 'reidkit[onnx]'"
            ) from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"pose model not found: {self.path}")
        available = ort.get_available_providers()
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        elif device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise ValueError(
                    f"--device cuda: onnxruntime has no CUDA provider here (available: "
                    f"{', '.join(available)}); install onnxruntime-gpu or use --device cpu"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "auto":
            providers = [
                p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
            ]
        else:
            raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
        options = ort.SessionOptions()
        if threads > 0:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"{self.path}: onnxruntime cannot load the model: {exc}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise ValueError(
                f"{self.path}: expected one input of shape (N, 3, H, W), got "
                f"{[(i.name, i.shape) for i in inputs]}"
            )
        static = tuple(d if isinstance(d, int) else None for d in shape[2:])
        if all(d is not None for d in static):
            if input_size is not None and tuple(input_size) != static:
                raise ValueError(
                    f"{self.path}: the model's input is {static[0]}x{static[1]} (H x W), "
                    f"not the requested {input_size[0]}x{input_size[1]}"
                )
            self.input_size: tuple[int, int] = (int(static[0]), int(static[1]))
        else:
            self.input_size = tuple(input_size) if input_size else DEFAULT_INPUT_SIZE
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.providers = self.session.get_providers()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, 17, h, w) float32 heatmaps."""
        n = batch.shape[0]
        if self.fixed_batch is None:
            out = self._run(batch)
        else:
            chunks = []
            for start in range(0, n, self.fixed_batch):
                part = batch[start : start + self.fixed_batch]
                pad = self.fixed_batch - part.shape[0]
                if pad:
                    part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
                chunks.append(self._run(part)[: self.fixed_batch - pad])
            out = np.concatenate(chunks)
        if out.ndim != 4 or out.shape[0] != n or out.shape[1] != 17:
            raise ValueError(
                f"{self.path}: expected COCO-17 heatmaps (N={n}, 17, h, w) from output "
                f"{self.output_name!r}, got shape {tuple(out.shape)}"
            )
        return out

    def _run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0])


def _batches(paths: Sequence[str], batch_size: int, load, workers: int) -> Iterator[list]:
    """Loaded batches; batch i + 1 loads in a thread pool while the caller uses batch i."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: list[Future] = []
        for start in range(0, len(paths), batch_size):
            futures = [pool.submit(load, p) for p in paths[start : start + batch_size]]
            if pending:
                yield [f.result() for f in pending]
            pending = futures
        if pending:
            yield [f.result() for f in pending]


def estimate_keypoints(
    model: OnnxPoseModel,
    paths: Sequence[str],
    *,
    batch_size: int = 32,
    padding: float = 1.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip_test: bool = False,
    workers: int = 4,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keypoints of every image in ``paths``, batched, with a progress bar.

    Returns:
        ``(coords, scores, sizes)``: (N, 17, 2) float64 ``(x, y)`` in pixels of each stored
        image (continuous convention), (N, 17) float32 peak scores and (N, 2) image
        ``(width, height)``.
    """
    from tqdm import tqdm

    input_size = model.input_size

    def load(path: str) -> tuple[np.ndarray, Letterbox, tuple[int, int]]:
        try:
            with Image.open(path) as im:
                return (*preprocess_image(im, input_size, padding, mean, std), im.size)
        except OSError as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc

    coords = np.zeros((len(paths), 17, 2))
    scores = np.zeros((len(paths), 17), dtype=np.float32)
    sizes = np.zeros((len(paths), 2))
    done = 0
    with tqdm(total=len(paths), desc="keypoints", unit="img", disable=not progress) as bar:
        for items in _batches(paths, batch_size, load, workers):
            x = np.stack([item[0] for item in items])
            heat = model(x)
            if flip_test:
                flipped = model(np.ascontiguousarray(x[..., ::-1]))
                heat = (heat + flipped[:, COCO_FLIP_INDEX, :, ::-1]) / 2
            xy, score = decode_heatmaps(torch.from_numpy(np.ascontiguousarray(heat)))
            xy = xy.double().numpy()
            u = xy[..., 0] * (input_size[1] / heat.shape[-1])
            v = xy[..., 1] * (input_size[0] / heat.shape[-2])
            for i, (_, box, size) in enumerate(items):
                coords[done + i, :, 0], coords[done + i, :, 1] = box.to_image(u[i], v[i])
                sizes[done + i] = size
            scores[done : done + len(items)] = score.numpy()
            done += len(items)
            bar.update(len(items))
    return coords, scores, sizes
