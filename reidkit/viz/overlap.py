"""How much the branches of a multi-branch model look at the same place.

Each branch's activation map is reduced to the mask of its ``k`` strongest cells (the
region the OAP of CAMA keeps, Eq. 5); the overlap of two branches on an image is the IoU
of their masks. :func:`branch_overlap` averages it over all branch pairs and images: 1
means every branch attends to the same cells, 0 disjoint regions (CAMA's goal).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from reidkit.losses.oap import resolve_topk
from reidkit.viz.cam import eval_mode

__all__ = [
    "format_branch_overlap",
    "topk_masks",
    "pairwise_mask_iou",
    "branch_activation_maps",
    "branch_overlap_matrix",
    "branch_overlap",
    "mean_pairwise_overlap",
]


def topk_masks(maps: torch.Tensor, k: float | int) -> torch.Tensor:
    """Boolean masks of the ``k`` largest cells of each map.

    ``maps (..., h, w)`` -> ``(..., h*w)`` with exactly ``k`` True per map (ties broken by
    ``torch.topk``); ``k`` is a count or a fraction of ``h*w`` as in the OAP.
    """
    flat = maps.flatten(-2)
    kk = resolve_topk(k, flat.shape[-1])
    idx = flat.topk(kk, dim=-1).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, idx, True)


def pairwise_mask_iou(masks: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of branch masks: ``(N, B, P)`` bool -> ``(N, N, B)``."""
    m = masks.float()
    inter = torch.einsum("ibp,jbp->ijb", m, m)
    size = m.sum(dim=-1)  # (N, B)
    union = size[:, None] + size[None] - inter
    return inter / union.clamp_min(1.0)


@torch.no_grad()
def branch_activation_maps(
    model: nn.Module,
    images: torch.Tensor,
    maps: str = "predicted",
    pids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-branch activation maps ``(N, B, h, w)`` of a model with ``forward_maps``.

    ``maps``: ``"predicted"`` CAM of the class predicted by the mean branch score (works on
    test images of unseen identities), ``"label"`` CAM of ``pids`` (training images, whose
    pids are class indices), ``"ram"`` the self ranking activation map ``R^q_q`` of each
    branch (class-free).
    """
    if maps == "label":
        if pids is None:
            raise ValueError("maps='label' needs the batch pids (training class indices)")
        return model.forward_maps(images, pids)["target_cams"]
    if maps == "predicted":
        if hasattr(model, "class_activation_maps") and hasattr(model, "classifier_weights"):
            feat = model.forward_maps(
                images,
                pids
                if pids is not None
                else torch.zeros(images.shape[0], dtype=torch.long, device=images.device),
            )["feat_maps"]
            pooled = feat.mean(dim=(-2, -1))  # (N, B, d)
            scores = torch.einsum(
                "nbd,ncd->bc", pooled, model.classifier_weights().to(pooled.dtype)
            )
            return model.class_activation_maps(feat, scores.argmax(dim=-1))
        cams = model.forward_maps(images)["cams"]  # (N, B, C, h, w)
        pred = cams.mean(dim=(0, -2, -1)).argmax(dim=-1)
        idx = pred.view(1, -1, 1, 1, 1).expand(cams.shape[0], -1, 1, *cams.shape[-2:])
        return cams.gather(2, idx).squeeze(2)
    if maps == "ram":
        feat = model.forward_maps(
            images, torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        )["feat_maps"]
        f = feat.mean(dim=(-2, -1))  # (N, B, d)
        # R^q_q per branch and image: <f, F(x,y)> / ||f||, batched as "galleries"
        num = torch.einsum("nbd,nbdhw->nbhw", f, feat)
        return num / f.norm(dim=-1).clamp_min(1e-12)[..., None, None]
    raise ValueError(f"maps must be 'predicted', 'label' or 'ram', got {maps!r}")


@torch.no_grad()
def branch_overlap_matrix(
    model: nn.Module,
    loader: Iterable[dict],
    k: float | int | None = None,
    maps: str = "predicted",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mean top-``k`` mask IoU for every branch pair over a loader: ``(N, N)``.

    ``loader`` yields the standard batch dicts (``images``, ``pids``); ``k`` defaults to the
    model's ``oap_k`` (else 20 % of the cells). Runs the model in eval mode.
    """
    if not hasattr(model, "forward_maps"):
        raise ValueError(
            f"{type(model).__name__} has no forward_maps(); branch overlap needs a multi-branch model"
        )
    if int(getattr(model, "num_branches", 2)) < 2:
        raise ValueError("branch overlap needs a model with at least 2 branches")
    if k is None:
        k = getattr(model, "oap_k", 0.2)
    if device is None:
        device = next(model.parameters()).device
    total, count = None, 0
    with eval_mode(model):
        for step, batch in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            images = batch["images"].to(device, non_blocking=True)
            pids = batch.get("pids")
            pids = pids.to(device) if pids is not None and maps == "label" else None
            amap = branch_activation_maps(model, images, maps=maps, pids=pids)
            iou = pairwise_mask_iou(topk_masks(amap, k)).sum(dim=-1)  # (N, N)
            total = iou if total is None else total + iou
            count += images.shape[0]
    if count == 0:
        raise ValueError("branch overlap: the loader yielded no images")
    return total / count


def branch_overlap(
    model: nn.Module,
    loader: Iterable[dict],
    k: float | int | None = None,
    maps: str = "predicted",
    max_batches: int | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Mean IoU of the branches' top-``k`` activation masks over all branch pairs and
    images (0 = disjoint, 1 = identical). See :func:`branch_overlap_matrix`."""
    mat = branch_overlap_matrix(
        model, loader, k=k, maps=maps, max_batches=max_batches, device=device
    )
    return mean_pairwise_overlap(mat)


def mean_pairwise_overlap(matrix: torch.Tensor) -> float:
    """Mean of the off-diagonal pairs (i < j) of an ``(N, N)`` overlap matrix, N >= 2."""
    n = matrix.shape[0]
    if n < 2:
        raise ValueError("branch overlap: need at least 2 branches")
    iu = torch.triu_indices(n, n, offset=1)
    return float(matrix[iu[0], iu[1]].mean())


def format_branch_overlap(matrix: torch.Tensor, k: float | int | None = None) -> str:
    """One printable line for an ``(N, N)`` overlap matrix, e.g.
    ``branch overlap (top-k CAM IoU, k=0.2): mean 0.412 | 1-2 0.400, 1-3 0.450, 2-3 0.386``."""
    n = matrix.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        raise ValueError("format_branch_overlap: need at least 2 branches")
    mean = mean_pairwise_overlap(matrix)
    detail = ", ".join(f"{i + 1}-{j + 1} {float(matrix[i, j]):.3f}" for i, j in pairs)
    kk = f", k={k:g}" if k is not None else ""
    return f"branch overlap (top-k CAM IoU{kk}): mean {mean:.3f} | {detail}"
