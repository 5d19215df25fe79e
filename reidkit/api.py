"""The newcomer Python API: configure, train, evaluate and extract features in a few calls.

::

    import reidkit.api as rk

    cfg = rk.config("configs/synth/bot.yaml", solver__max_epochs=2)   # or ["solver.max_epochs=2"]
    run = rk.train(cfg)                  # a Run: run.dir, run.metrics, run.model()
    result = rk.evaluate(run)            # EvalResult: result.metrics["mAP"], result.table()

    extractor = rk.FeatureExtractor(config=cfg, weights=run.checkpoint())
    feats = extractor(["a.jpg", "b.jpg"])                # (2, D), L2-normalised

Everything here is a thin layer over :mod:`reidkit.config` and :mod:`reidkit.engine`, so
features, metrics and checkpoints are exactly those of ``reidkit train`` / ``reidkit eval``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from reidkit.config import (
    Config,
    ConfigError,
    _field_annotation,
    apply_overrides,
    config_from_dict,
    load_config,
)
from reidkit.engine.checkpoint import resolve_weights

if TYPE_CHECKING:
    from torch import nn

    from reidkit.engine.evaluator import EvalResult
    from reidkit.export import ExportResult

__all__ = ["config", "train", "evaluate", "load_run", "Run", "FeatureExtractor", "resolve_weights"]

PathLike = str | Path
#: One image for :class:`FeatureExtractor`: a file path, a PIL image, an ``(H, W, 3)``
#: uint8 array or a ``(3, H, W)`` tensor.
ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


# ---------------------------------------------------------------------------- config
def _is_section(dotted: list[str]) -> bool:
    """True when ``dotted`` names a pydantic section of :class:`Config` (``model.cge``)."""
    from pydantic import BaseModel

    model: Any = _field_annotation(dotted) if dotted else Config
    return isinstance(model, type) and issubclass(model, BaseModel)


def _override_items(key: str, value: Any) -> list[str]:
    """``key=value`` override strings for one (possibly nested-section) value."""
    parts = key.split(".")
    if isinstance(value, Mapping) and _is_section(parts):
        out: list[str] = []
        for sub, v in value.items():
            out.extend(_override_items(f"{key}.{sub}", v))
        return out
    if isinstance(value, str):
        text = value
    elif isinstance(value, Path):
        text = str(value)
    else:
        if isinstance(value, tuple):
            value = list(value)
        try:
            text = json.dumps(value)  # JSON is YAML flow syntax: true, null, [1, 2], {"a": 1}
        except TypeError as exc:
            raise ConfigError(
                f"override '{key}': cannot express {type(value).__name__} value {value!r} "
                "as YAML (use numbers, strings, bools, None, lists or dicts)"
            ) from exc
    return [f"{key}={text}"]


def _normalise_overrides(
    overrides: Sequence[str] | Mapping[str, Any] | None, kwargs: Mapping[str, Any]
) -> list[str]:
    items: list[str] = []
    if overrides is None:
        pass
    elif isinstance(overrides, str):
        items.append(overrides)
    elif isinstance(overrides, Mapping):
        for key, value in overrides.items():
            items.extend(_override_items(str(key), value))
    else:
        for item in overrides:
            if not isinstance(item, str):
                raise ConfigError(f"overrides: expected 'key=value' strings, got {item!r}")
            items.append(item)
    for key, value in kwargs.items():
        items.extend(_override_items(key.replace("__", "."), value))
    return items


def config(
    path: PathLike | Config | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    /,
    **kwargs: Any,
) -> Config:
    """Load a config and apply overrides, in any of three spellings.

    Args:
        path: a YAML config (``_base_`` inheritance applies), a run folder (its resolved
            ``config.yaml``), an existing :class:`~reidkit.config.Config` (copied, never
            modified) or ``None`` for the defaults.
        overrides: CLI-style strings ``["solver.lr=1e-3", "model.name=agw"]`` or a mapping
            ``{"solver.lr": 1e-3, "model": {"name": "agw"}}`` (section dicts are merged
            key by key).
        **kwargs: keyword overrides with ``__`` for the dots: ``solver__lr=1e-3``, or a
            whole section as a dict: ``data={"height": 128, "width": 64}``.

    Returns:
        The validated :class:`~reidkit.config.Config`. Unknown keys raise
        :class:`~reidkit.config.ConfigError` naming the key (with a suggestion).
    """
    items = _normalise_overrides(overrides, kwargs)
    if isinstance(path, Config):
        # exclude_unset keeps pydantic's "explicitly set" marks, so method presets
        # (model.name=agw -> GeM, non-local, WRT) still apply to fields left at defaults
        raw = apply_overrides(path.model_dump(mode="json", exclude_unset=True), items)
        return config_from_dict(
            raw, "<Config>" + (" (with overrides " + " ".join(items) + ")" if items else "")
        )
    if path is not None:
        p = Path(path)
        if p.is_dir():
            if not (p / "config.yaml").is_file():
                raise ConfigError(
                    f"{p}: a folder without config.yaml (expected a YAML file or a run folder)"
                )
            p = p / "config.yaml"
        return load_config(p, items)
    return load_config(None, items)


def _as_config(cfg: PathLike | Config) -> Config:
    return cfg if isinstance(cfg, Config) else config(cfg)


# ---------------------------------------------------------------------------- weights
def _config_for_weights(weights: Path) -> Config:
    """The config that produced ``weights``: the run folder's ``config.yaml`` or the
    ``config`` entry of a reidkit checkpoint."""
    for folder in (weights.parent, weights.parent.parent):
        if (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir():
            return load_config(folder / "config.yaml")
    from reidkit.engine.checkpoint import load_checkpoint

    obj = load_checkpoint(weights)
    if isinstance(obj.get("config"), dict):
        return config_from_dict(obj["config"], f"{weights} (embedded config)")
    raise ValueError(
        f"{weights}: no config found (no run folder config.yaml, no 'config' in the file); "
        "pass config=... (the YAML the weights were trained with)"
    )


def _device(pref: str | torch.device | None, cfg: Config) -> torch.device:
    from reidkit.engine.distributed import resolve_device

    if isinstance(pref, torch.device):
        return pref
    return resolve_device(pref if pref is not None else cfg.device)


# ------------------------------------------------------------------------------- Run
@dataclass
class Run:
    """A run folder written by :func:`train` / ``reidkit train``.

    Attributes:
        dir: the folder (``output_dir``): ``config.yaml``, ``log.jsonl``,
            ``metrics.json``, ``checkpoints/{last,best,epoch_NNN}.pt``.
    """

    dir: Path

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)

    @property
    def config(self) -> Config:
        """The resolved config of the run (``config.yaml``)."""
        path = self.dir / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"run {self.dir}: config.yaml not found (not a reidkit run folder?)"
            )
        return load_config(path)

    @property
    def metrics(self) -> dict[str, Any]:
        """``metrics.json`` of a finished run: ``{"final": {...}, "best": {...}, "epochs",
        "global_step", "train_time_s", "world_size"}``, metrics as fractions in [0, 1].
        Empty for an unfinished (e.g. stopped) run."""
        path = self.dir / "metrics.json"
        if not path.is_file():
            return {}
        return json.loads(path.read_text())

    @property
    def log(self) -> list[dict[str, Any]]:
        """The records of ``log.jsonl`` (training steps, evaluations), in order."""
        path = self.dir / "log.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def checkpoint(self, which: str = "best") -> Path:
        """Path of ``checkpoints/<which>.pt`` (``best`` falls back to ``last`` when the run
        has not evaluated yet)."""
        folder = self.dir / "checkpoints"
        path = folder / f"{which}.pt"
        if path.is_file():
            return path
        if which == "best" and (folder / "last.pt").is_file():
            return folder / "last.pt"
        raise FileNotFoundError(f"run {self.dir}: checkpoint {path} not found")

    def model(self, which: str = "best", device: str | torch.device = "cpu") -> nn.Module:
        """The trained model (eval mode) from ``checkpoint(which)``."""
        from reidkit.engine import load_model

        return load_model(self.config, self.checkpoint(which), device=device)

    def extractor(
        self, which: str = "best", device: str | torch.device | None = "auto"
    ) -> FeatureExtractor:
        """A :class:`FeatureExtractor` for this run's ``checkpoint(which)``."""
        return FeatureExtractor(config=self.config, weights=self.checkpoint(which), device=device)

    def evaluate(self, which: str = "best", **kwargs: Any) -> EvalResult:
        """:func:`evaluate` of ``checkpoint(which)``."""
        return evaluate(self, weights=self.checkpoint(which), **kwargs)

    def export(self, out: PathLike, which: str = "best", **kwargs: Any) -> ExportResult:
        """ONNX export of ``checkpoint(which)`` (:func:`reidkit.export.export_from_config`;
        ``kwargs``: ``opset``, ``dynamic_batch``, ``batch_size``, ``exporter``, ...)."""
        from reidkit.export import export_from_config

        return export_from_config(self.config, self.checkpoint(which), out, **kwargs)

    def __repr__(self) -> str:
        best = self.metrics.get("best") or {}
        extra = f", best mAP {100 * best['mAP']:.1f}" if "mAP" in best else ""
        return f"Run({str(self.dir)!r}{extra})"


