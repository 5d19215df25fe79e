"""Grad-CAM (Selvaraju et al., ICCV 2017) of any layer of any model, for any scalar.

For a layer with activations ``A (B, K, h, w)`` and a per-image score ``y_b``::

    alpha_bk = mean_{x,y} d y_b / d A_bk(x, y)          (global-average-pooled gradients)
    map_b    = ReLU( sum_k alpha_bk A_bk )                (h, w)

then each map is divided by its maximum, so it lies in [0, 1] (0 where nothing speaks for
the score, all-zero maps stay zero). Unlike CAM (:mod:`reidkit.viz.cam`) it needs no
particular head, so it explains a class logit, one part classifier of a multi-part model
(SCR's stripes and channel groups separately, as Fig. 3 of the SCR supplementary), or the
similarity of a query and a gallery image (what makes two images match).

Targets are callables ``outputs -> (B,)`` on whatever the forward returns; helpers:
:func:`class_logit`, :func:`part_logit`, :func:`pair_similarity` (batch = queries then
galleries; :func:`pair_grad_cam` wraps it) and :func:`similarity_to` (a fixed reference
feature). The model runs in eval mode by default, so BatchNorm does not mix the images of
a batch and each image's map is the gradient of its own score. Gradients are taken with
``torch.autograd.grad``: the model's ``.grad`` fields are not touched.

Comparing maps: :func:`map_overlap` (IoU of the top-k cells, per image) and
:func:`map_overlap_matrix` (every pair of several map sets, e.g. SCR's parts).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.viz.cam import eval_mode
from reidkit.viz.grid import image_grid, overlay_maps, save_image_grid, to_uint8_images
from reidkit.viz.overlap import pairwise_mask_iou, topk_masks

__all__ = [
    "GradCAM",
    "Target",
    "resolve_layer",
    "default_forward",
    "compute_grad_cam",
    "grad_cam",
    "class_logit",
    "part_logit",
    "pair_similarity",
    "similarity_to",
    "pair_grad_cam",
    "normalize_maps",
    "map_overlap",
    "map_overlap_matrix",
    "overlay_maps",
    "image_grid",
    "save_image_grid",
    "to_uint8_images",
]

#: A Grad-CAM target: model outputs -> per-image scores ``(B,)`` (or one scalar).
Target = Callable[[Any], torch.Tensor]


@dataclass
class GradCAM:
    """Everything one Grad-CAM pass computed.

    ``maps (B, h, w)`` in [0, 1] (always after the ReLU); ``raw (B, h, w)`` the map
    before normalisation (after the ReLU unless ``relu=False``); ``weights (B, K)`` the pooled gradients ``alpha``;
    ``scores (B,)`` the explained scores (or ``(1,)`` for a scalar target).
    """

    maps: torch.Tensor
    raw: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


# ------------------------------------------------------------------------------ core
def resolve_layer(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    """``layer`` itself if it is a submodule of ``model``, or the submodule at a dotted
    name (``"backbone.layer4"``, ``"backbone.layer3.5"``); a clear error otherwise."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(
                f"Grad-CAM layer {type(layer).__name__} is not a submodule of the model"
            )
        return layer
    try:
        return model.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Grad-CAM layer '{layer}': no such submodule in {type(model).__name__}{hint}"
        ) from None


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale each map ``(..., h, w)`` into [0, 1] by its maximum (non-negative maps;
    all-zero maps stay zero)."""
    peak = maps.flatten(-2).amax(dim=-1).clamp_min(eps)
    return (maps / peak[..., None, None]).clamp(0, 1)


def compute_grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: nn.Module | str,
    target: Target,
    *,
    forward: Callable[[torch.Tensor], Any] | None = None,
    relu: bool = True,
    use_eval_mode: bool = True,
) -> GradCAM:
    """Grad-CAM of ``layer`` for ``target``; see the module docstring.

    Args:
        model: any ``nn.Module``.
        images: ``(B, 3, H, W)`` input batch (as the model expects it).
        layer: a submodule or its dotted name; its output must be ``(B, K, h, w)`` and it
            must run once per forward.
        target: ``outputs -> (B,)`` scores (a helper of this module or any callable).
        forward: how to run the model, ``images -> outputs`` (default
            :func:`default_forward`: a reidkit method's test feature; e.g.
            ``lambda x: model({"images": x})`` to get the logits of a reidkit method in eval
            mode).
        relu: apply the ReLU of Grad-CAM (``False`` keeps negative evidence in ``raw``).
        use_eval_mode: run the model in eval mode (restored afterwards).

    Returns:
        :class:`GradCAM` with ``maps (B, h, w)`` in [0, 1].
    """
    if images.dim() != 4:
        raise ValueError(f"Grad-CAM: images must be (B, C, H, W), got {tuple(images.shape)}")
    module = resolve_layer(model, layer)
    run = forward if forward is not None else default_forward(model)
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"Grad-CAM layer {type(_mod).__name__}: output must be (B, K, h, w), got {got}"
            )
        act = out if out.requires_grad else out.detach().requires_grad_(True)
        captured.append(act)
        # a clone downstream, so in-place ops after the layer cannot change the activations
        return act.clone()

    handle = module.register_forward_hook(hook)
    ctx = eval_mode(model) if use_eval_mode else contextlib.nullcontext()
    try:
        with ctx, torch.enable_grad():
            outputs = run(images)
            scores = target(outputs)
            if not isinstance(scores, torch.Tensor) or scores.dim() > 1:
                raise ValueError(
                    "Grad-CAM target must return per-image scores (B,) or a scalar, got "
                    f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
                )
            if scores.dim() == 1 and scores.shape[0] != images.shape[0]:
                raise ValueError(
                    f"Grad-CAM target returned {scores.shape[0]} scores for {images.shape[0]} images"
                )
            if len(captured) != 1:
                raise ValueError(
                    f"Grad-CAM layer {type(module).__name__} ran {len(captured)} times in one forward; "
                    "pick a layer that runs exactly once"
                )
            act = captured[0]
            if not scores.requires_grad:
                raise ValueError(
                    "Grad-CAM target does not depend on the chosen layer (no gradient)"
                )
            (grad,) = torch.autograd.grad(scores.sum(), act, allow_unused=True)
    finally:
        handle.remove()
    if grad is None:
        raise ValueError("Grad-CAM target does not depend on the chosen layer (no gradient)")
    act, grad = act.detach().float(), grad.float()
    weights = grad.mean(dim=(-2, -1))  # (B, K)
    raw = torch.einsum("bk,bkhw->bhw", weights, act)
    if relu:
        raw = raw.clamp_min(0)
    maps = normalize_maps(raw.clamp_min(0))
    return GradCAM(maps=maps, raw=raw, weights=weights, scores=scores.detach().reshape(-1))


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    layer: nn.Module | str,
    target: Target,
    *,
    forward: Callable[[torch.Tensor], Any] | None = None,
    use_eval_mode: bool = True,
) -> torch.Tensor:
    """Per-image Grad-CAM maps ``(B, h, w)`` in [0, 1] (see :func:`compute_grad_cam`)."""
    return compute_grad_cam(
        model, images, layer, target, forward=forward, use_eval_mode=use_eval_mode
    ).maps


# --------------------------------------------------------------------------- targets
def _pick(outputs: Any, key: str | None, what: str) -> Any:
    if key is None or isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if key not in outputs:
            raise KeyError(
                f"{what}: the model outputs have no '{key}' (keys: {', '.join(map(str, outputs))})"
            )
        return outputs[key]
    raise TypeError(f"{what}: expected a tensor or a dict of outputs, got {type(outputs).__name__}")


def _select_logit(
    logits: torch.Tensor, index: int | Sequence[int] | torch.Tensor | None
) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            f"expected logits (B, num_classes), got {getattr(logits, 'shape', type(logits))}"
        )
    b = logits.shape[0]
    if index is None:
        idx = logits.detach().argmax(dim=1)
    else:
        idx = torch.as_tensor(index, dtype=torch.long, device=logits.device)
        if idx.dim() == 0:
            idx = idx.expand(b)
        if idx.shape != (b,):
            raise ValueError(
                f"class index must be an int or have shape ({b},), got {tuple(idx.shape)}"
            )
        if int(idx.min()) < 0 or int(idx.max()) >= logits.shape[1]:
            raise ValueError(f"class index out of range for {logits.shape[1]} classes")
    return logits.gather(1, idx[:, None]).squeeze(1)


def class_logit(
    index: int | Sequence[int] | torch.Tensor | None = None, key: str = "logits"
) -> Target:
    """Target: the logit of class ``index`` (int or ``(B,)``; ``None``: each image's
    predicted class). Outputs: a ``(B, num_classes)`` tensor or a dict holding it at
    ``key``."""

    def target(outputs: Any) -> torch.Tensor:
        return _select_logit(_pick(outputs, key, "class_logit"), index)

    return target


def part_logit(
    part: str | int,
    index: int | Sequence[int] | torch.Tensor | None = None,
    key: str = "part_logits",
) -> Target:
    """Target: the logit of class ``index`` in the classifier of one named part.

    Outputs: a dict whose ``key`` entry maps part names to ``(B, num_classes)`` logits
    (e.g. SCR's ``p2_s1`` stripe or ``p2_c1`` channel group), or a sequence indexed by
    an int ``part``.
    """

    def target(outputs: Any) -> torch.Tensor:
        parts = _pick(outputs, key, "part_logit")
        if isinstance(parts, Mapping):
            if part not in parts:
                raise KeyError(
                    f"part_logit: no part '{part}' (parts: {', '.join(map(str, parts))})"
                )
            return _select_logit(parts[part], index)
        if isinstance(parts, Sequence) and isinstance(part, int):
            if not -len(parts) <= part < len(parts):
                raise IndexError(f"part_logit: part {part} out of range for {len(parts)} parts")
            return _select_logit(parts[part], index)
        raise TypeError(
            f"part_logit: outputs['{key}'] must map part names to logits (or be a list indexed by int), "
            f"got {type(parts).__name__} with part {part!r}"
        )

    return target


def _similarity(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "cosine":
        return F.cosine_similarity(a.float(), b.float(), dim=-1)
    if metric == "euclidean":
        return -(a.float() - b.float()).norm(dim=-1)
    raise ValueError(f"similarity metric must be 'cosine' or 'euclidean', got {metric!r}")


def pair_similarity(key: str | None = None, metric: str = "cosine") -> Target:
    """Target for a batch ``[q_1..q_P, g_1..g_P]``: image ``i`` and ``P + i`` both get the
    similarity of the pair ``(q_i, g_i)`` of their features.

    ``metric``: ``cosine`` or ``euclidean`` (minus the distance, so higher = closer).
    Outputs: ``(2P, D)`` features or a dict holding them at ``key``.
    """

    def target(outputs: Any) -> torch.Tensor:
        feats = _pick(outputs, key, "pair_similarity")
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] % 2:
            raise ValueError(
                "pair_similarity: expected (2P, D) features for P queries followed by P galleries, "
                f"got {getattr(feats, 'shape', type(feats))}"
            )
        half = feats.shape[0] // 2
        sim = _similarity(feats[:half], feats[half:], metric)
        return torch.cat([sim, sim])

    return target


def similarity_to(
    reference: torch.Tensor, key: str | None = None, metric: str = "cosine"
) -> Target:
    """Target: similarity of each image's feature to a fixed ``reference`` ``(D,)`` or
    ``(B, D)`` (e.g. a query's test feature, to explain its ranked gallery images)."""
    ref = reference.detach()

    def target(outputs: Any) -> torch.Tensor:
        feats = _pick(outputs, key, "similarity_to")
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2:
            raise ValueError(
                f"similarity_to: expected (B, D) features, got {getattr(feats, 'shape', type(feats))}"
            )
        return _similarity(feats, ref.to(feats.device).expand_as(feats), metric)

    return target


def default_forward(model: nn.Module) -> Callable[[torch.Tensor], Any]:
    """How Grad-CAM runs a model by default: a reidkit method gives its test feature
    (``encode({"images": x})[test.feature]``, ``(B, D)``: for similarity targets); any other
    module is called on the images. For logits, pass ``forward=lambda x: model({"images": x})``
    (the method's training outputs, run in eval mode)."""
    if hasattr(model, "encode"):
        names = tuple(getattr(model, "feature_names", ()))
        feature = getattr(model, "test_feature", names[0] if names else None)

        def run(images: torch.Tensor) -> Any:
            out = model.encode({"images": images}, "query")
            return out[feature] if feature in out else out

        return run
    return model


def pair_grad_cam(
    model: nn.Module,
    query_images: torch.Tensor,
    gallery_images: torch.Tensor,
    layer: nn.Module | str,
    *,
    forward: Callable[[torch.Tensor], Any] | None = None,
    key: str | None = None,
    metric: str = "cosine",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What makes ``query_images[i]`` and ``gallery_images[i]`` match.

    Both ``(P, 3, H, W)``; the model runs once on the ``2P`` images (eval mode) and its
    output (or ``outputs[key]``) must be the test features ``(2P, D)``. Returns
    ``(query maps (P, h, w), gallery maps (P, h, w), similarities (P,))``.
    """
    if query_images.shape != gallery_images.shape:
        raise ValueError(
            f"pair_grad_cam: query {tuple(query_images.shape)} and gallery "
            f"{tuple(gallery_images.shape)} batches must have the same shape"
        )
    p = query_images.shape[0]
    res = compute_grad_cam(
        model,
        torch.cat([query_images, gallery_images]),
        layer,
        pair_similarity(key=key, metric=metric),
        forward=forward,
    )
    return res.maps[:p], res.maps[p:], res.scores[:p]


# --------------------------------------------------------------------------- overlap
def map_overlap(maps_a: torch.Tensor, maps_b: torch.Tensor, k: float | int = 0.2) -> torch.Tensor:
    """Per-image IoU of the top-``k`` cells of two map sets ``(B, h, w)`` -> ``(B,)``.

    ``k`` is a count or a fraction of the cells (as CAMA's branch overlap). 1: the two
    maps single out the same cells; 0: disjoint regions.
    """
    if maps_a.shape != maps_b.shape or maps_a.dim() != 3:
        raise ValueError(
            f"map_overlap: expected two (B, h, w) sets of the same shape, got "
            f"{tuple(maps_a.shape)} and {tuple(maps_b.shape)}"
        )
    masks = topk_masks(torch.stack([maps_a, maps_b]).float(), k)  # (2, B, hw)
    return pairwise_mask_iou(masks)[0, 1]


def map_overlap_matrix(maps: torch.Tensor, k: float | int = 0.2) -> torch.Tensor:
    """Mean top-``k`` IoU over images for every pair of ``N`` map sets ``(N, B, h, w)``
    -> ``(N, N)`` (diagonal 1); e.g. SCR's stripes against its channel groups."""
    if maps.dim() != 4:
        raise ValueError(f"map_overlap_matrix: expected (N, B, h, w), got {tuple(maps.shape)}")
    return pairwise_mask_iou(topk_masks(maps.float(), k)).mean(dim=-1)
