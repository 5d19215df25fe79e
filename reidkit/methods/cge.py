"""CGE: Comprehensive Global Embedding (Xia et al., Pattern Recognition 2023).

Two modules on top of a global-feature baseline (BoT or AGW):

- **NLC** (non-parameterised local classifier): the final map ``F`` (B, C, h, w) is cut
  into ``n`` horizontal stripes, each pooled like the global feature (GAP, or GeM with the
  same learned ``p``) and L2-normalised -> ``f_i`` (B, C). One memory ``M_i`` (N, C) per
  stripe holds an L2-normalised feature per training identity (zero at start). Read:
  ``w_i = sigmoid(cos(f_i, M_i))`` (B, N).
- **GLR** (global logits revise, Eqs. 2-3): ``w = (prod_i w_i)^(1/n)`` and
  ``p_hat = p * w`` with ``p`` the global prediction (B, N); the label-smoothed CE of
  Eq. 4 is applied to ``p_hat``. See docs/cge.md for the two readings of ``p``
  (probabilities, the default, or logits).

Write (Eq. 1), after each optimiser step: for every identity ``y`` in the (all-rank)
batch, ``M_{i,y} <- a M_{i,y} + (1 - a) mean_k f_i^{(k)}`` followed by L2 normalisation,
with ``a`` from a schedule over epochs (linear ``t/E`` by default, Table 4).

Inference uses the global feature only; the memories never touch the eval path.

Options: ``model.cge`` (:class:`CGEOptions`). The GLR default is the probability reading
(``revise_target="probs"``: ``softmax(z) * w`` renormalised), the only reading under
which the revise lowers the loss of easy samples as the paper's Fig. 3 says.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from reidkit.config import Config
from reidkit.methods.base import Batch, MethodOptions, method_options, register_method
from reidkit.methods.baseline import Baseline

__all__ = [
    "CGE",
    "CGEOptions",
    "stripe_pool",
    "nlc_scores",
    "glr_weights",
    "revise_logits",
    "revise_log_probs",
    "feature_level_logits",
    "update_memory",
    "momentum_at",
    "gather_for_memory",
]


class CGEOptions(MethodOptions):
    """``model.cge``: CGE's options."""

    num_stripes: int = Field(3, ge=1)
    # memory momentum a over epochs: linear t/E (Eq. 11), exponential as Eq. 12 is printed,
    # rampup = exp(-gamma (1 - t/E)^2) (the usual ramp-up reading of Eq. 12), fixed
    momentum_schedule: Literal["linear", "exponential", "rampup", "fixed"] = "linear"
    momentum_fixed: float = Field(0.01, ge=0, le=1)  # a for the fixed schedule (paper: 0.01)
    momentum_exp_gamma: float = Field(5.0, gt=0)  # gamma of the exponential / rampup schedules
    revise_level: Literal["logit", "feature"] = "logit"  # Table 6
    # what p in p_hat = p * w is: "probs" (softmax(z) * w renormalised = softmax(z + log w);
    # lowers the loss of easy samples, Fig. 3) or "logits" (Eq. 4 literally: softmax(z * w))
    revise_target: Literal["logits", "probs"] = "probs"
    glr: bool = True  # False: memories are kept (analysis) but logits not revised (Table 2)
    detach_weights: bool = False  # True: w is a constant re-weighting (no grad to stripes)


