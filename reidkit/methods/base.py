"""The method contract every re-ID method follows, and the method registry.

A method is an ``nn.Module`` built as ``cls(cfg, num_classes)`` from a
:class:`~reidkit.config.Config` and the number of training identities. It sees whole
batches (the collated dicts of :mod:`reidkit.data.loader`), owns its optimisation and
says how it is evaluated. See ``docs/architecture.md`` for the picture and a short
example method.

Training::

    outputs = method(batch)                          # forward(batch) -> dict of tensors
    losses = method.compute_loss(outputs, batch)     # dict of named scalar terms
    method.train_step(batch, ctx)                    # default: the two above + ctx.step(losses)
    method.optimizers(cfg)                           # {"main": OptimizerSpec, ...}
    method.training_hooks(cfg)                       # e.g. the classifier-only warm phase

Evaluation::

    method.encode(batch, role)     # {"post_bn": (B, D), ...}: vectors (+ extra tensors);
                                   # clip batches: (B, T, D) per frame or (B, D) per clip
    method.pairwise_distance(q, g) # None: cfg.test.metric on the vectors; else (q, G) distances
    method.eval_extras(cfg, dataset, device)   # extra metrics (CAMA's branch overlap)
    method.report_views(images)    # extra overlays for the ranking report (CAN's attention)

Class attributes declare what the method needs and offers: ``requires`` (batch keys the
training data must provide; a dataset without them is refused before training starts),
``eval_requires`` (the same for evaluation; ``batch_requirements(cfg)`` when they depend on
the method's options), ``feature_names`` (allowed ``test.feature``
values, checked when a config is loaded), ``keep_for_eval`` (extra ``encode`` outputs
stored with the features, e.g. feature maps for pairwise scoring) and ``exportable``
(``False`` when the score is not a distance between vectors: ONNX export and the FAISS
gallery index then refuse the method), ``evaluates_reid`` (``False`` for a network that
is not a re-ID model, e.g. VRSTC's completion network: evaluation reports only
``eval_extras``) and ``best_metric`` (the metric, higher is better, that picks
``best.pt``; ``mAP`` by default).

Registration: ``@register_method(name, options=Options, section="name", presets=...)``
on the class. ``Options`` is the method's own typed config section (``model.<section>``,
validated when a config is loaded, unknown keys get a "did you mean"); ``presets`` are
config values the method implies (``{"loss": {"metric": "wrt"}}``), applied when the
config is loaded under the explicit values, so building a model never changes a config.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from reidkit.config import Config

if TYPE_CHECKING:  # pragma: no cover
    from reidkit.data.records import ReIDDataset
    from reidkit.engine.extract import FeatureSet
    from reidkit.engine.hooks import HookBase
    from reidkit.engine.optim import OptimizerSpec
    from reidkit.engine.step import StepContext

__all__ = [
    "Batch",
    "Role",
    "ReIDMethod",
    "MethodOptions",
    "MethodSpec",
    "MissingBatchKeyError",
    "EvalExtras",
    "ReportView",
    "register_method",
    "method_spec",
    "all_method_specs",
    "available_methods",
    "build_method",
    "method_options",
    "check_requirements",
    "KEY_HINTS",
]

#: A collated batch: ``images`` (B, 3, H, W) or ``clips`` (B, T, 3, H, W) + ``clip_mask``
#: (B, T), ``pids`` (B,), ``camids`` (B,), ``index`` (B,), ``paths``, and optional keys
#: such as ``keypoints`` (B, 17, 3).
Batch = dict[str, Any]
Role = Literal["query", "gallery"]

#: How a user provides a batch key that a dataset lacks (used in refusal messages).
KEY_HINTS: dict[str, str] = {
    "images": "train on an image dataset (market1501, dukemtmc, msmt17, cuhk03, synth, ...)",
    "clips": "train on a video (tracklet) dataset, e.g. data.dataset=mars or the synthetic "
    "video set (`reidkit synth --video`)",
    "keypoints": "the dataset has no keypoints: set data.keypoints=FILE (COCO keypoint "
    "results or a per-split JSON, see docs/keypoints.md), create them with "
    "`reidkit keypoints --onnx MODEL --dataset NAME --out FILE`, or use the synthetic set "
    "(`reidkit synth`), which has them",
}


class MissingBatchKeyError(ValueError):
    """A method needs a batch key the dataset does not provide; the message says how."""


class MethodOptions(BaseModel):
    """Base class of a method's typed options section (``model.<section>``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its class, options section and presets."""

    name: str
    cls: type[ReIDMethod]
    options: type[BaseModel] | None = None
    section: str | None = None
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


