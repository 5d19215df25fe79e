"""TKP: image-to-video re-ID by temporal knowledge propagation (Gu et al., ICCV 2019).

Two networks trained jointly, one classifier shared by both::

    clips (N, T, 3, H, W)
      video network (ResNet-50, last stride 1, 5 space-time non-local blocks) per clip
        -> GAP per frame -> frame features f_nt (N, T, D) -> temporal mean -> video v_n (N, D)
      image network (a separate ResNet-50, last stride 1) on every frame alone
        -> GAP -> image features i_nt (N, T, D)
      classifier (Linear with bias, N(0, 0.001)) on v_n and on every i_nt

    L = CE(video) + CE(image)
      + triplet(I2V) + triplet(V2I) + triplet(I2I) + triplet(V2V)    (batch-hard, margin 0.3)
      + L_TKP^F(i, f) + L_TKP^D(i, f)                                (reidkit.losses.tkp)

The "images" of training are the clip's own frames through the image network; the video
side is detached in the two TKP terms (the authors' default: knowledge flows from the
video network to the image network only; ``propagate_to_video`` lets it flow both ways).
Every weight is an option (``model.tkp``), so the ablations are configs: without TKP_F,
without TKP_D, without both (plain joint training), and the image network alone
(``image_only``: no video network; clips are encoded frame by frame by the image network
and averaged).

Test (``video_mode = "i2v"``): an image (the first frame of a query tracklet) goes through
the image network, a tracklet through the video network in 32-frame chunks with all frame
features averaged (``reidkit.engine.video_eval``); L2-normalised, cosine; the four modes
with ``test.video_mode=all``. Facts from the authors' code and our choices: docs/tkp.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from reidkit.config import Config
from reidkit.losses import ReIDLoss, cross_triplet_batch_hard, tkp_distance_loss, tkp_feature_loss
from reidkit.methods.base import (
    Batch,
    MethodOptions,
    ReIDMethod,
    Role,
    method_options,
    register_method,
)
from reidkit.methods.video_baseline import TKP_NON_LOCAL_LAYERS, temporal_average
from reidkit.models import backbone_from_config, build_pooling
from reidkit.models.non_local import SpaceTimeNonLocalBlock, set_num_frames

__all__ = ["TKP", "TKPOptions", "TRIPLET_PAIRS"]

#: the four batch-hard triplet terms: name -> (anchor side, target side)
TRIPLET_PAIRS: dict[str, tuple[str, str]] = {
    "i2v": ("image", "video"),
    "v2i": ("video", "image"),
    "i2i": ("image", "image"),
    "v2v": ("video", "video"),
}


class TKPOptions(MethodOptions):
    """``model.tkp``: loss weights, the TKP_D normalisation, the ablations."""

    ce_video_weight: float = Field(1.0, ge=0)
    ce_image_weight: float = Field(1.0, ge=0)
    i2v_weight: float = Field(1.0, ge=0)  # batch-hard triplets, margin loss.triplet_margin
    v2i_weight: float = Field(1.0, ge=0)
    i2i_weight: float = Field(1.0, ge=0)
    v2v_weight: float = Field(1.0, ge=0)
    tkp_f_weight: float = Field(1.0, ge=0)  # feature-based propagation
    tkp_d_weight: float = Field(1.0, ge=0)  # distance-based propagation
    # "code": mean over the (NT)^2 entries (the authors' code, which gave the published
    # numbers); "paper": 1/(NT) as the slides print it (NT times stronger)
    tkp_d_normalize: Literal["paper", "code"] = "code"
    propagate_to_video: bool = False  # the code's --bp_to_vid: TKP gradients reach the video net
    image_only: bool = False  # ablation: the image network alone (no video network)
    non_local_layers: dict[str, list[int]] = Field(
        default_factory=lambda: {k: list(v) for k, v in TKP_NON_LOCAL_LAYERS.items()}
    )
    non_local_inner_channels: int | None = Field(None, ge=1)  # None: C // 2


@register_method(
    "tkp",
    options=TKPOptions,
    presets={
        "loss": {"label_smoothing": 0.0},  # plain CE, as the code
        "solver": {"warmup_epochs": 0, "milestones": [60, 120], "max_epochs": 150},
        "test": {"feature": "feat"},
    },
)
class TKP(ReIDMethod):
    """TKP: a video network teaches an image network (image-to-video re-ID)."""

    requires = frozenset({"clips"})
    eval_requires = frozenset({"clips"})
    feature_names = ("feat",)
    video_mode = "i2v"

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__()
        self.opts = opts = method_options(cfg, TKPOptions, "tkp")
        self.num_classes = num_classes
        self.image_net = backbone_from_config(cfg.model)
        self.video_net: nn.Module | None = None
        if not opts.image_only:
            self.video_net = backbone_from_config(cfg.model)
            self.video_net.insert_blocks(
                "stnl",
                opts.non_local_layers,
                lambda c: SpaceTimeNonLocalBlock(c, opts.non_local_inner_channels),
            )
        self.feat_dim: int = self.image_net.out_channels
        self.pool = build_pooling(cfg.model.pooling, p=cfg.model.gem_p)
        self.classifier: nn.Linear | None = None
        if num_classes > 0:
            self.classifier = nn.Linear(self.feat_dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
        # CE (label smoothing / focal as cfg.loss says; the preset is plain CE)
        self.id_loss = ReIDLoss(cfg.loss, num_classes, self.feat_dim, metric_loss=False)
        self.margin = float(cfg.loss.triplet_margin)

    # ------------------------------------------------------------------ networks
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Image network: ``(B, 3, H, W)`` -> GAP features ``(B, D)``."""
        return self.pool(self.image_net(images))

    def video_frame_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Video network: ``(B, T, 3, H, W)`` -> per-frame GAP features ``(B, T, D)`` (the
        non-local blocks see the ``T`` frames of each clip together). With
        ``image_only`` the image network encodes every frame instead."""
        b, t = clips.shape[:2]
        frames = clips.flatten(0, 1)
        if self.video_net is None:
            return self.image_features(frames).unflatten(0, (b, t))
        set_num_frames(self.video_net, t)
        return self.pool(self.video_net(frames)).unflatten(0, (b, t))

    # ------------------------------------------------------------------ training
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Training outputs: ``image_feats (N, T, D)``, ``image_logits (N, T, C)`` and,
        with the video network, ``frame_feats (N, T, D)``, ``video_feat (N, D)`` and
        ``logits (N, C)`` (the video logits; the image logits without a video network)."""
        clips = batch["clips"]
        if clips.dim() != 5:
            raise ValueError(f"TKP trains on clips (N, T, 3, H, W), got {tuple(clips.shape)}")
        n, t = clips.shape[:2]
        image = self.image_features(clips.flatten(0, 1)).unflatten(0, (n, t))
        out: dict[str, torch.Tensor] = {"image_feats": image}
        if self.classifier is not None:
            out["image_logits"] = self.classifier(image)
        if self.video_net is not None:
            frames = self.video_frame_features(clips)
            video = temporal_average(frames, batch.get("clip_mask"))
            out["frame_feats"], out["video_feat"] = frames, video
            if self.classifier is not None:
                out["logits"] = self.classifier(video)
        elif "image_logits" in out:
            out["logits"] = out["image_logits"][:, 0]
        return out

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """``ce_video``, ``ce_image``, ``triplet_{i2v,v2i,i2i,v2v}``, ``tkp_f``, ``tkp_d``
        (terms with weight 0, or without a video network, are left out). Padding frames
        (``clip_mask`` False) are not images of the batch."""
        if "image_logits" not in outputs:
            raise RuntimeError("compute_loss needs logits; the model was built with num_classes=0")
        o = self.opts
        pids = batch["pids"]
        n, t = outputs["image_feats"].shape[:2]
        mask = batch.get("clip_mask")
        valid = (
            mask.reshape(-1).bool()
            if mask is not None
            else torch.ones(n * t, dtype=torch.bool, device=pids.device)
        )
        image = outputs["image_feats"].reshape(n * t, -1)[valid]
        image_pids = pids.repeat_interleave(t)[valid]
        image_logits = outputs["image_logits"].reshape(n * t, -1)[valid]
        terms: dict[str, torch.Tensor] = {}
        if o.ce_image_weight > 0:
            terms["ce_image"] = o.ce_image_weight * self.id_loss(image_pids, image_logits)["ce"]
        video = outputs.get("video_feat")
        if video is not None and o.ce_video_weight > 0:
            terms["ce_video"] = o.ce_video_weight * self.id_loss(pids, outputs["logits"])["ce"]
        sides = {"image": (image, image_pids)}
        if video is not None:
            sides["video"] = (video, pids)
        for name, (a, b) in TRIPLET_PAIRS.items():
            weight = getattr(o, f"{name}_weight")
            if weight > 0 and a in sides and b in sides:
                terms[f"triplet_{name}"] = weight * cross_triplet_batch_hard(
                    *sides[a], *sides[b], margin=self.margin
                )
        if video is not None and (o.tkp_f_weight > 0 or o.tkp_d_weight > 0):
            frames = outputs["frame_feats"].reshape(n * t, -1)[valid]
            if not o.propagate_to_video:
                frames = frames.detach()
            if o.tkp_f_weight > 0:
                terms["tkp_f"] = o.tkp_f_weight * tkp_feature_loss(image, frames)
            if o.tkp_d_weight > 0:
                terms["tkp_d"] = o.tkp_d_weight * tkp_distance_loss(
                    image, frames, normalize=o.tkp_d_normalize
                )
        return terms

    def classifier_parameters(self) -> Iterator[nn.Parameter]:
        if self.classifier is not None:
            yield from self.classifier.parameters()

    # ---------------------------------------------------------------- evaluation
    def encode(self, batch: Batch, role: Role = "gallery") -> dict[str, torch.Tensor]:
        """Images through the image network ``{"feat": (B, D)}``; clips through the video
        network, per frame ``{"feat": (B, T, D)}`` (averaged per tracklet by the
        evaluator). The same in both roles: the protocol's image query is an image and
        its video gallery tracklets are clips."""
        if isinstance(batch.get("clips"), torch.Tensor):
            return {"feat": self.video_frame_features(batch["clips"])}
        return {"feat": self.image_features(batch["images"])}

    def extra_repr(self) -> str:
        o = self.opts
        return (
            f"image_only={o.image_only}, tkp_f={o.tkp_f_weight}, tkp_d={o.tkp_d_weight} "
            f"({o.tkp_d_normalize}), propagate_to_video={o.propagate_to_video}"
        )