# ---------------------------------------------------------------------- functions
def stripe_pool(
    feat_map: torch.Tensor,
    num_stripes: int,
    mode: str = "avg",
    gem_p: torch.Tensor | float | None = None,
    gem_eps: float = 1e-6,
) -> torch.Tensor:
    """Pool ``num_stripes`` horizontal stripes of a feature map ("AAP" in the paper's Fig. 2).

    Args:
        feat_map: (B, C, h, w) final feature map.
        num_stripes: n; stripes follow ``adaptive_*_pool2d((n, 1))`` bins (equal heights when
            ``h % n == 0``, otherwise adaptive, slightly overlapping bins).
        mode: ``"avg"`` (GAP per stripe), ``"max"`` or ``"gem"`` (generalised mean with
            exponent ``gem_p``, the learned p of the global GeM, so gradients reach it).
        gem_p: GeM exponent (scalar tensor or float); required for ``mode="gem"``.
        gem_eps: clamp floor before the power, as in GeM.

    Returns:
        (n, B, C) stripe features (not normalised).
    """
    if feat_map.dim() != 4:
        raise ValueError(
            f"stripe_pool: expected a (B, C, h, w) map, got shape {tuple(feat_map.shape)}"
        )
    if num_stripes > feat_map.shape[2]:
        raise ValueError(
            f"model.cge.num_stripes={num_stripes} exceeds the feature map height "
            f"{feat_map.shape[2]}; use fewer stripes or a larger input (data.height)"
        )
    if mode == "avg":
        pooled = F.adaptive_avg_pool2d(feat_map, (num_stripes, 1))
    elif mode == "max":
        pooled = F.adaptive_max_pool2d(feat_map, (num_stripes, 1))
    elif mode == "gem":
        if gem_p is None:
            raise ValueError("stripe_pool: mode='gem' needs gem_p")
        pooled = F.adaptive_avg_pool2d(
            feat_map.float().clamp(min=gem_eps).pow(gem_p), (num_stripes, 1)
        )
        pooled = pooled.pow(1.0 / gem_p)
    else:
        raise ValueError(f"stripe_pool: unknown mode '{mode}' (expected avg, max or gem)")
    return pooled.squeeze(-1).permute(2, 0, 1)  # (B, C, n, 1) -> (n, B, C)