@dataclass
class EvalExtras:
    """What :meth:`ReIDMethod.eval_extras` adds to an evaluation: metrics (stored in
    ``EvalResult.metrics``) and text notes that the caller prints (the library itself
    never prints from inside evaluation)."""

    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportView:
    """An overlay a method adds to the ranking report (:meth:`ReIDMethod.report_views`).

    ``heat``: ``(1 + k, h, w)`` one map per cell of a report row (the query, then its
    ranked gallery items), drawn over that cell's image. ``partner_heat``: optional
    ``(1 + k, h, w)`` maps drawn over the *query* image and shown next to each gallery
    cell (pairwise methods: where the query looks given that item; entry 0 is unused).
    ``vmin`` / ``vmax``: the colour scale (default: each map's own range).
    """

    key: str
    label: str
    heat: torch.Tensor
    partner_heat: torch.Tensor | None = None
    vmin: float | None = None
    vmax: float | None = None


_METHODS: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    options: type[BaseModel] | None = None,
    section: str | None = None,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> Callable[[type[ReIDMethod]], type[ReIDMethod]]:
    """Class decorator: register a :class:`ReIDMethod` subclass as ``model.name=name``.

    Args:
        name: the registry name.
        options: the method's typed options (a :class:`MethodOptions` subclass), read from
            ``cfg.model.<section>``; see :func:`method_options`.
        section: the options' key under ``model`` (default: ``name``).
        presets: ``{"section": {"field": value}}`` config values the method implies; a
            config that sets a field explicitly keeps its value.

    The same class may be registered under several names (with different presets).
    """

    def deco(cls: type[ReIDMethod]) -> type[ReIDMethod]:
        if not (isinstance(cls, type) and issubclass(cls, ReIDMethod)):
            raise TypeError(
                f"register_method('{name}'): expected a ReIDMethod subclass, got {cls!r}"
            )
        if name in _METHODS and _METHODS[name].cls is not cls:
            raise ValueError(f"method '{name}' registered twice")
        if options is not None and not (
            isinstance(options, type) and issubclass(options, BaseModel)
        ):
            raise TypeError(f"register_method('{name}'): options must be a pydantic model class")
        _METHODS[name] = MethodSpec(
            name=name,
            cls=cls,
            options=options,
            section=(section or name) if options is not None else None,
            presets={k: dict(v) for k, v in (presets or {}).items()},
        )
        return cls

    return deco


