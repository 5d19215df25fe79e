"""ONNX export of a model's test-time feature extractor, checked against PyTorch.

The exported graph is :class:`InferenceModel`: the exact computation of
:func:`reidkit.engine.extract_features` for one batch, i.e. ``images (B, 3, H, W)`` float32
(resized and mean/std-normalised RGB) -> ``features (B, D)`` float32 (the ``test.feature``
of the method, averaged with the horizontally flipped image when ``test.flip``,
L2-normalised when ``test.normalize``). The preprocessing (input size, mean, std) is
stored in the ONNX file's ``metadata_props`` so a deployment can read it back.

After export the file is checked with ``onnx.checker``, run with onnxruntime on random
batches (batch 1 and 3 with a dynamic batch axis) and compared to PyTorch; a relative
difference ``max|onnx - torch| / max|torch|`` above ``rtol`` (1e-4) is an error.

Exporters: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, needs ``onnxscript``) or
``"torchscript"`` (the legacy tracer, ``dynamo=False``); ``"auto"`` picks dynamo when
onnxscript is installed and the opset is >= 18 (the dynamo exporter writes opset 18 and
cannot down-convert most graphs), the legacy tracer otherwise. ``ExportResult.opset`` is
the opset actually written.
"""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from reidkit.config import Config

__all__ = [
    "InferenceModel",
    "ExportResult",
    "ONNXMismatchError",
    "export_onnx",
    "export_from_config",
    "check_onnx",
    "format_size",
]

Exporter = Literal["auto", "dynamo", "torchscript"]


class ONNXMismatchError(RuntimeError):
    """onnxruntime's output differs from PyTorch's by more than the tolerance."""


class InferenceModel(nn.Module):
    """``images (B, 3, H, W) -> features (B, D)``: the test feature as the engine extracts it.

    Args:
        model: a reidkit method (``forward_features`` returning a dict of ``(B, D)``
            features) or any module whose eval ``forward`` returns ``(B, D)``.
        feature: key of ``forward_features`` (``post_bn`` / ``pre_bn``).
        flip: average with the features of the horizontally flipped images (one forward
            of the ``2B`` images, like the engine).
        normalize: L2-normalise the output rows.
    """

    def __init__(
        self, model: nn.Module, feature: str = "post_bn", flip: bool = False, normalize: bool = True
    ) -> None:
        super().__init__()
        if not getattr(model, "exportable", True):
            raise ValueError(
                f"{type(model).__name__} scores query-gallery pairs itself (its score is not a "
                "distance between vectors), so its test feature alone cannot be exported"
            )
        self.model = model
        self.feature = feature
        self.flip = bool(flip)
        self.normalize = bool(normalize)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "encode"):
            out = self.model.encode({"images": images}, "query")
            if self.feature not in out:
                raise ValueError(
                    f"test.feature: '{self.feature}' is not produced by {type(self.model).__name__}"
                    f".encode (available: {', '.join(sorted(out))})"
                )
            return out[self.feature]
        if hasattr(self.model, "forward_features"):
            out = self.model.forward_features(images)
            if isinstance(out, dict):
                if self.feature not in out:
                    raise ValueError(
                        f"test.feature: '{self.feature}' is not produced by {type(self.model).__name__}"
                        f".forward_features (available: {', '.join(sorted(out))})"
                    )
                return out[self.feature]
            return out
        return self.model(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.flip:
            f = self._features(torch.cat([images, images.flip(3)], 0)).float()
            f = f.reshape(2, -1, f.shape[-1]).mean(0)  # (f[:B] + f[B:]) / 2 without B
        else:
            f = self._features(images).float()
        if self.normalize:
            f = F.normalize(f, dim=1)
        return f


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured.

    ``max_abs_diff`` / ``rel_diff``: worst ``|onnx - torch|`` and its ratio to
    ``max|torch|`` over the checked batch sizes ``checked_batches`` (empty when not
    verified); ``input_shape``: the example input ``(B, 3, H, W)``; ``dim``: D.
    """

    path: Path
    size_bytes: int
    opset: int
    exporter: str
    dynamic_batch: bool
    input_shape: tuple[int, ...]
    dim: int
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    checked_batches: list[int] = field(default_factory=list)
    export_s: float = 0.0

    def summary(self) -> str:
        """Human-readable lines for the CLI."""
        lines = [
            f"exported {self.path} ({format_size(self.size_bytes)}, opset {self.opset}, "
            f"{self.exporter} exporter)",
            f"input  'images'   {self._shape()} float32 (resized, mean/std-normalised RGB)",
            f"output 'features' ({'batch' if self.dynamic_batch else self.input_shape[0]}, {self.dim}) float32",
        ]
        if self.max_abs_diff is not None:
            lines.append(
                f"onnxruntime vs torch (batch {', '.join(map(str, self.checked_batches))}): "
                f"max abs diff {self.max_abs_diff:.3e}, relative {self.rel_diff:.3e}"
            )
        return "\n".join(lines)

    def _shape(self) -> str:
        b = "batch" if self.dynamic_batch else str(self.input_shape[0])
        return "(" + ", ".join([b, *map(str, self.input_shape[1:])]) + ")"


def format_size(num_bytes: int) -> str:
    """``1536 -> '1.5 KiB'``."""
    if num_bytes < 1024:
        return f"{num_bytes} B"
    exp = min(int(math.log(num_bytes, 1024)), 4)
    return f"{num_bytes / 1024**exp:.1f} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[exp]}"


def _require(module: str) -> Any:
    from reidkit.errors import require_extra

    require_extra("onnx", "ONNX export", modules=(module,))
    return importlib.import_module(module)


#: lowest opset the dynamo exporter writes (it exports 18 and tries to down-convert, which
#: fails for common graphs and leaves opset 18)
DYNAMO_MIN_OPSET = 18


def _pick_exporter(exporter: str, opset: int) -> str:
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter: expected auto, dynamo or torchscript, got {exporter!r}")
    has_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if exporter == "auto":
        return "dynamo" if has_onnxscript and opset >= DYNAMO_MIN_OPSET else "torchscript"
    if exporter == "dynamo" and not has_onnxscript:
        raise ImportError(
            "exporter='dynamo' needs onnxscript (pip install onnxscript); "
            "the legacy exporter='torchscript' works without it"
        )
    return exporter


def _torch_export(
    wrapper: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int,
    dynamic_batch: bool,
    exporter: str,
) -> None:
    names = {"input_names": ["images"], "output_names": ["features"]}
    if exporter == "dynamo":
        kwargs: dict[str, Any] = {}
        if dynamic_batch:
            kwargs["dynamic_shapes"] = {"images": {0: torch.export.Dim("batch", min=1)}}
        onnx_program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            external_data=False,
            **names,
            **kwargs,
        )
        onnx_program.save(str(path))
        return
    axes = {"images": {0: "batch"}, "features": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in torch >= 2.9 but needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            dynamic_axes=axes,
            do_constant_folding=True,
            **names,
        )


def _add_metadata(path: Path, metadata: dict[str, str]) -> int:
    """Write ``metadata`` into the file's ``metadata_props``; return its default-domain opset."""
    onnx = _require("onnx")
    model = onnx.load(str(path))
    existing = {p.key: p for p in model.metadata_props}
    for key, value in metadata.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, str(value)
    onnx.save(model, str(path))
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)