def nlc_scores(stripe_feats: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each stripe feature with every class slot of its memory.

    Args:
        stripe_feats: (n, B, c) stripe features (normalised here again; idempotent).
        memory: (n, N, c) memories; zero slots (never written) give cosine 0.

    Returns:
        (n, B, N) cosines ``cos(f_i, M_i)``.
    """
    if stripe_feats.dim() != 3 or memory.dim() != 3:
        raise ValueError(
            f"nlc_scores: expected stripe_feats (n, B, c) and memory (n, N, c), got "
            f"{tuple(stripe_feats.shape)} and {tuple(memory.shape)}"
        )
    if stripe_feats.shape[0] != memory.shape[0] or stripe_feats.shape[2] != memory.shape[2]:
        raise ValueError(
            f"nlc_scores: stripe_feats {tuple(stripe_feats.shape)} and memory "
            f"{tuple(memory.shape)} disagree on n (dim 0) or c (dim 2)"
        )
    f = F.normalize(stripe_feats.float(), dim=-1)
    m = F.normalize(memory.float(), dim=-1)
    return torch.bmm(f, m.transpose(1, 2))


def glr_weights(stripe_feats: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """GLR weight ``w = (prod_i sigmoid(cos(f_i, M_i)))^(1/n)`` (Eqs. 2-3 with the n-th root).

    Computed in log space (mean of log-sigmoids) so it is stable for any n.

    Args:
        stripe_feats: (n, B, c) L2-normalised stripe features.
        memory: (n, N, c) stripe memories.

    Returns:
        (B, N) weights in (0, 1).
    """
    return torch.exp(F.logsigmoid(nlc_scores(stripe_feats, memory)).mean(dim=0))


def revise_logits(
    logits: torch.Tensor, stripe_feats: torch.Tensor, memory: torch.Tensor
) -> torch.Tensor:
    """Global Logits Revise: ``p_hat = p * w`` (Eq. 3), ``p`` = the global logits.

    Args:
        logits: (B, N) global logits ``p`` (before softmax).
        stripe_feats: (n, B, c) L2-normalised stripe features ``f_i``.
        memory: (n, N, c) memories ``M_i``.

    Returns:
        (B, N) revised logits; Eq. 4 applies softmax + label-smoothed CE to them.
    """
    if logits.shape != (stripe_feats.shape[1], memory.shape[1]):
        raise ValueError(
            f"revise_logits: logits {tuple(logits.shape)} must be (B, N) = "
            f"({stripe_feats.shape[1]}, {memory.shape[1]}) from stripe_feats/memory"
        )
    return logits * glr_weights(stripe_feats, memory).to(logits.dtype)


def revise_log_probs(
    logits: torch.Tensor, stripe_feats: torch.Tensor, memory: torch.Tensor
) -> torch.Tensor:
    """The probability reading of Eq. 3: ``p_hat = softmax(z) * w``, renormalised.

    ``log(p_hat / sum p_hat) = log_softmax(z + log w)``, so the result can be fed to any
    logits-based CE (the renormalised NLL equals CE on ``z + log w``).

    Args:
        logits: (B, N) global logits ``z``.
        stripe_feats: (n, B, c); memory: (n, N, c).

    Returns:
        (B, N) "logits" ``z + log w`` (log of the unnormalised revised probabilities).
    """
    if logits.shape != (stripe_feats.shape[1], memory.shape[1]):
        raise ValueError(
            f"revise_log_probs: logits {tuple(logits.shape)} must be (B, N) = "
            f"({stripe_feats.shape[1]}, {memory.shape[1]})"
        )
    log_w = F.logsigmoid(nlc_scores(stripe_feats, memory)).mean(dim=0)
    return logits + log_w.to(logits.dtype)


def feature_level_logits(class_maps: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Feature-level revise (the paper's Table 6): weight each class map, then GAP.

    Args:
        class_maps: (B, N, h, w) maps from a 1x1 conv (C -> N classes) on the final map.
        weights: (B, N) GLR weights ``w`` (each class map k is multiplied by ``w_k``), or
            None for the unrevised feature-level baseline.

    Returns:
        (B, N) logits = GAP(class_maps * w).
    """
    if weights is not None:
        class_maps = class_maps * weights.to(class_maps.dtype)[:, :, None, None]
    return class_maps.mean(dim=(2, 3))


@torch.no_grad()
def update_memory(
    memory: torch.Tensor, stripe_feats: torch.Tensor, pids: torch.Tensor, momentum: float
) -> torch.Tensor:
    """Memory write (Eq. 1), in place: per identity in the batch, blend in its mean feature.

    For every class ``y`` present in ``pids`` and every stripe i:
    ``M_{i,y} <- normalize(a * M_{i,y} + (1 - a) * mean_{k: pid_k = y} f_i^{(k)})``.
    Classes absent from the batch are untouched. Vectorised with ``index_add_``.

    Args:
        memory: (n, N, c) buffer, modified in place.
        stripe_feats: (n, B, c) L2-normalised stripe features (detached inside).
        pids: (B,) long train labels in [0, N).
        momentum: a in [0, 1].

    Returns:
        The updated ``memory`` (same tensor).
    """
    n, num_classes, c = memory.shape
    if (
        stripe_feats.shape[0] != n
        or stripe_feats.shape[2] != c
        or stripe_feats.shape[1] != pids.numel()
    ):
        raise ValueError(
            f"update_memory: stripe_feats {tuple(stripe_feats.shape)} must be (n={n}, "
            f"B={pids.numel()}, c={c})"
        )
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"update_memory: momentum must be in [0, 1], got {momentum}")
    pids = pids.to(memory.device).long()
    if pids.numel() and (int(pids.min()) < 0 or int(pids.max()) >= num_classes):
        raise ValueError(
            f"update_memory: pids must be in [0, {num_classes}), got range "
            f"[{int(pids.min())}, {int(pids.max())}]"
        )
    feats = stripe_feats.detach().to(device=memory.device, dtype=memory.dtype)
    sums = torch.zeros_like(memory).index_add_(1, pids, feats)  # (n, N, c)
    counts = torch.bincount(pids, minlength=num_classes).to(memory.dtype)  # (N,)
    present = counts > 0
    means = sums[:, present] / counts[present][None, :, None]
    blended = momentum * memory[:, present] + (1.0 - momentum) * means
    memory[:, present] = F.normalize(blended, dim=-1)
    return memory


def momentum_at(
    schedule: str, epoch: int, max_epochs: int, fixed: float = 0.01, gamma: float = 5.0
) -> float:
    """Memory momentum ``a`` for an epoch (Table 4 of the paper).

    ``epoch`` is the engine's 0-based epoch index ``t``, ``max_epochs`` is E.

    - ``linear`` (default, Eq. 11): ``a = t / E`` (0 in the first epoch: the memory is
      replaced by the batch mean; slower updates as training converges).
    - ``exponential`` (Eq. 12, as printed): ``a = exp(-gamma * ((1 - t) / E)^2)``, which
      decays from ~1 to ~exp(-gamma) over training ("exponentially decay").
    - ``rampup``: ``a = exp(-gamma * (1 - t / E)^2)``, the common ramp-up that Eq. 12 may
      mean: from ~exp(-gamma) up to 1 (slower memory updates as training converges).
    - ``fixed``: ``a = fixed`` (the paper's 0.01).
    """
    if max_epochs <= 0:
        raise ValueError(f"momentum_at: max_epochs must be positive, got {max_epochs}")
    if schedule == "linear":
        a = epoch / max_epochs
    elif schedule == "exponential":
        a = math.exp(-gamma * ((1.0 - epoch) / max_epochs) ** 2)
    elif schedule == "rampup":
        a = math.exp(-gamma * (1.0 - epoch / max_epochs) ** 2)
    elif schedule == "fixed":
        a = fixed
    else:
        raise ValueError(
            f"model.cge.momentum_schedule: unknown '{schedule}' (expected linear, exponential, "
            "rampup, fixed)"
        )
    return float(min(max(a, 0.0), 1.0))


