"""The temporal baseline of video re-ID: a per-frame CNN, temporal average pooling, BNNeck.

::

    clips (B, T, 3, H, W) -> backbone per frame (B*T frames) -> maps (B, T, C, h, w)
        -> spatial pooling (model.pooling, GAP) -> frame features (B, T, C)
        -> temporal average over the real frames (clip_mask) -> video feature (B, C)
        -> BNNeck -> bn feature (B, C) -> classifier -> logits (B, num_classes)

Loss: the shared ``ReIDLoss`` on the video feature (BoT's CE with label smoothing +
batch-hard triplet on the pre-BN feature by default, ``cfg.loss``). Test: every frame of a
tracklet through the network in ``data.test_chunk_len`` chunks, per-frame features
averaged (``reidkit.engine.video_eval``); since the eval-mode BN is an affine map per
channel, the average of the per-frame post-BN features *is* the post-BN feature of the
averaged video feature. An image (I2V / V2I / I2I modes) is a one-frame clip.

Option ``model.video_baseline.non_local``: space-time non-local blocks
(:class:`~reidkit.models.non_local.SpaceTimeNonLocalBlock`: embedded Gaussian, inner
``C/2``, ``phi`` / ``g`` max-pooled in space, every position attending over all frames of
its clip) after ``layer2`` blocks {1, 3} and ``layer3`` blocks {1, 3, 5}, as in the TKP
authors' video network: VRSTC's "NL" baseline row. The blocks are inserted with
``Backbone.insert_blocks`` (group ``stnl``), so an ImageNet file still loads as is and the
blocks start as the identity.

The parts are public for methods that build on it (VRSTC): :meth:`frame_maps`,
:meth:`frame_features`, :meth:`temporal_pool`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import Field
from torch import nn

from reidkit.config import Config
from reidkit.losses import ReIDLoss
from reidkit.methods.base import (
    Batch,
    MethodOptions,
    ReIDMethod,
    Role,
    method_options,
    register_method,
)
from reidkit.models import BNNeck, backbone_from_config, build_pooling
from reidkit.models.non_local import SpaceTimeNonLocalBlock, set_num_frames

__all__ = ["VideoBaseline", "VideoBaselineOptions", "temporal_average"]

#: where the TKP authors' video network puts its five non-local blocks (0-based)
TKP_NON_LOCAL_LAYERS: dict[str, list[int]] = {"layer2": [1, 3], "layer3": [1, 3, 5]}


class VideoBaselineOptions(MethodOptions):
    """``model.video_baseline``."""

    non_local: bool = False  # space-time non-local blocks over each clip (VRSTC's "NL")
    non_local_layers: dict[str, list[int]] = Field(
        default_factory=lambda: {k: list(v) for k, v in TKP_NON_LOCAL_LAYERS.items()}
    )
    non_local_inner_channels: int | None = Field(None, ge=1)  # None: C // 2
    non_local_sub_sample: bool = True  # max-pool phi and g 2x2 in space


def temporal_average(frame_feats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the real frames: ``(B, T, D)`` and ``(B, T)`` bool -> ``(B, D)``.

    Without a mask every frame counts; a clip without any real frame gives zeros.
    """
    if frame_feats.dim() != 3:
        raise ValueError(f"frame features must be (B, T, D), got {tuple(frame_feats.shape)}")
    if mask is None:
        return frame_feats.mean(1)
    if mask.shape != frame_feats.shape[:2]:
        raise ValueError(
            f"clip_mask {tuple(mask.shape)} does not match frame features "
            f"{tuple(frame_feats.shape)}"
        )
    weight = mask.to(frame_feats.dtype).unsqueeze(-1)
    return (frame_feats * weight).sum(1) / weight.sum(1).clamp(min=1.0)


