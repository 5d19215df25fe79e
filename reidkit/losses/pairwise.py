"""The extra losses of CGE's Table 5 (besides triplet and circle): sphere, lifted
structure, instance and contrastive.

Which version of each is implemented (the CGE paper names them but not their form):

- **sphere**: SphereFace's A-Softmax (Liu et al. CVPR 2017; the paper's ``m = 4``).
  Classifier rows are L2-normalised, features are not; the target logit
  ``||x|| cos(theta)`` becomes ``||x|| (lambda cos(theta) + psi(theta)) / (1 + lambda)``,
  ``psi(theta) = (-1)^k cos(m theta) - 2k`` for ``theta in [k pi/m, (k+1) pi/m]``,
  ``cos(m theta)`` via the Chebyshev polynomial ``T_m(cos theta)``. ``lambda`` anneals as in
  the SphereFace code: ``max(lambda_min, base * (1 + gamma * it)^-power)``, ``it`` = number
  of training forward passes (a buffer, so it survives checkpoints).
- **lifted**: the smooth lifted structured loss (Song et al. CVPR 2016, Eq. 4): for each
  positive pair ``(i, j)``, ``J_ij = log(sum_{k in N(i)} exp(a - D_ik) + sum_{l in N(j)}
  exp(a - D_jl)) + D_ij``, ``L = 1/(2|P|) sum_{(i,j) in P} relu(J_ij)^2`` on Euclidean
  distances (``|P|`` counts ordered pairs, the sum runs over them too).
- **instance**: the instance loss of Zheng et al. (TOMM 2020) is a softmax classification
  in which every training *image* is a class. In re-ID the identities play that role:
  a cosine classifier ``scale * <x/||x||, w_c/||w_c||>`` followed by cross entropy, with
  its own weights, separate from the BNNeck classifier (normalised features and weights
  is the "shared, normalised" classifier of the dual-path model).
- **contrastive**: the pairwise margin loss (Hadsell et al. 2006; the verification loss
  of Zheng et al. TOMM 2018 in distance form): positive pairs are pulled within
  ``pos_margin``, negative pairs pushed beyond ``margin``; the two terms are averaged
  separately over the positive and negative pairs of the batch (balancing the ``K-1``
  positives against the many negatives of a P x K batch). Features are L2-normalised by
  default; ``squared=True`` squares the hinges as in Hadsell et al.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.losses.softmax import check_targets, full_precision, to_float
from reidkit.losses.triplet import _batch_distances, pair_masks

__all__ = [
    "chebyshev_cos_multiple",
    "sphere_loss",
    "SphereLoss",
    "lifted_structure_loss",
    "LiftedStructureLoss",
    "instance_loss",
    "InstanceLoss",
    "contrastive_loss",
    "ContrastiveLoss",
]


# ------------------------------------------------------------------------------ sphere
def chebyshev_cos_multiple(cos: torch.Tensor, m: int) -> torch.Tensor:
    """``cos(m theta)`` from ``cos(theta)`` via the Chebyshev recursion (exact, smooth)."""
    if m < 1:
        raise ValueError(f"angular margin m must be an integer >= 1, got {m}")
    t_prev, t_cur = torch.ones_like(cos), cos
    for _ in range(1, m):
        t_prev, t_cur = t_cur, 2 * cos * t_cur - t_prev
    return t_cur


@full_precision
def sphere_logits(
    feats: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, m: int = 4, lam: float = 0.0
) -> torch.Tensor:
    """A-Softmax logits ``(B, C)`` (see the module docstring). feats ``(B, D)``, weight ``(C, D)``."""
    x = to_float(feats)
    x_norm = x.norm(dim=1, keepdim=True).clamp(min=1e-12)  # (B, 1)
    cos = (x / x_norm) @ F.normalize(to_float(weight), dim=1).t()  # (B, C)
    cos = cos.clamp(-1.0, 1.0)
    cos_t = cos.gather(1, targets.long().unsqueeze(1))  # (B, 1)
    with torch.no_grad():
        theta = torch.acos(cos_t)
        k = torch.floor(m * theta / math.pi).clamp(max=m - 1)
        sign = 1.0 - 2.0 * torch.remainder(k, 2)  # (-1)^k
    psi = sign * chebyshev_cos_multiple(cos_t, m) - 2.0 * k
    target = (lam * cos_t + psi) / (1.0 + lam)
    logits = cos.scatter(1, targets.long().unsqueeze(1), target)
    return logits * x_norm


@full_precision
def sphere_loss(
    feats: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, m: int = 4, lam: float = 0.0
) -> torch.Tensor:
    """A-Softmax loss (SphereFace). feats ``(B, D)``, weight ``(C, D)``, targets ``(B,)``.

    ``lam`` is the annealing weight of the plain cosine (0 = the full margin).
    """
    logits = sphere_logits(feats, weight, targets, m, lam)
    check_targets(logits, targets)
    return F.cross_entropy(logits, targets.long())


class SphereLoss(nn.Module):
    """A-Softmax with its own classifier ``weight (num_classes, feat_dim)`` and lambda annealing.

    ``forward(feats (B, D), pids (B,)) -> scalar``; each training-mode call advances the
    annealing counter.
    """

    def __init__(
        self,
        num_classes: int,
        feat_dim: int,
        m: int = 4,
        lambda_base: float = 1000.0,
        lambda_gamma: float = 0.12,
        lambda_power: float = 1.0,
        lambda_min: float = 5.0,
    ) -> None:
        super().__init__()
        if int(m) != m or m < 1:
            raise ValueError(f"sphere m must be an integer >= 1, got {m}")
        self.m = int(m)
        self.lambda_base = lambda_base
        self.lambda_gamma = lambda_gamma
        self.lambda_power = lambda_power
        self.lambda_min = lambda_min
        self.weight = nn.Parameter(torch.empty(num_classes, feat_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def current_lambda(self) -> float:
        it = float(self.iteration.item())
        lam = self.lambda_base * (1 + self.lambda_gamma * it) ** (-self.lambda_power)
        return max(self.lambda_min, lam)

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        lam = self.current_lambda()
        if self.training:
            self.iteration += 1
        return sphere_loss(feats, self.weight, pids, self.m, lam)

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, m={self.m}"


# ------------------------------------------------------------------------------ lifted
@full_precision
def lifted_structure_loss(
    feats: torch.Tensor, pids: torch.Tensor, margin: float = 1.0, normalize: bool = False
) -> torch.Tensor:
    """Smooth lifted structured loss (Song et al. 2016, Eq. 4).

    Args:
        feats: ``(B, D)``; pids: ``(B,)``; margin: ``alpha``; normalize: L2-normalise first.

    Returns:
        Scalar; zero (with graph) when the batch has no positive or no negative pair.
    """
    dist = _batch_distances(feats, pids, normalize)
    is_pos, is_neg = pair_masks(pids)
    has_neg = is_neg.any(dim=1, keepdim=True)
    # S_i = log sum_{k in N(i)} exp(alpha - D_ik). A sample without negatives (one
    # identity in the batch) gets an all-True row to stay finite; its pairs are dropped.
    neg_mask = is_neg | ~has_neg
    s = torch.logsumexp((margin - dist).masked_fill(~neg_mask, float("-inf")), dim=1)  # (B,)
    j = torch.logaddexp(s.unsqueeze(1), s.unsqueeze(0)) + dist  # (B, B): J_ij for all pairs
    pairs = is_pos & has_neg  # y_i == y_j, so i and j have the same negatives
    return (F.relu(j).pow(2) * pairs).sum() / (2 * pairs.sum().clamp(min=1))


class LiftedStructureLoss(nn.Module):
    """Module form of :func:`lifted_structure_loss`."""

    def __init__(self, margin: float = 1.0, normalize: bool = False) -> None:
        super().__init__()
        self.margin = margin
        self.normalize = normalize

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return lifted_structure_loss(feats, pids, self.margin, self.normalize)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize={self.normalize}"


# ---------------------------------------------------------------------------- instance
@full_precision
def instance_loss(
    feats: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 16.0
) -> torch.Tensor:
    """Cosine-classifier instance loss: ``CE(scale * cos(x, w_c), y)``.

    feats ``(B, D)``, weight ``(C, D)``, targets ``(B,)``.
    """
    logits = scale * F.normalize(to_float(feats), dim=1) @ F.normalize(to_float(weight), dim=1).t()
    check_targets(logits, targets)
    return F.cross_entropy(logits, targets.long())


class InstanceLoss(nn.Module):
    """Instance loss with its own normalised classifier ``(num_classes, feat_dim)``."""

    def __init__(self, num_classes: int, feat_dim: int, scale: float = 16.0) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, feat_dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return instance_loss(feats, self.weight, pids, self.scale)

    def extra_repr(self) -> str:
        return f"classes={self.weight.shape[0]}, dim={self.weight.shape[1]}, scale={self.scale}"


# ------------------------------------------------------------------------- contrastive
@full_precision
def contrastive_loss(
    feats: torch.Tensor,
    pids: torch.Tensor,
    margin: float = 1.0,
    pos_margin: float = 0.0,
    normalize: bool = True,
    squared: bool = False,
) -> torch.Tensor:
    """Pairwise contrastive loss on Euclidean distances (all ordered pairs ``i != j``)::

        L = mean_{pos pairs} h(d_ij - pos_margin) + mean_{neg pairs} h(margin - d_ij)

    with ``h = relu`` (or ``relu^2`` when ``squared``). A term with no pair is 0.

    Args:
        feats: ``(B, D)``; pids: ``(B,)``.

    Returns:
        Scalar.
    """
    dist = _batch_distances(feats, pids, normalize)
    is_pos, is_neg = pair_masks(pids)
    pos = F.relu(dist - pos_margin)
    neg = F.relu(margin - dist)
    if squared:
        pos, neg = pos.pow(2), neg.pow(2)
    pos_term = (pos * is_pos).sum() / is_pos.sum().clamp(min=1)
    neg_term = (neg * is_neg).sum() / is_neg.sum().clamp(min=1)
    return pos_term + neg_term


class ContrastiveLoss(nn.Module):
    """Module form of :func:`contrastive_loss`."""

    def __init__(
        self,
        margin: float = 1.0,
        pos_margin: float = 0.0,
        normalize: bool = True,
        squared: bool = False,
    ) -> None:
        super().__init__()
        self.margin = margin
        self.pos_margin = pos_margin
        self.normalize = normalize
        self.squared = squared

    def forward(self, feats: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
        return contrastive_loss(
            feats, pids, self.margin, self.pos_margin, self.normalize, self.squared
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, pos_margin={self.pos_margin}, squared={self.squared}"
