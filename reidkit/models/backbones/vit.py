"""ViT-B/16, ViT-S/16 and DeiT-S/16 for re-ID (Dosovitskiy et al., 2021; Touvron et al., 2021),
TransReID-style (He et al., ICCV 2021): any input size, optional overlapping patches.

State-dict keys are timm's ``vit_base_patch16_224`` / ``vit_small_patch16_224`` /
``deit_small_patch16_224`` (DeiT's own checkpoints share them): ``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1``, ``blocks.{i}.attn.qkv``,
``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``/``fc2``, ``norm``;
a file's ``head.*`` is ignored.

Re-ID specifics:

- ``img_size`` (default 256x128) fixes the patch grid of ``pos_embed``. A checkpoint's
  position embeddings (e.g. 14x14 at 224) are interpolated to this grid when loaded
  (:func:`resize_pos_embed`; the CLS entry is kept), and an input of another size
  interpolates them on the fly.
- ``stride`` < 16 gives overlapping patches (TransReID uses 12: a 21x10 grid at 256x128);
  the patch projection keeps its 16x16 kernel, so ImageNet weights still fit.
- ``forward(x)`` returns the patch tokens after the final LayerNorm as a ``(B, C, h, w)``
  map (so pooling heads work unchanged); :meth:`VisionTransformer.forward_cls` returns the
  CLS token ``(B, C)``, TransReID's global feature, and
  :meth:`VisionTransformer.forward_tokens` both at once.

Stages for methods: the 12 blocks in four groups of three, ``layer1``..``layer4`` (real
``nn.Sequential`` modules, so blocks can be inserted or a stage copied); ``layer4``'s tail
is the final ``norm``. Their stem/run_stage pass token sequences ``(B, 1 + N, C)`` (CLS
first); :meth:`VisionTransformer.tokens_to_map` turns one into a map. The state dict is
still written and read with timm's flat ``blocks.{i}`` names (state-dict hooks translate
``layerS.j`` <-> ``blocks.{i}`` by each block's original index), so timm files load and
saved files stay in timm's layout.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from reidkit.models.backbones.base import Backbone

__all__ = ["VisionTransformer", "TransformerBlock", "resize_pos_embed", "VIT_CONFIGS"]

logger = logging.getLogger(__name__)

# name -> (embed dim, depth, heads, mlp ratio)
VIT_CONFIGS: dict[str, tuple[int, int, int, float]] = {
    "vit_base_patch16": (768, 12, 12, 4.0),
    "vit_small_patch16": (384, 12, 6, 4.0),
    "deit_small_patch16": (384, 12, 6, 4.0),
}


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Interpolate ViT position embeddings to another patch grid.

    Args:
        pos_embed: ``(1, P + gh * gw, C)`` with ``P = num_prefix_tokens`` (the CLS token)
            first, then the grid row by row.
        new_grid: target ``(gh', gw')``.
        old_grid: source ``(gh, gw)``; ``None``: a square grid inferred from the length.
        mode: ``"bicubic"`` (timm's default, anti-aliased when shrinking) or
            ``"bilinear"`` (TransReID's).

    Returns:
        ``(1, P + gh' * gw', C)``; the prefix entries are unchanged.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n, dim = grid.shape[1], grid.shape[2]
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"pos_embed has {n} grid entries, not a square grid; pass old_grid=(h, w)"
            )
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"pos_embed has {n} grid entries, not {old_grid[0]}x{old_grid[1]}")
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"pos-embed interpolation mode must be bicubic or bilinear, got {mode}")
    grid = grid.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid.float(),
        size=tuple(new_grid),
        mode=mode,
        align_corners=False,
        antialias=mode == "bicubic",
    ).to(pos_embed.dtype)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, grid], dim=1)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (train mode only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's ``Attention``).

    ``(B, N, C) -> (B, N, C)``: ``proj(softmax(q k^T / sqrt(d)) v)`` per head,
    ``d = C / heads``. The products are explicit matrix multiplications (counted by
    ``reidkit flops``; at re-ID token counts they cost little).
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    """``fc2(gelu(fc1(x)))``: ``(B, N, C) -> (B, N, C)`` with hidden width ``C * ratio``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``timm_index`` is the block's position in the published ``blocks`` list (used for the
    state-dict key translation). Shape: ``(B, N, C) -> (B, N, C)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        timm_index: int = 0,
    ) -> None:
        super().__init__()
        self.timm_index = timm_index
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """16x16 patches (stride ``stride``) projected to ``dim``: ``(B, 3, H, W) -> (B, N, C)``
    with ``N = gh * gw``, ``gh = (H - 16) // stride + 1``."""

    def __init__(self, patch_size: int, stride: int, dim: int) -> None:
        super().__init__()
        self.patch_size, self.stride = patch_size, stride
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=stride)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p, s = self.patch_size, self.stride
        if height < p or width < p:
            raise ValueError(f"input {height}x{width} is smaller than one {p}x{p} patch")
        return (height - p) // s + 1, (width - p) // s + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(Backbone):
    """ViT / DeiT trunk for re-ID (timm key layout, no classifier head).

    Args:
        embed_dim, depth, num_heads, mlp_ratio: 768/12/12/4 (ViT-B), 384/12/6/4 (ViT-S, DeiT-S).
        img_size: ``(H, W)`` the position embeddings are stored for (256x128).
        patch_size: 16; ``stride``: patch stride (16: no overlap; 12: TransReID's overlap).
        drop_path_rate: stochastic depth, linearly increasing over the blocks (TransReID:
            0.1); ``drop_rate``, ``attn_drop_rate``: dropout.
        pos_embed_interp: ``"bicubic"`` or ``"bilinear"`` for resizing position embeddings.
        last_stride: accepted for interface compatibility and ignored (the patch stride is
            ``stride``).

    Attributes:
        grid: ``(gh, gw)`` patch grid at ``img_size`` (16x8, or 21x10 with stride 12).

    ``forward(x)``: ``(B, 3, H, W) -> (B, embed_dim, gh, gw)``.
    """

    stage_format = "tokens"
    stage_tails = {"layer4": "norm"}
    pretrained_ignore_prefixes = ("head.", "head_dist.", "dist_token", "fc_norm.", "pre_logits.")

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        img_size: tuple[int, int] = (256, 128),
        patch_size: int = 16,
        stride: int = 16,
        drop_path_rate: float = 0.1,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        pos_embed_interp: str = "bicubic",
        last_stride: int = 2,
    ) -> None:
        super().__init__()
        if depth < 4:
            raise ValueError(f"depth must be >= 4 (four stages), got {depth}")
        if not 0 < stride <= patch_size:
            raise ValueError(f"patch stride must be in 1..{patch_size}, got {stride}")
        if pos_embed_interp not in ("bicubic", "bilinear"):
            raise ValueError(
                f"pos_embed_interp must be bicubic or bilinear, got {pos_embed_interp}"
            )
        self.last_stride = last_stride
        self.embed_dim = embed_dim
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.pos_embed_interp = pos_embed_interp
        self.patch_embed = PatchEmbed(patch_size, stride, embed_dim)
        self.grid = self.patch_embed.grid(*self.img_size)
        self._last_grid = self.grid  # grid of the latest stem() input (for tokens_to_map)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / (depth - 1) for i in range(depth)]
        blocks = [
            TransformerBlock(
                embed_dim, num_heads, mlp_ratio, drop_rate, attn_drop_rate, rates[i], timm_index=i
            )
            for i in range(depth)
        ]
        # four groups as equal as possible (3 blocks each for depth 12)
        bounds = [round(depth * s / 4) for s in range(5)]
        for s, name in enumerate(self.stage_names):
            setattr(self, name, nn.Sequential(*blocks[bounds[s] : bounds[s + 1]]))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.stage_channels = [embed_dim] * 4
        self.out_channels = embed_dim
        self._init_weights()
        self._register_state_dict_hook(_to_timm_keys)
        self._register_load_state_dict_pre_hook(_from_timm_keys, with_module=True)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ tokens
    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed
        return resize_pos_embed(self.pos_embed, grid, self.grid, mode=self.pos_embed_interp)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS token + position embedding: ``(B, 3, H, W) -> (B, 1 + N, C)``."""
        grid = self.patch_embed.grid(x.shape[-2], x.shape[-1])
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self._pos_embed_for(grid)
        self._last_grid = grid
        return self.pos_drop(tokens)

    def tokens_to_map(
        self, tokens: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Patch tokens of ``(B, 1 + N, C)`` (CLS dropped) -> ``(B, C, gh, gw)``."""
        gh, gw = grid or self._last_grid
        patches = tokens[:, 1:]
        return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` -> (CLS feature ``(B, C)``, patch map ``(B, C, gh, gw)``), both
        after the final LayerNorm."""
        tokens = self.stem(x)
        grid = self._last_grid
        for name in self.stage_names:
            tokens = self.run_stage(name, tokens)
        return tokens[:, 0], self.tokens_to_map(tokens, grid)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """CLS-token feature ``(B, C)`` (TransReID's global feature)."""
        return self.forward_tokens(x)[0]

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs as patch maps ``(B, C, gh, gw)`` (the last normalised)."""
        tokens = self.stem(x)
        grid = self._last_grid
        outs = []
        for name in self.stage_names:
            tokens = self.run_stage(name, tokens)
            outs.append(self.tokens_to_map(tokens, grid))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> patch-token map ``(B, C, gh, gw)`` after the final norm."""
        return self.forward_tokens(x)[1]

    # ------------------------------------------------------------------ weights
    def adapt_pretrained_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resize a file's ``pos_embed`` (e.g. 1 + 14x14 at 224) to this model's grid."""
        pe = state.get("pos_embed")
        if pe is not None and pe.shape != self.pos_embed.shape and pe.dim() == 3:
            if pe.shape[-1] != self.embed_dim:
                return state  # wrong model: let the shape check report it
            state = dict(state)
            if "dist_token" in state:
                # distilled DeiT: CLS, distillation token, grid; the second token is unused
                pe = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
            state["pos_embed"] = resize_pos_embed(pe, self.grid, mode=self.pos_embed_interp)
            logger.info(
                "pos_embed resized from %d to %d tokens (grid %dx%d, %s)",
                pe.shape[1],
                state["pos_embed"].shape[1],
                *self.grid,
                self.pos_embed_interp,
            )
        return state

    def block_index_map(self) -> dict[str, str]:
        """``"layerS.j"`` -> ``"blocks.i"`` for every original block in the stages."""
        mapping = {}
        for name in self.stage_names:
            stage = getattr(self, name, None)
            if not isinstance(stage, nn.Sequential):
                continue
            for j, block in enumerate(stage):
                idx = getattr(block, "timm_index", None)
                if idx is not None:
                    mapping[f"{name}.{j}"] = f"blocks.{idx}"
        return mapping


def _rename(keys_map: dict[str, str], key: str, prefix: str) -> str:
    """``prefix + 'layer2.1.attn...'`` -> ``prefix + 'blocks.4.attn...'`` (if mapped)."""
    rest = key[len(prefix) :]
    head = ".".join(rest.split(".", 2)[:2])
    if head in keys_map and rest.startswith(head + "."):
        return prefix + keys_map[head] + rest[len(head) :]
    return key


def _to_timm_keys(module: VisionTransformer, state_dict, prefix: str, local_metadata) -> None:
    """State-dict hook: write the stage blocks under timm's ``blocks.{i}`` names."""
    mapping = module.block_index_map()
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:
        state_dict[_rename(mapping, key, prefix) if key.startswith(prefix) else key] = value


def _from_timm_keys(
    module: VisionTransformer,
    state_dict,
    prefix: str,
    local_metadata,
    strict,
    missing_keys,
    unexpected_keys,
    error_msgs,
) -> None:
    """Load pre-hook: read timm's ``blocks.{i}`` names into the stage blocks."""
    inverse = {v: k for k, v in module.block_index_map().items()}
    for key in [k for k in state_dict if k.startswith(prefix + "blocks.")]:
        new = _rename(inverse, key, prefix)
        if new != key:
            state_dict[new] = state_dict.pop(key)
