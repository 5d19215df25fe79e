"""Losses: functional forms (shapes in their docstrings) and module wrappers.

ID losses take ``(logits (B, C), pids (B,))``; metric losses ``(feats (B, D), pids (B,))``.
"""

from reidkit.losses.builder import (
    EXTRA_LOSSES,
    ReIDLoss,
    ZeroLoss,
    build_extra_loss,
    build_id_loss,
    build_metric_loss,
    metric_loss_key,
)
from reidkit.losses.center import CenterLoss, center_loss
from reidkit.losses.circle import CircleLoss, circle_loss
from reidkit.losses.focal import FocalLoss, focal_loss
from reidkit.losses.oap import overlapped_activation_penalty
from reidkit.losses.pairwise import (
    ContrastiveLoss,
    InstanceLoss,
    LiftedStructureLoss,
    SphereLoss,
    contrastive_loss,
    instance_loss,
    lifted_structure_loss,
    sphere_loss,
)
from reidkit.losses.softmax import CrossEntropyLabelSmooth, cross_entropy_label_smooth
from reidkit.losses.tkp import tkp_distance_loss, tkp_feature_loss
from reidkit.losses.triplet import (
    TRIPLET_DISTANCES,
    TripletLoss,
    WeightedRegularizedTripletLoss,
    cosine_dist,
    cross_triplet_batch_hard,
    euclidean_dist,
    pair_masks,
    triplet_batch_hard,
    weighted_regularized_triplet,
)

__all__ = [
    "EXTRA_LOSSES",
    "TRIPLET_DISTANCES",
    "CenterLoss",
    "CircleLoss",
    "ContrastiveLoss",
    "CrossEntropyLabelSmooth",
    "FocalLoss",
    "InstanceLoss",
    "LiftedStructureLoss",
    "ReIDLoss",
    "SphereLoss",
    "TripletLoss",
    "WeightedRegularizedTripletLoss",
    "ZeroLoss",
    "build_extra_loss",
    "build_id_loss",
    "build_metric_loss",
    "center_loss",
    "circle_loss",
    "contrastive_loss",
    "cosine_dist",
    "cross_entropy_label_smooth",
    "cross_triplet_batch_hard",
    "euclidean_dist",
    "focal_loss",
    "instance_loss",
    "lifted_structure_loss",
    "metric_loss_key",
    "overlapped_activation_penalty",
    "pair_masks",
    "sphere_loss",
    "tkp_distance_loss",
    "tkp_feature_loss",
    "triplet_batch_hard",
    "weighted_regularized_triplet",
]