def gather_for_memory(
    stripe_feats: torch.Tensor, pids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather stripe features and labels over DDP ranks (identity when not distributed).

    Handles different per-rank batch sizes by padding to the largest. Every rank gets the
    same concatenation in rank order, so memories written from it stay identical.

    Args:
        stripe_feats: (n, B_local, c); pids: (B_local,).

    Returns:
        (n, B_total, c) features and (B_total,) pids.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stripe_feats, pids
    world = dist.get_world_size()
    feats = stripe_feats.detach().contiguous()
    pids = pids.to(feats.device).long().contiguous()
    size = torch.tensor([pids.numel()], device=feats.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    max_b = max(counts)
    pad = max_b - pids.numel()
    if pad:
        feats = F.pad(feats, (0, 0, 0, pad))
        pids = F.pad(pids, (0, pad), value=-1)
    feat_list = [torch.empty_like(feats) for _ in range(world)]
    pid_list = [torch.empty_like(pids) for _ in range(world)]
    dist.all_gather(feat_list, feats)
    dist.all_gather(pid_list, pids)
    all_feats = torch.cat([f[:, :k] for f, k in zip(feat_list, counts)], dim=1)
    all_pids = torch.cat([p[:k] for p, k in zip(pid_list, counts)], dim=0)
    return all_feats, all_pids


# -------------------------------------------------------------------------- method
@register_method("cge", options=CGEOptions)
class CGE(Baseline):
    """CGE: BoT / AGW + NLC stripe memories + Global Logits Revise.

    BoT vs AGW is chosen by the same config fields as the baseline (``model.non_local``,
    ``model.pooling=gem``, ``loss.metric=wrt``); CGE options live in ``cfg.model.cge``.

    Buffers (checkpointed with the model, never optimised):
        memory: (n, N, C) stripe memories, zero-initialised.
        momentum: () current ``a`` (set by :meth:`on_epoch_start`).

    Training ``forward`` adds to the baseline's outputs:
        stripe_feats: (n, B, C) L2-normalised stripe features.
        glr_weights: (B, N) the weights ``w`` (ones when ``cge.glr`` is off).
        revised_logits: (B, N) the prediction the ID loss is applied to.
    Eval ``forward`` is the baseline's (global feature only).
    """

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        opts = method_options(cfg, CGEOptions, "cge")
        self.num_stripes = int(opts.num_stripes)
        self.momentum_schedule = opts.momentum_schedule
        self.momentum_fixed = float(opts.momentum_fixed)
        self.momentum_exp_gamma = float(opts.momentum_exp_gamma)
        self.revise_level = opts.revise_level
        self.revise_target = opts.revise_target
        self.use_glr = bool(opts.glr)
        self.detach_weights = bool(opts.detach_weights)
        self.stripe_mode = cfg.model.pooling
        channels = int(self.feat_dim)
        if self.stripe_mode == "gem" and not hasattr(self.pool, "p"):
            raise ValueError(
                "model.pooling=gem but the baseline's pooling module has no learned 'p'; "
                "CGE pools stripes with the same p"
            )
        self.register_buffer("memory", torch.zeros(self.num_stripes, num_classes, channels))
        self.register_buffer("momentum", torch.zeros(()))
        self.class_conv: nn.Conv2d | None = None
        if self.revise_level == "feature":
            # Table 6: a 1x1 conv maps the C channels to N class maps that get revised.
            self.class_conv = nn.Conv2d(channels, num_classes, kernel_size=1, bias=False)
            nn.init.normal_(self.class_conv.weight, std=0.001)
            # the class maps replace the BNNeck classifier (no unused parameters under DDP);
            # the BN of the neck still gives the post-BN test feature
            self.neck.classifier = None

    # ------------------------------------------------------------------ pieces
    def stripe_features(self, feat_map: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) map -> (n, B, C) L2-normalised stripe features (pooled like f_g)."""
        if self.stripe_mode == "gem":
            # the global GeM clamps its learned p to >= 1 in the forward pass; do the same
            p = self.pool.p.float().clamp(min=1.0).reshape(())
            eps = float(getattr(self.pool, "eps", 1e-6))
            pooled = stripe_pool(feat_map, self.num_stripes, "gem", gem_p=p, gem_eps=eps)
        else:
            pooled = stripe_pool(feat_map, self.num_stripes, self.stripe_mode)
        return F.normalize(pooled.float(), dim=-1)

    def revise(
        self, outputs: dict[str, torch.Tensor], stripe_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base prediction p, the GLR weights w and the revised prediction.

        Returns:
            (logits (B, N), w (B, N), revised (B, N)); ``revised`` goes to the ID loss.
        """
        read = stripe_feats.detach() if self.detach_weights else stripe_feats
        if self.class_conv is not None:
            class_maps = self.class_conv(outputs["feat_map"])  # (B, N, h, w)
            logits = feature_level_logits(class_maps, None)
        else:
            class_maps = None
            logits = outputs["logits"]
        if not self.use_glr:
            return logits, torch.ones_like(logits), logits
        if class_maps is not None:
            # Table 6 revises the class maps themselves (each scaled by w_k, then GAP),
            # whatever revise_target says about the logit-level revise
            w_grad = glr_weights(read, self.memory)
            revised = feature_level_logits(class_maps, w_grad)
            w = w_grad.detach()
        elif self.revise_target == "probs":
            revised = revise_log_probs(logits, read, self.memory)
            w = torch.exp(revised - logits).detach()
        else:
            w_grad = glr_weights(read, self.memory)
            revised = logits * w_grad.to(logits.dtype)
            w = w_grad.detach()
        return logits, w, revised

    # ----------------------------------------------------------------- contract
    def forward_train(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The baseline's training outputs plus ``stripe_feats`` (n, B, C), ``glr_weights``
        (B, N) and ``revised_logits`` (B, N). Eval ``forward`` is the baseline's."""
        outputs = super().forward_train(images)
        if self.num_classes == 0:  # inference-only build: no classifier, nothing to revise
            return outputs
        stripes = self.stripe_features(outputs["feat_map"])
        logits, w, revised = self.revise(outputs, stripes)
        outputs["logits"] = logits
        outputs["stripe_feats"] = stripes
        outputs["glr_weights"] = w
        outputs["revised_logits"] = revised
        return outputs

    def compute_loss(
        self, outputs: dict[str, torch.Tensor], batch: Batch
    ) -> dict[str, torch.Tensor]:
        """The baseline's loss terms with the ID loss on the revised prediction (Eqs. 4, 9, 10)."""
        if "revised_logits" not in outputs:
            raise KeyError("CGE.compute_loss needs the training forward's 'revised_logits'")
        revised = dict(outputs)
        revised["logits"] = outputs["revised_logits"]
        return super().compute_loss(revised, batch)

    def on_epoch_start(self, epoch: int, max_epochs: int) -> None:
        super().on_epoch_start(epoch, max_epochs)
        a = momentum_at(
            self.momentum_schedule,
            epoch,
            max_epochs,
            fixed=self.momentum_fixed,
            gamma=self.momentum_exp_gamma,
        )
        self.momentum.fill_(a)

    @torch.no_grad()
    def on_step_end(self, outputs: dict[str, torch.Tensor], batch: Batch) -> None:
        """Memory write (Eq. 1) with all ranks' stripe features, after the optimiser step."""
        super().on_step_end(outputs, batch)
        feats, all_pids = gather_for_memory(outputs["stripe_feats"].detach(), batch["pids"])
        update_memory(self.memory, feats, all_pids, float(self.momentum))

    def classifier_parameters(self):
        yield from super().classifier_parameters()
        if self.class_conv is not None:
            yield from self.class_conv.parameters()

    @torch.no_grad()
    def memory_predictions(self, stripe_feats: torch.Tensor) -> torch.Tensor:
        """Per-stripe memory classification: argmax_k cos(f_i, M_{i,k}). (n, B) long."""
        return nlc_scores(stripe_feats, self.memory).argmax(dim=-1)