@register_method("video_baseline", options=VideoBaselineOptions)
class VideoBaseline(ReIDMethod):
    """Per-frame ResNet + temporal average pooling + BNNeck (+ space-time non-local)."""

    requires = frozenset({"clips"})
    eval_requires = frozenset({"clips"})
    video_mode = "v2v"

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__()
        mcfg = cfg.model
        self.opts = method_options(cfg, VideoBaselineOptions, "video_baseline")
        self.num_classes = num_classes
        self.backbone = backbone_from_config(mcfg)
        if self.opts.non_local:
            opts = self.opts
            self.backbone.insert_blocks(
                "stnl",
                opts.non_local_layers,
                lambda c: SpaceTimeNonLocalBlock(
                    c, opts.non_local_inner_channels, sub_sample=opts.non_local_sub_sample
                ),
            )
        self.feat_dim: int = self.backbone.out_channels
        self.pool = build_pooling(mcfg.pooling, p=mcfg.gem_p)
        self.neck = BNNeck(self.feat_dim, num_classes, neck=mcfg.neck)
        self.triplet_feature = cfg.loss.triplet_feature
        self.loss = ReIDLoss(cfg.loss, num_classes, self.feat_dim)

    # ------------------------------------------------------------------ parts
    def frame_maps(self, clips: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> ``(B, T, C, h, w)``: every frame through the backbone
        (the non-local blocks see the ``T`` frames of each clip together)."""
        if clips.dim() != 5:
            raise ValueError(f"clips must be (B, T, 3, H, W), got {tuple(clips.shape)}")
        b, t = clips.shape[:2]
        set_num_frames(self.backbone, t)
        maps = self.backbone(clips.flatten(0, 1))
        return maps.unflatten(0, (b, t))

    def frame_features(self, clips: torch.Tensor) -> torch.Tensor:
        """``(B, T, 3, H, W)`` -> spatially pooled frame features ``(B, T, C)``."""
        maps = self.frame_maps(clips)
        return self.pool(maps.flatten(0, 1)).unflatten(0, maps.shape[:2])

    @staticmethod
    def temporal_pool(frame_feats: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Temporal average over the real frames (:func:`temporal_average`)."""
        return temporal_average(frame_feats, mask)

    # ------------------------------------------------------------------ training
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Training outputs: ``frame_feats (B, T, C)``, ``global_feat (B, C)`` (the video
        feature, pre-BN), ``bn_feat (B, C)`` and ``logits (B, num_classes)``."""
        frame_feats = self.frame_features(batch["clips"])
        video = self.temporal_pool(frame_feats, batch.get("clip_mask"))
        bn_feat, logits = self.neck(video)
        out = {"frame_feats": frame_feats, "global_feat": video, "bn_feat": bn_feat}
        if logits is not None:
            out["logits"] = logits
        return out

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """``ReIDLoss`` terms (``ce``, ``triplet``, ...) on the video feature."""
        if "logits" not in outputs:
            raise RuntimeError("compute_loss needs logits; the model was built with num_classes=0")
        feat = outputs["global_feat"] if self.triplet_feature == "pre_bn" else outputs["bn_feat"]
        return self.loss(batch["pids"], outputs["logits"], feat)

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        yield from (p for p in self.neck.parameters() if p.requires_grad)
        if self.loss.extra_criterion is not None:
            yield from self.loss.extra_criterion.parameters()

    # ---------------------------------------------------------------- evaluation
    def encode(self, batch: Batch, role: Role = "gallery") -> dict[str, torch.Tensor]:
        """Clips: per-frame ``{"pre_bn", "post_bn"}`` features ``(B, T, C)`` (the
        evaluator averages the real frames of a tracklet); images: ``(B, C)`` features of
        one-frame clips."""
        if isinstance(batch.get("clips"), torch.Tensor):
            f = self.frame_features(batch["clips"])
            post = self.neck.bn(f.flatten(0, 1)).unflatten(0, f.shape[:2])
            return {"pre_bn": f, "post_bn": post}
        f = self.frame_features(batch["images"].unsqueeze(1)).squeeze(1)
        return {"pre_bn": f, "post_bn": self.neck.bn(f)}
