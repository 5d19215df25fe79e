"""The CAN few-shot classifier and its prototype baseline.

:class:`FewShotNet` = ResNet-12 backbone + (CAN only) :class:`~reidkit.models.
cross_attention.CrossAttention` + a global classifier, following the authors' code
(``torchFewShot/models/net.py``):

- **prototypes** ``P_k``: mean support feature map of class ``k``;
- every (query, prototype) pair is cross-attended: ``A^p`` re-weights the prototype map,
  ``A^q`` the query map (the baseline uses ``A = 1``: no attention);
- **training loss** ``= global_weight * L_global + nn_weight * L_nn`` (1 and 0.5):

  * ``L_global``: a 1x1 conv (with bias) classifies *every position* of each query map into
    all training classes; the map is the one attended with the query's own class
    prototype, as in the code; CE averaged over queries and positions;
  * ``L_nn``: at every position ``j`` of each query, logits over the episode's classes
    ``scale * cos(q_j, GAP(A^p * P_k))`` (``scale = 7``); CE averaged likewise. The query's
    own attention is a positive per-position factor, which a cosine ignores, so the code's
    attended query map and the raw one give the same logits;

- **test**: ``scale * cos(GAP(A^q * Q), GAP(A^p * P_k))`` for every class ``k``;
- **transductive** (CAN+T, :meth:`FewShotNet.transductive_scores`): the most confident
  queries join the support set with their predicted labels and the prototypes are
  recomputed; with the defaults the top 35 then the top 70 of 75 queries (see
  :func:`transductive_counts` for other query counts).

Shapes: ``b`` episodes, ``N`` way, ``S`` support images, ``M`` queries per episode,
``C x h x w`` feature maps, ``hw = h * w``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reidkit.models.backbones.resnet12 import ResNet12, resnet12
from reidkit.models.cross_attention import CrossAttention, correlation_all_pairs

__all__ = [
    "FewShotNet",
    "build_fewshot_model",
    "convert_can_state_dict",
    "prototypes",
    "transductive_counts",
]


def prototypes(support_maps: Tensor, weights: Tensor) -> Tensor:
    """Weighted class means of support maps.

    Args:
        support_maps: ``(b, S, C, h, w)``.
        weights: ``(b, N, S)``; row ``k`` weights the images of class ``k`` (one-hot rows
            give the mean of each class's support images).

    Returns:
        ``(b, N, C, h, w)``.
    """
    b, s = support_maps.shape[:2]
    total = weights.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("prototypes: a class has no support image")
    flat = support_maps.reshape(b, s, -1)
    return (weights @ flat / total).view(b, weights.shape[1], *support_maps.shape[2:])


def transductive_counts(num_queries: int, iterations: int, fraction: float) -> list[int]:
    """Queries used as pseudo-labelled supports at each transductive iteration.

    ``step = max(1, floor(fraction * num_queries))``; iteration ``t`` (1-based) uses the
    ``min(num_queries, t * step)`` most confident queries. With the code's ``fraction =
    35 / 75`` and 75 queries this gives ``[35, 70]``; with 40 queries ``[18, 36]``. (The
    code derives the iteration count as ``num_queries // step``, which is 2 for 75 queries;
    here it is the configured ``iterations``.)
    """
    if num_queries < 1:
        return []
    step = max(1, math.floor(fraction * num_queries + 1e-9))
    return [min(num_queries, t * step) for t in range(1, iterations + 1)]


class FewShotNet(nn.Module):
    """CAN (``attention=True``) or the prototype baseline (``attention=False``).

    Args:
        num_classes: training classes of the global classifier (64 on miniImageNet).
        map_size: ``(h, w)`` of the backbone output for the configured input size.
        attention: use the cross-attention module.
        width: ResNet-12 base width (64: 64/128/256/512).
        scale: cosine scale of the nearest-neighbour and test logits (7).
        temperature, reduction, residual: cross-attention settings (0.025, 6, True).
    """

    def __init__(
        self,
        num_classes: int,
        map_size: tuple[int, int] = (6, 6),
        attention: bool = True,
        width: int = 64,
        scale: float = 7.0,
        temperature: float = 0.025,
        reduction: int = 6,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.backbone: ResNet12 = resnet12(width=width)
        channels = self.backbone.out_channels
        self.map_size = (int(map_size[0]), int(map_size[1]))
        self.num_classes = int(num_classes)
        self.scale = float(scale)
        self.attention: CrossAttention | None = None
        if attention:
            self.attention = CrossAttention(
                self.map_size[0] * self.map_size[1], reduction, temperature, residual
            )
        self.classifier = nn.Conv2d(channels, num_classes, kernel_size=1)  # bias, as the code
        n = self.classifier.out_channels
        nn.init.normal_(self.classifier.weight, 0.0, math.sqrt(2.0 / n))

    # ------------------------------------------------------------------ building blocks
    def extract(self, images: Tensor) -> Tensor:
        """``(n, 3, H, W) -> (n, C, h, w)`` backbone maps."""
        maps = self.backbone(images)
        if tuple(maps.shape[-2:]) != self.map_size:
            raise ValueError(
                f"FewShotNet was built for {self.map_size} feature maps but the backbone gave "
                f"{tuple(maps.shape[-2:])} for {tuple(images.shape[-2:])} images; build it with "
                "map_size=ResNet12.output_size(H, W)"
            )
        return maps

    def attend(self, protos: Tensor, queries: Tensor) -> tuple[Tensor, Tensor]:
        """``(A^p, A^q)``, each ``(b, M, N, hw)``, for every (query m, prototype n) pair;
        all ones for the baseline."""
        b, n = protos.shape[:2]
        m = queries.shape[1]
        if self.attention is None:
            ones = protos.new_ones(b, m, n, protos.shape[-2] * protos.shape[-1])
            return ones, ones
        return self.attention.pair_attention(correlation_all_pairs(protos, queries))

    @staticmethod
    def _attended_prototypes(protos: Tensor, attn_p: Tensor) -> Tensor:
        """``GAP(A^p * P_n)`` for every pair: ``(b, M, N, C)``."""
        flat = protos.flatten(3)  # (b, N, C, hw)
        return torch.einsum("bmni,bnci->bmnc", attn_p, flat) / flat.shape[-1]

    def _scores_from_prototypes(self, protos: Tensor, query_maps: Tensor) -> Tensor:
        attn_p, attn_q = self.attend(protos, query_maps)
        p_vec = self._attended_prototypes(protos, attn_p)
        q_flat = query_maps.flatten(3)  # (b, M, C, hw)
        q_vec = torch.einsum("bmnj,bmcj->bmnc", attn_q, q_flat) / q_flat.shape[-1]
        cos = (F.normalize(q_vec, dim=-1, eps=1e-12) * F.normalize(p_vec, dim=-1, eps=1e-12)).sum(
            -1
        )
        return self.scale * cos

    # ------------------------------------------------------------------------ inference
    def scores(
        self, support_maps: Tensor, support_labels: Tensor, query_maps: Tensor, way: int
    ) -> Tensor:
        """Test logits ``(b, M, way)``: ``scale * cos`` of GAP'd attended features.

        Args:
            support_maps: ``(b, S, C, h, w)``; support_labels: ``(b, S)`` in ``0..way-1``.
            query_maps: ``(b, M, C, h, w)``.
        """
        weights = F.one_hot(support_labels, way).transpose(1, 2).to(support_maps.dtype)
        return self._scores_from_prototypes(prototypes(support_maps, weights), query_maps)

    def transductive_scores(
        self,
        support_maps: Tensor,
        support_labels: Tensor,
        query_maps: Tensor,
        way: int,
        iterations: int = 2,
        fraction: float = 35 / 75,
        initial: Tensor | None = None,
    ) -> Tensor:
        """CAN+T logits ``(b, M, way)``: :meth:`scores`, then ``iterations`` rounds that add
        the most confident queries (largest max logit over the episode, the code's rule)
        with their predicted labels to the support set (counts from
        :func:`transductive_counts`) and recompute prototypes and scores. ``initial``: the
        :meth:`scores` output if already computed."""
        scores = (
            initial
            if initial is not None
            else self.scores(support_maps, support_labels, query_maps, way)
        )
        b, m = query_maps.shape[:2]
        support_w = F.one_hot(support_labels, way).to(support_maps.dtype)  # (b, S, N)
        pool = torch.cat([support_maps, query_maps], dim=1)
        for count in transductive_counts(m, iterations, fraction):
            confidence, predicted = scores.max(dim=-1)  # (b, M)
            top = confidence.topk(count, dim=1).indices
            chosen = torch.zeros_like(confidence).scatter_(1, top, 1.0)
            query_w = F.one_hot(predicted, way).to(support_maps.dtype) * chosen.unsqueeze(-1)
            weights = torch.cat([support_w, query_w], dim=1).transpose(1, 2)  # (b, N, S + M)
            scores = self._scores_from_prototypes(prototypes(pool, weights), query_maps)
        return scores

    # ------------------------------------------------------------------------- training
    def forward(
        self,
        support: Tensor,
        support_labels: Tensor,
        query: Tensor,
        query_labels: Tensor,
        way: int,
    ) -> dict[str, Tensor]:
        """Training forward on ``b`` episodes.

        Args:
            support: ``(b, S, 3, H, W)``; support_labels: ``(b, S)`` episode labels.
            query: ``(b, M, 3, H, W)``; query_labels: ``(b, M)`` episode labels (they pick
                the attention used for the global classifier, as in the code).

        Returns:
            ``global_logits`` ``(b * M, num_classes, h, w)`` and ``nn_logits``
            ``(b * M, way, h, w)``.
        """
        b, s = support.shape[:2]
        m = query.shape[1]
        maps = self.extract(torch.cat([support.flatten(0, 1), query.flatten(0, 1)]))
        c, h, w = maps.shape[1:]
        support_maps = maps[: b * s].view(b, s, c, h, w)
        query_maps = maps[b * s :].view(b, m, c, h, w)
        weights = F.one_hot(support_labels, way).transpose(1, 2).to(maps.dtype)
        protos = prototypes(support_maps, weights)
        attn_p, attn_q = self.attend(protos, query_maps)

        p_vec = F.normalize(self._attended_prototypes(protos, attn_p), dim=-1, eps=1e-12)
        q_flat = query_maps.flatten(3)  # (b, M, C, hw)
        q_unit = F.normalize(q_flat, dim=2, eps=1e-12)  # == normalised attended query (A > 0)
        nn_logits = self.scale * torch.einsum("bmnc,bmcj->bmnj", p_vec, q_unit)

        own = attn_q.gather(2, query_labels.view(b, m, 1, 1).expand(b, m, 1, h * w)).squeeze(2)
        attended_query = (q_flat * own.unsqueeze(2)).view(b * m, c, h, w)
        return {
            "global_logits": self.classifier(attended_query),
            "nn_logits": nn_logits.reshape(b * m, way, h, w),
        }

    @staticmethod
    def compute_loss(
        outputs: Mapping[str, Tensor],
        query_labels: Tensor,
        query_classes: Tensor,
        global_weight: float = 1.0,
        nn_weight: float = 0.5,
    ) -> dict[str, Tensor]:
        """``{"global": ..., "nn": ..., "total": ...}``: CE at every position (averaged over
        queries and positions) of the global logits against the training-class ids
        ``query_classes`` ``(b, M)`` and of the nearest-neighbour logits against the episode
        labels ``query_labels`` ``(b, M)``; ``total = global_weight * global + nn_weight * nn``."""
        g, nn_logits = outputs["global_logits"], outputs["nn_logits"]
        hw = g.shape[-2:]
        g_target = query_classes.reshape(-1, 1, 1).expand(-1, *hw)
        n_target = query_labels.reshape(-1, 1, 1).expand(-1, *hw)
        loss_global = F.cross_entropy(g, g_target)
        loss_nn = F.cross_entropy(nn_logits, n_target)
        return {
            "global": loss_global,
            "nn": loss_nn,
            "total": global_weight * loss_global + nn_weight * loss_nn,
        }


def build_fewshot_model(cfg: object, num_classes: int) -> FewShotNet:
    """:class:`FewShotNet` from a ``FewShotConfig`` (``reidkit.fewshot.config``)."""
    m = cfg.model  # type: ignore[attr-defined]
    d = cfg.data  # type: ignore[attr-defined]
    return FewShotNet(
        num_classes,
        map_size=ResNet12.output_size(d.height, d.width),
        attention=m.name == "can",
        width=m.width,
        scale=m.scale,
        temperature=m.temperature,
        reduction=m.fusion_reduction,
        residual=m.attention_residual,
    )


_CAN_KEYS = (
    ("base.", "backbone."),
    ("cam.conv1.conv.", "attention.fusion.reduce."),
    ("cam.conv1.bn.", "attention.fusion.bn."),
    ("cam.conv2.", "attention.fusion.expand."),
    ("clasifier.", "classifier."),
)


def convert_can_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of a checkpoint of the authors' code (``base.*``, ``cam.*``,
    ``clasifier.*``; ``module.`` prefixes stripped) to :class:`FewShotNet`'s. Keys already in
    reidkit's naming pass through unchanged."""
    out = {}
    for key, value in state.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        for old, new in _CAN_KEYS:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out
