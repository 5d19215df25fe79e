"""Temporal knowledge propagation losses (TKP; Gu et al., ICCV 2019).

The image network sees the frames of a clip one by one; the video network sees the whole
clip. TKP pulls the image network's features towards the video network's frame features,
in two ways. With ``N`` clips of ``T`` frames, ``i_nt`` the image feature and ``f_nt`` the
video network's frame feature of frame ``t`` of clip ``n``::

    L_TKP^F = 1/(NT) * sum_{n,t} ||i_nt - f_nt||_2^2                     (feature-based)
    L_TKP^D = 1/(NT) * ||D_img - D_vid||_F^2                             (distance-based)

``D_img`` and ``D_vid`` are the ``(NT x NT)`` Euclidean distance matrices of all image
and of all frame features of the batch. The slides print the ``1/(NT)`` factor for
``L_TKP^D``; the authors' public code takes the mean over all ``(NT)^2`` entries instead
(``normalize="code"``), a factor ``NT`` smaller (64 for the default 16 clips x 4 frames).

Distances follow the public code: ``sqrt(clamp(||a||^2 + ||b||^2 - 2 a.b, min=1e-12))``
in float32. One deliberate difference: the diagonal (a feature's distance to itself) is
set exactly, instead of the Gram expansion's rounding noise (which in float32 is of the
order ``1e-2`` for features of norm ~30); the diagonal then contributes nothing to the
loss and no gradient, as it does in exact arithmetic.

**Detaching is the method's job.** The authors stop the gradient into the video network
by default (``bp_to_vid=False``): a TKP method passes ``frame_feats.detach()`` unless its
option says otherwise. These functions differentiate through both arguments.
"""

from __future__ import annotations

from typing import Literal

import torch

from reidkit.losses.softmax import full_precision, to_float

__all__ = ["tkp_feature_loss", "tkp_distance_loss", "self_euclidean_dist"]

TKPNormalize = Literal["paper", "code"]


def _flatten_pair(
    image_feats: torch.Tensor, frame_feats: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check two ``(N, T, D)`` (or already flattened ``(N*T, D)``) tensors of the same
    shape and return them as float ``(N*T, D)`` matrices."""
    if image_feats.shape != frame_feats.shape:
        raise ValueError(
            f"{name}: image_feats {tuple(image_feats.shape)} and frame_feats "
            f"{tuple(frame_feats.shape)} must have the same shape (N clips, T frames, D)"
        )
    if image_feats.dim() not in (2, 3):
        raise ValueError(
            f"{name}: features must be (N, T, D) (or flattened (N*T, D)), "
            f"got shape {tuple(image_feats.shape)}"
        )
    if image_feats.numel() == 0:
        raise ValueError(f"{name}: empty features {tuple(image_feats.shape)}")
    d = image_feats.shape[-1]
    return to_float(image_feats).reshape(-1, d), to_float(frame_feats).reshape(-1, d)


def self_euclidean_dist(x: torch.Tensor) -> torch.Tensor:
    """All pairwise Euclidean distances of the rows of ``x (M, D)`` -> ``(M, M)``.

    ``sqrt(clamp(||a||^2 + ||b||^2 - 2 a.b, min=1e-12))`` as the TKP code computes them,
    with the diagonal set exactly (``sqrt(1e-12)``, no gradient) instead of the Gram
    expansion's rounding noise. Coinciding rows give a finite (zero) gradient too.
    """
    sq = x.pow(2).sum(dim=1, keepdim=True)
    d2 = torch.addmm(sq + sq.t(), x, x.t(), beta=1, alpha=-2)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return d2.masked_fill(eye, 0.0).clamp(min=1e-12).sqrt()


@full_precision
def tkp_feature_loss(image_feats: torch.Tensor, frame_feats: torch.Tensor) -> torch.Tensor:
    """Feature-based TKP: ``1/(NT) * sum_{n,t} ||i_nt - f_nt||_2^2``.

    Args:
        image_feats: ``(N, T, D)`` image-network features of the clips' frames.
        frame_feats: ``(N, T, D)`` video-network frame features of the same frames
            (detach them to keep the video network out of this term, the authors' default).

    Returns:
        Scalar, float32 (float64 inputs stay float64), even inside an AMP region.
    """
    img, vid = _flatten_pair(image_feats, frame_feats, "tkp_feature_loss")
    return (img - vid).pow(2).sum(dim=1).mean()


@full_precision
def tkp_distance_loss(
    image_feats: torch.Tensor,
    frame_feats: torch.Tensor,
    normalize: TKPNormalize = "paper",
) -> torch.Tensor:
    """Distance-based TKP: make the image features' distance matrix match the video's.

    Args:
        image_feats: ``(N, T, D)`` image-network features of the clips' frames.
        frame_feats: ``(N, T, D)`` video-network frame features of the same frames
            (detach them to keep the video network out of this term, the authors' default).
        normalize: ``"paper"``: ``||D_img - D_vid||_F^2 / (NT)`` (the slides' formula);
            ``"code"``: the mean over all ``(NT)^2`` entries (the authors' public code).

    Returns:
        Scalar, float32 (float64 inputs stay float64), even inside an AMP region.
        ``D_img``, ``D_vid`` are the ``(NT, NT)`` distances of :func:`self_euclidean_dist`.
    """
    if normalize not in ("paper", "code"):
        raise ValueError(
            f"tkp_distance_loss: normalize must be 'paper' or 'code', got {normalize!r}"
        )
    img, vid = _flatten_pair(image_feats, frame_feats, "tkp_distance_loss")
    sq_diff = (self_euclidean_dist(img) - self_euclidean_dist(vid)).pow(2)
    m = img.shape[0]
    return sq_diff.sum() / (m if normalize == "paper" else m * m)