@functools.cache
def _import_all() -> None:
    # Importing the modules runs their @register_method decorators.
    import importlib
    import pkgutil

    import reidkit.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in ("base",) and not info.name.startswith("_"):
            importlib.import_module(f"reidkit.methods.{info.name}")


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; ``ValueError`` with a suggestion if unknown."""
    _import_all()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(
            f"model.name: unknown method '{name}'{hint} (available: {', '.join(sorted(_METHODS))})"
        )
    return _METHODS[name]


def all_method_specs() -> list[MethodSpec]:
    _import_all()
    return [_METHODS[k] for k in sorted(_METHODS)]


def available_methods() -> list[str]:
    _import_all()
    return sorted(_METHODS)


def build_method(cfg: Config, num_classes: int) -> ReIDMethod:
    """Build the method named by ``cfg.model.name`` for ``num_classes`` train identities.

    ``cfg`` is read, never modified (presets were applied when it was loaded).
    """
    return method_spec(cfg.model.name).cls(cfg, num_classes)


def method_options(cfg: Config, options: type[BaseModel], section: str) -> Any:
    """The method's options ``cfg.model.<section>``, or the defaults when the config was
    built for another method (e.g. a plain ``Config()`` in a test)."""
    value = getattr(cfg.model, section, None)
    if isinstance(value, options):
        return value
    if value is None:
        return options()
    return options.model_validate(value if isinstance(value, dict) else value.model_dump())


def check_requirements(
    method: str, required: frozenset[str] | set[str], available: set[str], split: str = "train"
) -> None:
    """Refuse a dataset that lacks batch keys the method needs, saying how to provide them."""
    missing = sorted(set(required) - set(available))
    if missing:
        lines = [
            f"{method} needs '{key}' in the {split} batches: {KEY_HINTS.get(key, '')}"
            for key in missing
        ]
        raise MissingBatchKeyError("; ".join(line.rstrip(": ") for line in lines))


class ReIDMethod(nn.Module):
    """Base class: default optimisation, training step and evaluation.

    Subclasses implement :meth:`forward` and :meth:`compute_loss` (training) and
    :meth:`encode` (evaluation), and override the rest where they differ.
    """

    #: batch keys the training data must provide
    requires: ClassVar[frozenset[str]] = frozenset({"images"})
    #: batch keys the query / gallery data must provide
    eval_requires: ClassVar[frozenset[str]] = frozenset({"images"})
    #: names :meth:`encode` returns as vectors; ``test.feature`` must be one of them
    feature_names: ClassVar[tuple[str, ...]] = ("post_bn", "pre_bn")
    #: other :meth:`encode` outputs kept in the FeatureSet (``extras``) for scoring
    keep_for_eval: ClassVar[tuple[str, ...]] = ()
    #: False when the query-gallery score is not a distance between vectors
    exportable: ClassVar[bool] = True
    #: False for a network that is not a re-ID model (VRSTC's completion network): the
    #: evaluator then reports only :meth:`eval_extras` (no query/gallery ranking)
    evaluates_reid: ClassVar[bool] = True
    #: the evaluation metric (higher is better) that picks ``best.pt``
    best_metric: ClassVar[str] = "mAP"
    #: the method's own mode on video datasets (``test.video_mode=auto``): ``v2v``,
    #: ``i2v``, ``v2i`` or ``i2i`` (reidkit.engine.video_eval)
    video_mode: ClassVar[str] = "v2v"

    @classmethod
    def batch_requirements(cls, cfg: Config) -> tuple[frozenset[str], frozenset[str]]:
        """``(train keys, query/gallery keys)`` the method needs under ``cfg``.

        Default: the class attributes ``requires`` and ``eval_requires``. Methods whose
        needs depend on their options override it (MGRe needs keypoints for training only
        while its location loss is on, and at test time only when it places its regions
        from keypoints). The trainer and :func:`reidkit.engine.evaluate_model` check it.
        """
        return frozenset(cls.requires), frozenset(cls.eval_requires)

    # ------------------------------------------------------------------ training
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Training outputs for a batch (a dict of tensors)."""
        raise NotImplementedError

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        """Weighted, named scalar loss terms; the step optimises their sum."""
        raise NotImplementedError

    def train_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        """One optimisation step: forward (through ``ctx``: DDP / compile / autocast),
        loss, backward and the step of every optimiser active in this epoch.

        Override for other schedules (a GAN: discriminator step, then generator step,
        each with ``ctx.step(losses, optimizers=[...])``). Returns what ``ctx`` recorded.
        """
        outputs = ctx.forward(batch)
        losses = self.compute_loss(outputs, batch)
        ctx.step(losses, extras={"acc": batch_accuracy(outputs, batch)})
        with torch.no_grad():
            self.on_step_end(outputs, batch)
        return ctx.stats

    def optimizers(self, cfg: Config) -> dict[str, OptimizerSpec]:
        """Named optimisers with their parameter groups, schedules and phases.

        Default: ``main`` (every trainable parameter except center-loss centres, the
        ``solver`` optimiser and schedule); with ``solver.classifier_warm_epochs = W > 0``
        a ``warm`` optimiser over :meth:`classifier_parameters` for epochs ``0..W-1``
        (``main`` then starts at epoch ``W``); with center loss, ``center``: plain SGD at
        ``loss.center_lr`` whose gradients are rescaled by ``1 / loss.center_weight``
        (BoT), active with ``main``.
        """
        from reidkit.engine.optim import default_optimizers

        return default_optimizers(self, cfg)

    def training_hooks(self, cfg: Config) -> list[HookBase]:
        """Trainer hooks the method brings. Default: with a classifier-only warm phase, a
        freeze hook that trains only :meth:`classifier_parameters` in those epochs and keeps
        every other module in eval mode (their BN statistics do not move)."""
        from reidkit.engine.hooks import FreezeHook

        warm = cfg.solver.classifier_warm_epochs
        if warm <= 0:
            return []
        params = [p for p in self.classifier_parameters() if p.requires_grad]
        if not params:
            raise ValueError(
                f"solver.classifier_warm_epochs={warm} but {type(self).__name__}."
                "classifier_parameters() is empty"
            )
        return [FreezeHook(self, params, start_epoch=0, end_epoch=warm, name="classifier warm")]

    def on_epoch_start(self, epoch: int, max_epochs: int) -> None:  # noqa: B027
        """Called before each epoch (0-based over the whole run)."""

    def on_step_end(self, outputs: dict[str, torch.Tensor], batch: Batch) -> None:  # noqa: B027
        """Called after the optimiser step, under ``no_grad`` (e.g. CGE's memory write)."""

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters trained in a classifier-only warm phase."""
        return iter(())

    # ---------------------------------------------------------------- evaluation
    def encode(
        self, batch: Batch, role: Role = "gallery"
    ) -> dict[str, torch.Tensor]:  # pragma: no cover
        """Test-time outputs for a batch: every name of ``feature_names`` as a ``(B, D)``
        vector (not normalised; the extractor flips / normalises) plus, optionally, the
        extra tensors named in ``keep_for_eval``. ``role`` lets query and gallery be
        encoded differently (image query vs video gallery).

        Video methods (``"clips"`` in ``requires`` / ``eval_requires``) also receive clip
        batches (``clips`` (B, T, 3, H, W), ``clip_mask`` (B, T); test chunks of a
        tracklet) and return per-frame features ``(B, T, D)`` (the evaluator averages the
        real frames of all chunks of a tracklet: temporal average pooling) or per-clip
        ``(B, D)`` features; on video datasets they must also encode image batches (one
        frame of a tracklet: the I2V / V2I / I2I modes). See
        :mod:`reidkit.engine.video_eval`."""
        raise NotImplementedError

    def pairwise_distance(self, query: FeatureSet, gallery: FeatureSet) -> torch.Tensor | None:
        """``(q, G)`` distances (smaller = closer) of a chunk of queries to the gallery, for
        methods whose score is not a vector distance; ``None`` (default): the evaluator uses
        ``test.metric`` on the vectors. Called with query chunks, so memory stays bounded."""
        return None

    def eval_extras(
        self, cfg: Config, dataset: ReIDDataset, device: torch.device
    ) -> EvalExtras | None:
        """Extra metrics and notes for an evaluation (default: none)."""
        return None

    def report_views(self, images: torch.Tensor) -> list[ReportView]:
        """Extra overlays for one row of the ranking report: ``images`` ``(1 + k, 3, H, W)``
        (normalised), the query first, then its ranked gallery items. Default: none."""
        return []

    @classmethod
    def has_pairwise_score(cls) -> bool:
        return cls.pairwise_distance is not ReIDMethod.pairwise_distance


def batch_accuracy(outputs: Any, batch: Batch) -> torch.Tensor:
    """Top-1 training accuracy of ``outputs["logits"]`` (NaN when there are none)."""
    pids = batch["pids"]
    logits = outputs.get("logits") if isinstance(outputs, dict) else None
    if isinstance(logits, (list, tuple)) and logits:
        logits = logits[0]
    if isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.shape[0] == pids.shape[0]:
        return (logits.detach().argmax(1) == pids).float().mean()
    return torch.tensor(float("nan"), device=pids.device)