def load_run(path: PathLike) -> Run:
    """The :class:`Run` of an existing run folder (raises if it has no ``config.yaml``)."""
    run = Run(Path(path))
    if not (run.dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run.dir}: not a run folder (no config.yaml)")
    return run


def train(
    cfg: PathLike | Config,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> Run:
    """Train ``cfg`` (a Config or a YAML path) with :func:`reidkit.engine.train`.

    A config on the synthetic set (``data.dataset: synth``) whose
    ``<data.root>/synth-<preset>`` folder does not exist yet renders it first (seed 0,
    said on stdout; :func:`reidkit.data.synth.ensure_synth`).

    Args:
        resume: continue ``<output_dir>/checkpoints/last.pt``.
        overwrite: start over in an ``output_dir`` that already holds a run.
        progress: tqdm progress bars.
        stop_after_epochs: stop after this many epochs (continue later with ``resume``).

    Returns:
        The :class:`Run` of ``cfg.output_dir``.
    """
    from reidkit.data.synth import ensure_synth
    from reidkit.engine import train as engine_train

    cfg = _as_config(cfg)
    if not resume:
        ensure_synth(cfg.data, progress=progress)  # synthetic configs: render the set once
    out = engine_train(
        cfg,
        resume=resume,
        overwrite=overwrite,
        stop_after_epochs=stop_after_epochs,
        progress=progress,
    )
    return Run(Path(out))


def evaluate(
    cfg_or_run: PathLike | Config | Run,
    weights: PathLike | None = None,
    rerank: bool | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate weights on the config's dataset (query vs gallery, ``cfg.test`` options).

    Args:
        cfg_or_run: a :class:`Run` (its config; weights default to its best checkpoint),
            a Config, or a YAML path / run folder.
        weights: checkpoint / weights file or run folder. Default for a config: its
            ``output_dir`` run (``checkpoints/best.pt``, else ``last.pt``).
        rerank: k-reciprocal re-ranking (default ``cfg.test.rerank``).
        device: ``"auto"``, ``"cpu"``, ``"cuda:0"``, ... (default ``cfg.device``).

    Returns:
        :class:`reidkit.engine.EvalResult`: ``metrics`` (``mAP``, ``mINP``, ``rank1``,
        ``rank5``, ``rank10`` as fractions), ``cmc``, the ``query`` / ``gallery``
        :class:`~reidkit.engine.FeatureSet` s and ``table()``.
    """
    from reidkit.data.datasets import dataset_from_config
    from reidkit.engine import evaluate_model, load_model

    if isinstance(cfg_or_run, Run):
        cfg = cfg_or_run.config
        path = resolve_weights(weights) if weights is not None else cfg_or_run.checkpoint()
    else:
        cfg = _as_config(cfg_or_run)
        if weights is None:
            try:
                path = resolve_weights(cfg.output_dir)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"evaluate: no weights given and output_dir {cfg.output_dir} holds no "
                    "checkpoints/best.pt or last.pt; pass weights=... (a checkpoint or run folder)"
                ) from None
        else:
            path = resolve_weights(weights)
    dev = _device(device, cfg)
    model = load_model(cfg, path, device=dev)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    dataset = dataset_from_config(cfg.data)
    result = evaluate_model(cfg, model, dataset, dev, rerank=rerank, progress=progress)
    assert result is not None  # single process: rank 0
    return result


# -------------------------------------------------------------------- FeatureExtractor
class FeatureExtractor:
    """Test-time features of images, exactly as ``reidkit eval`` computes them.

    ``FeatureExtractor(config, weights)(images)`` returns ``(B, D)`` float32 features on
    the CPU, L2-normalised (unless ``test.normalize=false``), computed with the config's
    test transforms (bilinear resize to ``data.height x data.width``, mean/std
    normalisation), test feature (``test.feature``: ``post_bn``/``pre_bn``) and flip
    averaging (``test.flip``), through :func:`reidkit.engine.extract_features`.

    Args:
        config: the model's config: a Config, a YAML path or a run folder. Default: the
            run folder around ``weights`` or the config stored in the checkpoint.
        weights: checkpoint (``.pt``), weights (``.pth`` / ``.safetensors``) or a run
            folder (its ``checkpoints/best.pt``). Loaded with ``weights_only=True``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:1"``...; ``None``
            uses ``config.device``.
        model: an already built model (then ``weights`` is optional and not loaded).
        batch_size: images per forward pass (default ``data.test_batch_size``).
        feature, flip, normalize: override ``test.feature`` / ``test.flip`` /
            ``test.normalize``.
        num_classes: identities of the checkpoint's classifier (inferred by default).
        num_workers: threads that decode image files (default ``data.num_workers``).

    Call with a list of (or a single) file path, PIL image, ``(H, W, 3)`` uint8 array
    (RGB), ``(3, H, W)`` tensor, or with a ``(B, 3, H, W)`` tensor / ``(B, H, W, 3)``
    uint8 array. uint8 tensors and float tensors in ``[0, 1]`` go through the test
    transforms; pass ``normalized=True`` for tensors that already did (e.g. a batch from
    :func:`reidkit.data.loader.build_test_loader`).
    """

    def __init__(
        self,
        config: PathLike | Config | None = None,
        weights: PathLike | None = None,
        device: str | torch.device | None = "auto",
        *,
        model: nn.Module | None = None,
        batch_size: int | None = None,
        feature: str | None = None,
        flip: bool | None = None,
        normalize: bool | None = None,
        num_classes: int | None = None,
        num_workers: int | None = None,
    ) -> None:
        from reidkit.data.transforms import build_test_transforms
        from reidkit.engine import load_model

        path = resolve_weights(weights) if weights is not None else None
        if config is None:
            if path is None:
                raise ValueError(
                    "FeatureExtractor: pass config=... and weights=... (or a run folder as weights)"
                )
            cfg = _config_for_weights(path)
        else:
            cfg = _as_config(config)
        self.cfg: Config = cfg
        self.device: torch.device = _device(device, cfg)
        if model is None:
            if path is None:
                raise ValueError(
                    "FeatureExtractor: weights=... is required (a checkpoint, a weights file or a "
                    "run folder), or pass an already built model=..."
                )
            model = load_model(cfg, path, num_classes=num_classes, device=self.device)
        else:
            model = model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model: nn.Module = model.eval()
        self.weights: Path | None = path
        self.batch_size = int(batch_size or cfg.data.test_batch_size)
        if self.batch_size <= 0:
            raise ValueError(f"FeatureExtractor: batch_size must be positive, got {batch_size}")
        self.feature = feature or cfg.test.feature
        self.flip = cfg.test.flip if flip is None else bool(flip)
        self.normalize = cfg.test.normalize if normalize is None else bool(normalize)
        self.num_workers = cfg.data.num_workers if num_workers is None else int(num_workers)
        self.input_size: tuple[int, int] = (cfg.data.height, cfg.data.width)
        self.transform = build_test_transforms(cfg.data)
        self._dim: int | None = None

    def __repr__(self) -> str:
        return (
            f"FeatureExtractor(method={self.cfg.model.name!r}, backbone={self.cfg.model.backbone!r}, "
            f"weights={str(self.weights) if self.weights else None!r}, device={str(self.device)!r}, "
            f"input={self.input_size[0]}x{self.input_size[1]}, feature={self.feature!r}, "
            f"flip={self.flip}, normalize={self.normalize})"
        )

    @property
    def dim(self) -> int:
        """Feature dimension D (one forward of a blank image the first time)."""
        if self._dim is None:
            blank = torch.zeros(1, 3, *self.input_size)
            self._dim = int(self._extract(iter([blank])).shape[1])
        return self._dim

    # ----------------------------------------------------------------- preprocessing
    def _read(self, item: Any, index: int) -> torch.Tensor:
        """One input -> ``(3, H, W)`` normalised float32 at the model's input size."""
        from reidkit.data.loader import ImageDataset

        if isinstance(item, (str, Path)):
            p = Path(item)
            if not p.is_file():
                raise FileNotFoundError(f"FeatureExtractor: image {index}: file not found: {p}")
            item = ImageDataset.read_image(str(p))
        elif isinstance(item, np.ndarray):
            item = self._array_to_tensor(item, f"image {index}")
        elif isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(
                    f"FeatureExtractor: image {index}: expected a (3, H, W) tensor, got {tuple(item.shape)}"
                )
            self._check_float_range(item, f"image {index}")
        elif isinstance(item, Image.Image):
            if item.mode != "RGB":
                item = item.convert("RGB")
        else:
            raise TypeError(
                f"FeatureExtractor: image {index}: unsupported type {type(item).__name__} "
                "(expected a path, PIL image, (H, W, 3) uint8 array or (3, H, W) tensor)"
            )
        return self.transform(item)

    @staticmethod
    def _array_to_tensor(arr: np.ndarray, what: str) -> torch.Tensor:
        """``(..., H, W, 3)`` uint8 RGB array -> ``(..., 3, H, W)`` uint8 tensor (a view)."""
        if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise ValueError(
                f"FeatureExtractor: {what}: expected an (H, W, 3) or (B, H, W, 3) uint8 RGB array, "
                f"got shape {arr.shape} dtype {arr.dtype}"
            )
        if not arr.flags.writeable:
            arr = arr.copy()
        return torch.from_numpy(arr).movedim(-1, -3)

    @staticmethod
    def _check_float_range(x: torch.Tensor, what: str) -> None:
        if (
            x.is_floating_point()
            and x.numel()
            and (float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3)
        ):
            raise ValueError(
                f"FeatureExtractor: {what}: float image values span [{float(x.min()):.3g}, "
                f"{float(x.max()):.3g}]; expected RGB in [0, 1] (or pass normalized=True for tensors "
                "that are already resized and mean/std-normalised)"
            )

    def _batches(self, items: Sequence[Any]) -> Iterator[torch.Tensor]:
        pool = (
            ThreadPoolExecutor(self.num_workers)
            if self.num_workers > 0 and len(items) > 1
            else None
        )
        try:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                idx = range(start, start + len(chunk))
                if pool is not None:
                    tensors = list(pool.map(self._read, chunk, idx))
                else:
                    tensors = [self._read(item, i) for item, i in zip(chunk, idx)]
                yield torch.stack(tensors)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _tensor_batches(self, x: torch.Tensor, normalized: bool) -> Iterator[torch.Tensor]:
        """Slices of a ``(B, 3, H, W)`` tensor, preprocessed batch-wise (vectorised)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"FeatureExtractor: expected a (B, 3, H, W) tensor, got {tuple(x.shape)}"
            )
        if normalized:
            if not x.is_floating_point():
                raise ValueError(
                    f"FeatureExtractor: normalized=True needs a float tensor, got {x.dtype}"
                )
            if tuple(x.shape[-2:]) != self.input_size:
                raise ValueError(
                    f"FeatureExtractor: normalized tensor is {tuple(x.shape[-2:])} but the model "
                    f"input (data.height, data.width) is {self.input_size}"
                )
        else:
            self._check_float_range(x, "tensor")
        for start in range(0, x.shape[0], self.batch_size):
            chunk = x[start : start + self.batch_size]
            yield chunk if normalized else self.transform(chunk)

    def _extract(self, batches: Iterator[torch.Tensor]) -> torch.Tensor:
        from reidkit.engine import extract_features

        def dicts() -> Iterator[dict[str, Any]]:
            for images in batches:
                n = images.shape[0]
                zeros = torch.zeros(n, dtype=torch.long)
                yield {"images": images, "pids": zeros, "camids": zeros, "paths": []}

        fs = extract_features(
            self.model,
            dicts(),
            self.device,
            flip=self.flip,
            feature=self.feature,
            normalize=self.normalize,
            amp=self.cfg.amp,
            channels_last=self.cfg.channels_last,
        )
        return fs.feats

    # -------------------------------------------------------------------------- call
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | torch.Tensor | np.ndarray,
        normalized: bool = False,
    ) -> torch.Tensor:
        """Features of ``images``.

        Args:
            images: a list of paths / PIL images / ``(H, W, 3)`` uint8 arrays /
                ``(3, H, W)`` tensors (mixed, any sizes), one such image, a
                ``(B, 3, H, W)`` tensor or a ``(B, H, W, 3)`` uint8 array.
            normalized: tensors are already resized and mean/std-normalised (skip the
                test transforms).

        Returns:
            ``(B, D)`` float32 CPU tensor, in input order, L2-normalised when
            ``normalize`` (the default of ``test.normalize``).
        """
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            batches = self._tensor_batches(images, normalized)
            n = images.shape[0]
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            batches = self._tensor_batches(self._array_to_tensor(images, "array"), False)
            n = images.shape[0]
        else:
            if isinstance(images, (str, Path, Image.Image, np.ndarray, torch.Tensor)):
                items: Sequence[Any] = [images]
            elif isinstance(images, Sequence) or hasattr(images, "__iter__"):
                items = list(images)
            else:
                raise TypeError(f"FeatureExtractor: unsupported input {type(images).__name__}")
            if normalized:
                if not all(isinstance(t, torch.Tensor) for t in items):
                    raise ValueError("FeatureExtractor: normalized=True is only for tensors")
                stacked = torch.stack(list(items)) if items else torch.zeros(0, 3, *self.input_size)
                return self(stacked, normalized=True)
            batches = self._batches(items)
            n = len(items)
        if n == 0:
            return torch.zeros(0, self.dim)
        feats = self._extract(batches)
        if feats.shape[0] != n:  # pragma: no cover - extract_features keeps every image
            raise RuntimeError(f"FeatureExtractor: {feats.shape[0]} features for {n} images")
        if self._dim is None:
            self._dim = int(feats.shape[1])
        return feats

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix ``(Na, Nb)`` of two feature sets ``(Na, D)``,
        ``(Nb, D)`` (features are re-normalised, so raw features work too)."""
        a = torch.nn.functional.normalize(a.float(), dim=1)
        b = torch.nn.functional.normalize(b.float(), dim=1)
        return a @ b.T