def check_onnx(
    path: str | Path,
    wrapper: nn.Module,
    batch_sizes: list[int] | tuple[int, ...],
    input_size: tuple[int, int],
    rtol: float = 1e-4,
    seed: int = 0,
) -> tuple[float, float]:
    """Run ``path`` with onnxruntime (CPU) on random ``(b, 3, H, W)`` batches and compare
    with ``wrapper`` (PyTorch, CPU, fp32).

    Returns:
        ``(max_abs_diff, rel_diff)`` over all batches, ``rel_diff = max|onnx - torch| /
        max|torch|``.

    Raises:
        ONNXMismatchError: when an output shape differs or ``rel_diff > rtol``.
    """
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    onnx.checker.check_model(str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    worst_abs, worst_ref = 0.0, 0.0
    device = next((p.device for p in wrapper.parameters()), torch.device("cpu"))
    for b in batch_sizes:
        x = torch.randn(b, 3, *input_size, generator=gen)
        with torch.no_grad():
            ref = wrapper(x.to(device)).float().cpu()
        (out,) = session.run(["features"], {"images": x.numpy()})
        out = torch.from_numpy(out)
        if out.shape != ref.shape:
            raise ONNXMismatchError(
                f"{path}: onnxruntime output {tuple(out.shape)} != torch {tuple(ref.shape)} for batch {b}"
            )
        worst_abs = max(worst_abs, float((out - ref).abs().max()))
        worst_ref = max(worst_ref, float(ref.abs().max()))
    rel = worst_abs / max(worst_ref, 1e-12)
    if not math.isfinite(rel) or rel > rtol:
        raise ONNXMismatchError(
            f"{path}: onnxruntime differs from torch: max abs diff {worst_abs:.3e}, relative "
            f"{rel:.3e} > {rtol:.1e} (batches {list(batch_sizes)})"
        )
    return worst_abs, rel


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, int],
    *,
    feature: str = "post_bn",
    flip: bool = False,
    normalize: bool = True,
    opset: int = 17,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    exporter: Exporter = "auto",
    verify: bool = True,
    rtol: float = 1e-4,
    metadata: dict[str, str] | None = None,
) -> ExportResult:
    """Export ``model``'s test feature to ONNX (see the module docstring) and verify it.

    Args:
        model: the method (moved to CPU fp32 for export; the caller's module is not
            changed: a deep copy is exported).
        path: output ``.onnx`` file (parent folders are created).
        input_size: ``(H, W)`` of the input images (``data.height, data.width``).
        feature, flip, normalize: as in :class:`InferenceModel`.
        opset: ONNX opset version.
        dynamic_batch: make the batch axis dynamic (checked with batch 1 and 3);
            otherwise the graph takes exactly ``batch_size`` images.
        exporter: ``auto`` / ``dynamo`` / ``torchscript``.
        verify: run :func:`check_onnx` (needs onnx and onnxruntime).
        rtol: the tolerance of the check.
        metadata: extra ``metadata_props`` entries.

    Returns:
        :class:`ExportResult`.
    """
    import copy

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(input_size) != 2 or min(input_size) <= 0:
        raise ValueError(f"input_size must be (H, W) with positive entries, got {input_size}")
    kind = _pick_exporter(exporter, opset)
    _require("onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).float().cpu().eval()
    wrapper = InferenceModel(net, feature=feature, flip=flip, normalize=normalize).eval()
    example = torch.randn(2 if dynamic_batch and kind == "dynamo" else batch_size, 3, *input_size)
    with torch.no_grad():
        dim = int(wrapper(example).shape[1])
    start = time.perf_counter()
    with torch.no_grad():
        _torch_export(wrapper, example, path, opset, dynamic_batch, kind)
    export_s = time.perf_counter() - start
    meta = {
        "reidkit.input": "images: (B, 3, H, W) float32 RGB, resized (bilinear) then (x/255 - mean) / std",
        "reidkit.input_size": f"{input_size[0]}x{input_size[1]}",
        "reidkit.feature": feature,
        "reidkit.flip": str(flip).lower(),
        "reidkit.normalize": str(normalize).lower(),
        "reidkit.dim": str(dim),
    }
    meta.update(metadata or {})
    written_opset = _add_metadata(path, meta)
    result = ExportResult(
        path=path,
        size_bytes=path.stat().st_size,
        opset=written_opset,
        exporter=kind,
        dynamic_batch=dynamic_batch,
        input_shape=(batch_size, 3, *input_size),
        dim=dim,
        export_s=export_s,
    )
    if verify:
        batches = [1, 3] if dynamic_batch else [batch_size]
        result.max_abs_diff, result.rel_diff = check_onnx(path, wrapper, batches, input_size, rtol)
        result.checked_batches = batches
    return result


def export_from_config(
    cfg: Config,
    weights: str | Path,
    out: str | Path,
    *,
    opset: int = 17,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    exporter: Exporter = "auto",
    verify: bool = True,
    rtol: float = 1e-4,
    num_classes: int | None = None,
) -> ExportResult:
    """Load ``weights`` for ``cfg`` (:func:`reidkit.engine.load_model`, ``weights_only``)
    and :func:`export_onnx` its test feature with the config's input size, ``test.feature``,
    ``test.flip``, ``test.normalize``; mean/std and the method are stored as metadata."""
    from reidkit.engine import load_model
    from reidkit.engine.checkpoint import resolve_weights

    path = resolve_weights(weights)
    model = load_model(cfg, path, num_classes=num_classes, device="cpu")
    meta = {
        "reidkit.method": cfg.model.name,
        "reidkit.backbone": cfg.model.backbone,
        "reidkit.mean": ",".join(f"{m:g}" for m in cfg.data.mean),
        "reidkit.std": ",".join(f"{s:g}" for s in cfg.data.std),
        "reidkit.weights": str(path),
    }
    return export_onnx(
        model,
        out,
        (cfg.data.height, cfg.data.width),
        feature=cfg.test.feature,
        flip=cfg.test.flip,
        normalize=cfg.test.normalize,
        opset=opset,
        dynamic_batch=dynamic_batch,
        batch_size=batch_size,
        exporter=exporter,
        verify=verify,
        rtol=rtol,
        metadata=meta,
    )
