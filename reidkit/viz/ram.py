"""Ranking activation maps (CAMA paper, Sec. 3.4, Eq. 10).

For a query feature ``f_q`` and a gallery feature map ``F_g`` (``f_g = GAP(F_g)``)::

    R^q_g(x, y) = <f_q, F_g(x, y)> / ||f_g||

Its grid mean is ``<f_q, f_g> / ||f_g||``, the part of the cosine similarity that depends
on the gallery image, so the map shows which gallery cells made it rank where it did.
For CAMA, per-branch maps use the branch features ``f_q^i`` and ``F_g^i``; the aggregate
map (:func:`aggregate_ranking_activation_map`) has the cosine similarity of the
concatenated test feature as its grid mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.viz.cam import apply_bn_per_location, eval_mode, find_linear_head

__all__ = [
    "ranking_activation_map",
    "aggregate_ranking_activation_map",
    "feature_maps",
]


def ranking_activation_map(
    f_q: torch.Tensor, F_g: torch.Tensor, normalize_query: bool = False, eps: float = 1e-12
) -> torch.Tensor:
    """Eq. 10: ``R(x, y) = <f_q, F_g(x, y)> / ||GAP(F_g)||``.

    Shapes (``d`` feature width, ``G`` galleries, ``N`` branches):

    - ``f_q (d,)``, ``F_g (d, h, w)`` -> ``(h, w)``
    - ``f_q (d,)``, ``F_g (G, d, h, w)`` -> ``(G, h, w)``
    - ``f_q (N, d)``, ``F_g (N, G, d, h, w)`` -> ``(N, G, h, w)`` (per-branch maps)

    ``normalize_query`` divides by ``||f_q||`` too, so the grid mean is the cosine
    similarity ``<f_q, f_g> / (||f_q|| ||f_g||)``.
    """
    single = F_g.dim() == 3
    if single:
        F_g = F_g.unsqueeze(0)
    if (
        F_g.dim() != f_q.dim() + 3
        or F_g.shape[-3] != f_q.shape[-1]
        or F_g.shape[:-4] != f_q.shape[:-1]
    ):
        raise ValueError(
            "ranking_activation_map: expected f_q (d,) with F_g (d, h, w) or (G, d, h, w), or "
            f"f_q (N, d) with F_g (N, G, d, h, w); got f_q {tuple(f_q.shape)}, "
            f"F_g {tuple(F_g.shape if not single else F_g.shape[1:])}"
        )
    f_g = F_g.mean(dim=(-2, -1))  # (..., G, d)
    if normalize_query:
        f_q = F.normalize(f_q, dim=-1, eps=eps)
    num = torch.einsum("...d,...gdhw->...ghw", f_q, F_g)
    ram = num / f_g.norm(dim=-1).clamp_min(eps)[..., None, None]
    return ram.squeeze(-3) if single else ram


def aggregate_ranking_activation_map(
    f_q: torch.Tensor, F_g: torch.Tensor, eps: float = 1e-12
) -> torch.Tensor:
    """RAM of the concatenated, per-branch L2-normalised feature (CAMA's test feature).

    ``f_q (N, d)`` per-branch query features, ``F_g (N, G, d, h, w)`` per-branch gallery
    maps -> ``(G, h, w)``: the branch mean of query-normalised RAMs, whose grid mean is
    the cosine similarity of ``[f_q^1/|f_q^1|; ...]`` and ``[f_g^1/|f_g^1|; ...]``.
    """
    return ranking_activation_map(f_q, F_g, normalize_query=True, eps=eps).mean(dim=0)


@torch.no_grad()
def feature_maps(model: nn.Module, images: torch.Tensor, feature: str = "post_bn") -> torch.Tensor:
    """Per-branch test feature maps ``(N, B, d, h, w)`` in eval mode (``N = 1`` for
    single-head models). A method may provide them itself with
    ``ranking_feature_maps(images, feature)`` (SCR: its three branch maps).

    ``feature="post_bn"`` gives maps whose GAP is the post-BN test feature (CAMA's F^i;
    for a BNNeck baseline the eval BN applied per cell), ``"pre_bn"`` the raw maps.
    """
    if feature not in ("post_bn", "pre_bn"):
        raise ValueError(f"feature must be 'post_bn' or 'pre_bn', got {feature!r}")
    with eval_mode(model):
        if hasattr(model, "ranking_feature_maps"):  # methods with their own maps (SCR)
            return model.ranking_feature_maps(images, feature)
        if hasattr(model, "forward_maps"):
            out = model.forward_maps(
                images, torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
            )
            return out["feat_maps"] if feature == "post_bn" else out["raw_maps"]
        if not hasattr(model, "backbone"):
            raise ValueError(
                f"{type(model).__name__}: feature maps need either forward_maps() or a backbone attribute"
            )
        fmap = model.backbone(images)
        if feature == "post_bn":
            bn, _ = find_linear_head(model)
            if bn is not None:
                fmap = apply_bn_per_location(bn, fmap)
        return fmap.unsqueeze(0)
