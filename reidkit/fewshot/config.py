"""Typed few-shot configs (``reidkit fewshot train|eval -c CONFIG [key=value ...]``).

Same conventions as :mod:`reidkit.config` (and its YAML helpers: ``_base_`` inheritance,
YAML 1.2 scalars, ``key.sub=value`` overrides): unknown keys are errors that suggest the
closest valid key and name the file that set them.

Sections: ``data`` (dataset, image size, augmentation, loader), ``episode`` (N-way K-shot,
queries), ``model`` (``can`` or the ``proto`` baseline, backbone, scale, attention),
``loss``, ``solver`` (SGD and the step schedule of the authors' code), ``eval``.
Defaults are the CAN code's miniImageNet 5-way 1-shot settings.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from reidkit.config import ConfigError, _read_yaml_tracked, apply_overrides

__all__ = [
    "FewShotConfig",
    "load_fewshot_config",
    "fewshot_config_from_dict",
    "dump_fewshot_config",
    "lr_at_epoch",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FewShotDataConfig(_Section):
    # mini_imagenet, tiered_imagenet, or reid (any reidkit re-ID dataset: identities = classes)
    dataset: Literal["mini_imagenet", "tiered_imagenet", "reid"] = "mini_imagenet"
    root: str = "data"  # folder holding the dataset folder (or the dataset folder itself)
    # mini/tiered: csv (images/ + {train,val,test}.csv), folders ({split}/<class>/*), pickle
    # (the common caches), or auto (the first layout found, in that order)
    format: Literal["auto", "csv", "folders", "pickle"] = "auto"
    # dataset=reid: the re-ID registry name and options (see reidkit.data.datasets)
    reid_name: str = "synth"
    reid_options: dict[str, Any] = Field(default_factory=dict)  # e.g. {preset: small}
    # identities left out of the few-shot classes; None: the dataset's distractor label
    # (pid 0 for market1501 / dukemtmc-style / synth sets), none otherwise
    reid_exclude_pids: list[int] | None = None
    height: int = Field(84, gt=0)
    width: int = Field(84, gt=0)
    # training augmentation (the code: RandomCrop(84, padding=8), flip, RandomErasing(0.5))
    pad: int = Field(8, ge=0)
    hflip_p: float = Field(0.5, ge=0, le=1)
    random_erasing_p: float = Field(0.5, ge=0, le=1)
    random_erasing_sl: float = Field(0.02, gt=0, le=1)
    random_erasing_sh: float = Field(0.4, gt=0, le=1)
    random_erasing_r1: float = Field(0.3, gt=0)
    random_erasing_fill: Literal["mean", "random", "zero"] = "mean"
    # values written into the *normalised* erased box (the code's: the CIFAR-10 mean)
    random_erasing_values: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    color_jitter: float = Field(0.0, ge=0, le=1)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    num_workers: int = Field(2, ge=0)


class EpisodeConfig(_Section):
    way: int = Field(5, ge=2)
    shot: int = Field(1, ge=1)
    train_queries: int = Field(6, ge=1)  # per class (the code: 6 x 5 = 30 per episode)
    test_queries: int = Field(15, ge=1)  # per class (75 per 5-way episode)
    batch: int = Field(4, ge=1)  # episodes per SGD step (the code's train-batch)


class FewShotModelConfig(_Section):
    name: Literal["can", "proto"] = "can"  # proto: the same network without cross attention
    backbone: Literal["resnet12"] = "resnet12"
    width: int = Field(64, ge=1)  # ResNet-12 widths (w, 2w, 4w, 8w); 64 = the paper's
    scale: float = Field(7.0, gt=0)  # cosine scale of the nearest-neighbour logits
    temperature: float = Field(0.025, gt=0)  # attention softmax temperature
    fusion_reduction: int = Field(6, ge=1)  # meta fusion hidden = hw // reduction
    attention_residual: bool = True  # A = softmax(.) + 1 (the code)


class FewShotLossConfig(_Section):
    global_weight: float = Field(1.0, ge=0)  # CE over all training classes, every position
    nn_weight: float = Field(0.5, ge=0)  # nearest-neighbour (prototype) CE, every position


class FewShotSolverConfig(_Section):
    optimizer: Literal["sgd"] = "sgd"
    momentum: float = Field(0.9, ge=0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    # the code's "LUT": [until_epoch, lr] pairs; epoch e (0-based) uses the lr of the first
    # pair with e < until_epoch (miniImageNet: 0.1 to 60, then 0.006, 0.0012, 0.00024)
    lr_schedule: list[tuple[int, float]] = Field(
        default_factory=lambda: [(60, 0.1), (70, 0.006), (80, 0.0012), (90, 0.00024)]
    )
    max_epochs: int | None = Field(None, gt=0)  # None: the last until_epoch of lr_schedule
    episodes_per_epoch: int = Field(1200, gt=0)  # the code: 1200 (mini), 13980 (tiered)
    grad_clip: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check_schedule(self) -> FewShotSolverConfig:
        steps = self.lr_schedule
        if not steps:
            raise ValueError("lr_schedule must have at least one [until_epoch, lr] pair")
        ends = [e for e, _ in steps]
        if any(b <= a for a, b in zip(ends, ends[1:])) or ends[0] <= 0:
            raise ValueError(f"lr_schedule: until_epoch values must increase and be > 0: {ends}")
        if any(lr <= 0 for _, lr in steps):
            raise ValueError("lr_schedule: learning rates must be > 0")
        if self.max_epochs is not None and self.max_epochs > ends[-1]:
            raise ValueError(
                f"max_epochs={self.max_epochs} runs past the lr_schedule (last until_epoch "
                f"{ends[-1]}); extend lr_schedule"
            )
        return self

    @property
    def epochs(self) -> int:
        return self.max_epochs if self.max_epochs is not None else self.lr_schedule[-1][0]


class FewShotEvalConfig(_Section):
    split: Literal["test", "val"] = "test"
    episodes: int = Field(2000, gt=0)
    seed: int = 112  # the code's test-episode seed
    batch: int = Field(4, ge=1)  # episodes per forward when features are not cached
    transductive: bool = True  # also report CAN+T (costs little: same features)
    transductive_iterations: int = Field(2, ge=0)
    # queries added per iteration = max(1, floor(fraction * queries)): 35 of 75 in the code
    transductive_fraction: float = Field(35 / 75, gt=0, le=1)
    # extract each needed image once and score episodes from the cache when it fits
    feature_cache_mb: float = Field(2048.0, ge=0)
    # during training: evaluate every N epochs (0: only at the end) on `val_split`
    period: int = Field(10, ge=0)
    val_split: Literal["val", "test"] = "val"  # falls back to test if there is no val split
    val_episodes: int = Field(500, gt=0)


class FewShotConfig(_Section):
    """A whole few-shot experiment."""

    seed: int = 1
    output_dir: str = "runs/fewshot/default"
    device: str = "auto"
    log_period: int = Field(50, gt=0)  # iterations between log.jsonl rows
    data: FewShotDataConfig = Field(default_factory=FewShotDataConfig)
    episode: EpisodeConfig = Field(default_factory=EpisodeConfig)
    model: FewShotModelConfig = Field(default_factory=FewShotModelConfig)
    loss: FewShotLossConfig = Field(default_factory=FewShotLossConfig)
    solver: FewShotSolverConfig = Field(default_factory=FewShotSolverConfig)
    eval: FewShotEvalConfig = Field(default_factory=FewShotEvalConfig)


def lr_at_epoch(solver: FewShotSolverConfig, epoch: int) -> float:
    """The learning rate of (0-based) ``epoch``: the lr of the first ``[until, lr]`` pair of
    ``solver.lr_schedule`` with ``epoch < until`` (the authors' ``adjust_learning_rate``)."""
    for until, lr in solver.lr_schedule:
        if epoch < until:
            return float(lr)
    raise ValueError(
        f"epoch {epoch} is past solver.lr_schedule (last until_epoch {solver.lr_schedule[-1][0]})"
    )


# ------------------------------------------------------------------------ loading
_TEXT_FIELDS = {("output_dir",), ("device",), ("data", "root"), ("data", "reid_name")}


def _fields_at(dotted: list[str]) -> list[str]:
    model: Any = FewShotConfig
    for part in dotted:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(exc: ValidationError, source: str, origins: dict) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc[-1], _fields_at(loc[:-1]), n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join(loc[:-1] + close)}'?" if close else ""
            line = f"unknown key '{key}'{hint}"
        else:
            line = f"'{key}': {err['msg']} (got {err.get('input')!r})"
        for n in range(len(loc), 0, -1):
            origin = origins.get(tuple(loc[:n]))
            if origin is not None:
                line += f" [set in {origin}]"
                break
        lines.append(line)
    return ConfigError(f"{source}: invalid few-shot config:\n  " + "\n  ".join(lines))


def fewshot_config_from_dict(
    data: dict, source: str = "<dict>", origins: dict | None = None
) -> FewShotConfig:
    """Validate a plain dict (errors name ``source``, the key and the file that set it)."""
    data = copy.deepcopy(data)  # never modify the caller's nested dicts
    for path in _TEXT_FIELDS:  # output_dir: 2024 is a folder name, not a number
        node = data
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(path[-1]), int | float):
            node[path[-1]] = str(node[path[-1]])
    try:
        return FewShotConfig.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc, source, origins or {}) from None


def load_fewshot_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> FewShotConfig:
    """Load a few-shot YAML config (``_base_`` inheritance) with ``key=value`` overrides."""
    raw: dict = {}
    origins: dict[tuple[str, ...], str] = {}
    if path is not None:
        raw, origins = _read_yaml_tracked(Path(path))
    raw = apply_overrides(raw, list(overrides))
    for item in overrides:
        key = tuple(item.partition("=")[0].strip().split("."))
        origins = {k: v for k, v in origins.items() if k[: len(key)] != key}
        origins[key] = f"override {item}"
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    return fewshot_config_from_dict(raw, source, origins)


def dump_fewshot_config(cfg: FewShotConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML (the run folder's ``config.yaml``)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
