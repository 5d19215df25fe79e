"""Class activation maps (Zhou et al. 2016) for re-ID models.

For a head ``logits = W . BN(GAP(T))`` (GAP, optional BatchNorm1d, linear classifier) the
map ``M_c(x, y) = W_c . BN(T(x, y))`` satisfies ``mean_{x,y} M_c = logit_c`` exactly in
eval mode, because GAP and an eval-mode BN are both affine (CAMA paper, Eq. 3-4). This
module computes it for

- multi-branch models exposing ``forward_maps(images, targets)`` (``reidkit.methods.cama``);
- single-head models with a ``backbone`` (``forward(x) -> (B, C, h, w)``) and a head made
  of an optional ``BatchNorm1d`` and a ``Linear`` (``model.neck`` for the baselines),
  or any model if ``feature_fn``/``classifier``/``bn`` are passed explicitly.

With GeM or max pooling the map is still informative but its mean is not the logit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["class_activation_map", "find_linear_head", "apply_bn_per_location", "eval_mode"]


class eval_mode:
    """Context manager: put a module in eval mode, restore its previous mode after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.was_training = module.training

    def __enter__(self) -> nn.Module:
        self.module.eval()
        return self.module

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was_training)


def find_linear_head(model: nn.Module) -> tuple[nn.BatchNorm1d | None, nn.Linear]:
    """The ``(bn, classifier)`` pair of a pooling -> [BN1d] -> Linear head.

    Looks in ``model.neck`` when present (the baselines' BNNeck), else in ``model``; takes
    the last ``Linear`` and the last ``BatchNorm1d`` found there.
    """
    where = getattr(model, "neck", None)
    where = where if isinstance(where, nn.Module) else model
    linears = [m for m in where.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__}: no nn.Linear classifier found (looked in "
            f"{'model.neck' if where is not model else 'the model'}); pass classifier= explicitly"
        )
    bns = [m for m in where.modules() if isinstance(m, nn.BatchNorm1d)]
    return (bns[-1] if bns else None), linears[-1]


def apply_bn_per_location(bn: nn.BatchNorm1d, maps: torch.Tensor) -> torch.Tensor:
    """Apply an eval-mode ``BatchNorm1d`` to every cell of ``maps`` ``(B, C, h, w)``.

    ``GAP(apply_bn_per_location(bn, T)) == bn(GAP(T))`` in eval mode (Eq. 3 of CAMA).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm1d without running statistics cannot be applied per location")
    shape = (1, -1, 1, 1)
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    out = (maps - bn.running_mean.view(shape)) * scale.view(shape)
    if bn.bias is not None:
        out = out + bn.bias.view(shape)
    return out


def _as_targets(
    target: int | Sequence[int] | torch.Tensor | None, batch: int, device
) -> torch.Tensor | None:
    if target is None:
        return None
    t = torch.as_tensor(target, dtype=torch.long, device=device)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"target must be an int or have shape ({batch},), got {tuple(t.shape)}")
    return t


@torch.no_grad()
def class_activation_map(
    model: nn.Module,
    images: torch.Tensor,
    target: int | Sequence[int] | torch.Tensor | None = None,
    *,
    per_branch: bool = False,
    upsample: bool = True,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    classifier: nn.Linear | None = None,
    bn: nn.BatchNorm1d | None = None,
) -> torch.Tensor:
    """Class activation maps of ``target`` classes, computed in eval mode.

    Args:
        model: a multi-branch model with ``forward_maps`` or a single-head model (see the
            module docstring).
        images: ``(B, 3, H, W)`` normalised input batch.
        target: class index (int) or ``(B,)`` indices; ``None`` uses each image's
            predicted class (argmax of the mean score over branches).
        per_branch: return ``(N, B, ...)`` with one map per branch (``N = 1`` for
            single-head models) instead of the branch mean ``(B, ...)``.
        upsample: bilinearly resize the maps to ``(H, W)``; otherwise the grid ``(h, w)``.
        feature_fn, classifier, bn: explicit head parts for models the defaults do not
            fit (``feature_fn(images) -> (B, C, h, w)``).

    Returns:
        ``(B, H, W)`` (or ``(N, B, H, W)``), raw map values (not normalised). Without
        upsampling and with GAP pooling, ``maps.mean((-2, -1))`` equals the logits.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
    with eval_mode(model):
        targets = _as_targets(target, images.shape[0], images.device)
        if feature_fn is None and classifier is None and hasattr(model, "forward_maps"):
            if targets is None:
                out = model.forward_maps(images)
                cams = out["cams"]  # (N, B, C, h, w)
                targets = cams.mean(dim=(0, -2, -1)).argmax(dim=-1)
                idx = targets.view(1, -1, 1, 1, 1).expand(cams.shape[0], -1, 1, *cams.shape[-2:])
                maps = cams.gather(2, idx).squeeze(2)
            else:
                maps = model.forward_maps(images, targets)["target_cams"]  # (N, B, h, w)
        else:
            if classifier is None:
                bn_found, classifier = find_linear_head(model)
                bn = bn if bn is not None else bn_found
            fmap = feature_fn(images) if feature_fn is not None else model.backbone(images)
            if fmap.dim() != 4 or fmap.shape[1] != classifier.in_features:
                raise ValueError(
                    f"feature map {tuple(fmap.shape)} does not match the classifier's "
                    f"in_features={classifier.in_features}"
                )
            if bn is not None:
                fmap = apply_bn_per_location(bn, fmap)
            weight = classifier.weight.to(fmap.dtype)  # (num_classes, C)
            if targets is None:
                logits = fmap.mean(dim=(-2, -1)) @ weight.t()
                if classifier.bias is not None:
                    logits = logits + classifier.bias
                targets = logits.argmax(dim=-1)
            maps = torch.einsum("bchw,bc->bhw", fmap, weight[targets])
            if classifier.bias is not None:
                maps = maps + classifier.bias[targets].view(-1, 1, 1)
            maps = maps.unsqueeze(0)
        if upsample:
            maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return maps if per_branch else maps.mean(dim=0)
