"""Towers: the backbones under the BGE and TSE heads.

Every tower returns the same `TowerOutput`, so the heads, the losses, the export and the
serving code never look at which backbone produced it:
- `tokens` [B, N, C]: per-token features already projected to the joint width C;
- `global_feature` [B, C]: the projected global token (CLS for images, EOT for text);
- `scores` [B, N]: how much the global token attends to each token (TSE picks the top ones);
- `valid` [B, N]: tokens TSE may select (not CLS/SOS/EOT/padding).

Image towers take normalised float pixels [B, 3, H, W]; text towers take token ids [B, L].
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from icl.models.config import (
    CnnImageTower,
    Conv1dTextTower,
    ImageTowerConfig,
    ModelConfig,
    TextTowerConfig,
)
from icl.text.tokenizer import VOCAB_SIZE


class TowerOutput(NamedTuple):
    tokens: torch.Tensor
    global_feature: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor


def text_valid_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """Selectable text tokens: not padding (0), not SOS (position 0), not EOT (the max id)."""
    valid = input_ids != 0
    valid[:, 0] = False
    eot = input_ids.argmax(dim=-1, keepdim=True)
    return valid & ~F.one_hot(eot.squeeze(-1), input_ids.shape[1]).bool()


class _AttentionPool(nn.Module):
    """A learned query attending over tokens: the global feature, and the scores TSE reads."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.key = nn.Linear(width, width, bias=False)
        self.scale = 1.0 / math.sqrt(width)  # a constant, so export traces no shape arithmetic

    def forward(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.key(tokens) @ self.query * self.scale
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        weights = logits.softmax(dim=-1)
        return torch.einsum("bn,bnc->bc", weights, tokens), weights


class CnnTower(nn.Module):
    """Strided conv stages; each cell of the last feature map is a token."""

    def __init__(self, cfg: CnnImageTower, embed_dim: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        h, w = image_size
        if len(cfg.blocks) != len(cfg.channels):
            raise ValueError("cnn tower: `blocks` needs one entry per entry of `channels`")
        for out_ch, blocks in zip(cfg.channels, cfg.blocks, strict=True):
            h, w = (h + 1) // 2, (w + 1) // 2  # a stride-2, pad-1, 3x3 conv rounds up
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            for _ in range(blocks):
                layers += [
                    nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
                    nn.BatchNorm2d(out_ch),
                    nn.ReLU(inplace=True),
                ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(in_ch, embed_dim)
        self.pool = _AttentionPool(embed_dim)
        self.num_tokens = h * w  # token slots TSE selects from

    def forward(self, x: torch.Tensor) -> TowerOutput:
        tokens = self.proj(self.features(x).flatten(2).transpose(1, 2))
        pooled, weights = self.pool(tokens)
        valid = torch.ones_like(weights, dtype=torch.bool)
        return TowerOutput(tokens, pooled, weights, valid)


class Conv1dTower(nn.Module):
    """Embeddings + residual 1-D convolutions; an attention pool gives the global token."""

    def __init__(self, cfg: Conv1dTextTower, embed_dim: int, context_length: int) -> None:
        super().__init__()
        # Sparse gradients: a batch touches a few hundred of the 49,408 rows, and a dense
        # optimiser step over all of them would cost more than the rest of the tower.
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.width, padding_idx=0, sparse=True)
        self.pos = nn.Parameter(torch.zeros(context_length, cfg.width))
        pad = cfg.kernel_size // 2
        self.convs = nn.ModuleList(
            nn.Conv1d(cfg.width, cfg.width, cfg.kernel_size, padding=pad) for _ in range(cfg.layers)
        )
        self.norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim)
        self.pool = _AttentionPool(embed_dim)
        self.num_tokens = context_length - 2  # SOS and EOT are never selected

    def forward(self, input_ids: torch.Tensor) -> TowerOutput:
        present = input_ids != 0
        mask = present.unsqueeze(-1).to(self.pos.dtype)
        h = ((self.embed(input_ids) + self.pos[: input_ids.shape[1]]) * mask).transpose(1, 2)
        keep = mask.transpose(1, 2)
        for conv in self.convs:
            # Re-mask so padding never leaks into real tokens: the result then does not depend
            # on how much padding follows a caption (training trims batches to their longest).
            h = (h + F.gelu(conv(h))) * keep
        tokens = self.proj(self.norm(h.transpose(1, 2))) * mask
        pooled, weights = self.pool(tokens, present)
        return TowerOutput(tokens, pooled, weights, text_valid_mask(input_ids))


def build_image_tower(
    cfg: ImageTowerConfig, model: ModelConfig, load_weights: bool = True
) -> nn.Module:
    """`load_weights=False`: do not read a pretrained weights file (a checkpoint has them)."""
    if cfg.kind == "cnn":
        return CnnTower(cfg, model.embed_dim, model.image_size)
    if cfg.kind == "clip_vit":
        from icl.models.clip import ClipVisionBackbone

        return ClipVisionBackbone(cfg, model.embed_dim, model.image_size)
    from icl.models.pretrained import MobileNetV2Backbone

    return MobileNetV2Backbone(cfg, model.embed_dim, model.image_size, load_weights)


def build_text_tower(cfg: TextTowerConfig, model: ModelConfig) -> nn.Module:
    if cfg.kind == "conv1d":
        return Conv1dTower(cfg, model.embed_dim, model.context_length)
    if cfg.kind == "clip_transformer":
        from icl.models.clip import ClipTextBackbone

        return ClipTextBackbone(cfg, model.embed_dim, model.context_length)
    from icl.models.pretrained import HfTextBackbone

    return HfTextBackbone(cfg, model.embed_dim, model.context_length)


__all__ = [
    "CnnTower",
    "Conv1dTower",
    "TowerOutput",
    "build_image_tower",
    "build_text_tower",
    "text_valid_mask",
]
