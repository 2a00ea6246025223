"""CLIP towers (ViT image encoder, causal text transformer) on transformers' CLIP layers.

Both towers follow RDE's modified CLIP: the final layer norm and the bias-free projection are
applied to every token, not only to the global one, so TSE selects among projected tokens; the
last layer's attention (averaged over heads) from the global token gives the TSE scores.

Differences from transformers' CLIPVisionModel, on purpose:
- the image is not square (384x128 -> 24x8 patches); our embeddings hold a position table of
  exactly 1 + gh*gw rows, so export and TensorRT see a constant instead of a per-forward
  interpolation. `resize_position_embedding` adapts OpenAI's 14x14 table once, at conversion.
- the earlier layers run transformers' SDPA attention; only the last layer runs the eager
  attention, because it is the one whose weights we need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.clip.configuration_clip import CLIPTextConfig, CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPEncoderLayer, CLIPTextEmbeddings

from icl.models.config import ClipTextTower, ClipVisionTower
from icl.models.towers import TowerOutput, text_valid_mask
from icl.text.tokenizer import VOCAB_SIZE


def resize_position_embedding(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1 + S*S, C] (CLS row first, square S x S grid) -> [1 + gh*gw, C], bilinear.

    Same call as IRRA/RDE's `resize_pos_embed` (F.interpolate bilinear, align_corners=False),
    so a converted OpenAI table equals the one their models start training from.
    """
    if table.dim() != 2:
        raise ValueError(f"position table must be [1 + S*S, C], got {tuple(table.shape)}")
    side = math.isqrt(table.shape[0] - 1)
    if side * side != table.shape[0] - 1:
        raise ValueError(
            f"position table of {table.shape[0]} rows is not 1 + a square grid; cannot resize"
        )
    gh, gw = grid
    if (side, side) == (gh, gw):
        return table.clone()
    cls_row, patches = table[:1], table[1:]
    dtype = table.dtype
    patches = patches.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(gh, gw), mode="bilinear", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(dtype)
    return torch.cat([cls_row, patches], dim=0)


def _hf_config(
    cls: type[CLIPVisionConfig] | type[CLIPTextConfig],
    width: int,
    layers: int,
    heads: int,
    mlp_ratio: float,
    attn: str,
    **extra: int,
) -> CLIPVisionConfig | CLIPTextConfig:
    return cls(
        hidden_size=width,
        intermediate_size=int(width * mlp_ratio),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act="quick_gelu",  # OpenAI CLIP's activation
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        attn_implementation=attn,
        **extra,
    )


def _build_encoder(
    cls: type[CLIPVisionConfig] | type[CLIPTextConfig],
    width: int,
    layers: int,
    heads: int,
    mlp_ratio: float,
    **extra: int,
) -> CLIPEncoder:
    """transformers' CLIP encoder: SDPA attention, except eager in the last layer."""
    fast = _hf_config(cls, width, layers, heads, mlp_ratio, "sdpa", **extra)
    eager = _hf_config(cls, width, layers, heads, mlp_ratio, "eager", **extra)
    encoder = CLIPEncoder(fast)
    # The attention reads its implementation from its own config at every call.
    encoder.layers[-1] = CLIPEncoderLayer(eager)
    return encoder


def _run_encoder(
    encoder: CLIPEncoder, hidden: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All layers; returns the last hidden states and the last layer's attention [B, H, N, N].

    transformers' layers drop their attention weights (they are only recorded by hooks), so
    the last layer's residual block is spelled out here around its own submodules.
    """
    for layer in encoder.layers[:-1]:
        hidden = layer(hidden, mask)
    last: CLIPEncoderLayer = encoder.layers[-1]
    attn_out, weights = last.self_attn(hidden_states=last.layer_norm1(hidden), attention_mask=mask)
    hidden = hidden + attn_out
    hidden = hidden + last.mlp(last.layer_norm2(hidden))
    return hidden, weights


def _init_clip_(encoder: CLIPEncoder, width: int, layers: int) -> None:
    """OpenAI CLIP's initialisation (used only when no checkpoint is loaded)."""
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    for layer in encoder.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            nn.init.normal_(lin.weight, std=attn_std)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
        nn.init.zeros_(layer.self_attn.out_proj.bias)
        nn.init.normal_(layer.mlp.fc1.weight, std=fc_std)
        nn.init.zeros_(layer.mlp.fc1.bias)
        nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)
        nn.init.zeros_(layer.mlp.fc2.bias)


class ClipVisionEmbeddings(nn.Module):
    """Patchify + CLS + a position table of exactly 1 + gh*gw rows (no interpolation)."""

    def __init__(self, width: int, patch_size: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        h, w = image_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch_size}")
        self.image_size = (h, w)
        self.grid = (h // patch_size, w // patch_size)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(torch.randn(width) * scale)
        self.patch_embedding = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        num = self.grid[0] * self.grid[1] + 1
        self.position_embedding = nn.Parameter(torch.randn(num, width) * scale)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # Checked eagerly only: a traced graph has the size fixed by its example input.
        if not torch.jit.is_tracing() and tuple(pixels.shape[-2:]) != self.image_size:
            raise ValueError(
                f"image tower expects {self.image_size} (H, W), got {tuple(pixels.shape[-2:])}"
            )
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [B, gh*gw, C], row-major like CLIP
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding


class ClipVisionBackbone(nn.Module):
    """Normalised pixels [B, 3, H, W] -> TowerOutput over the gh*gw patch tokens."""

    def __init__(self, cfg: ClipVisionTower, embed_dim: int, image_size: tuple[int, int]) -> None:
        super().__init__()
        self.embeddings = ClipVisionEmbeddings(cfg.width, cfg.patch_size, image_size)
        self.pre_layernorm = nn.LayerNorm(cfg.width)
        self.encoder = _build_encoder(
            CLIPVisionConfig, cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio
        )
        self.post_layernorm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        _init_clip_(self.encoder, cfg.width, cfg.layers)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)
        gh, gw = self.embeddings.grid
        self.num_tokens = gh * gw

    def forward(self, pixels: torch.Tensor) -> TowerOutput:
        hidden = self.pre_layernorm(self.embeddings(pixels))
        hidden, weights = _run_encoder(self.encoder, hidden, None)
        tokens = self.proj(self.post_layernorm(hidden))
        scores = weights[:, :, 0, 1:].mean(dim=1)  # CLS -> each patch, averaged over heads
        patches = tokens[:, 1:]
        valid = torch.ones_like(scores, dtype=torch.bool)
        return TowerOutput(patches, tokens[:, 0], scores, valid)


class ClipTextBackbone(nn.Module):
    """CLIP token ids [B, L] (L = context_length) -> TowerOutput over all L positions."""

    def __init__(self, cfg: ClipTextTower, embed_dim: int, context_length: int) -> None:
        super().__init__()
        self.context_length = context_length
        hf = _hf_config(
            CLIPTextConfig,
            cfg.width,
            cfg.layers,
            cfg.heads,
            cfg.mlp_ratio,
            "eager",
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=context_length,
        )
        self.embeddings = CLIPTextEmbeddings(hf)
        self.encoder = _build_encoder(
            CLIPTextConfig,
            cfg.width,
            cfg.layers,
            cfg.heads,
            cfg.mlp_ratio,
            vocab_size=VOCAB_SIZE,
            max_position_embeddings=context_length,
        )
        self.final_layer_norm = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        # Additive causal mask, as in CLIP; a constant of the graph (not a checkpoint entry).
        causal = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.register_buffer(
            "causal_mask", causal.view(1, 1, context_length, context_length), persistent=False
        )
        nn.init.normal_(self.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embedding.weight, std=0.01)
        _init_clip_(self.encoder, cfg.width, cfg.layers)
        nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)
        self.num_tokens = context_length - 2  # SOS and EOT are never selected

    def forward(self, input_ids: torch.Tensor) -> TowerOutput:
        length = input_ids.shape[1]
        if not torch.jit.is_tracing() and length > self.context_length:
            raise ValueError(f"text tower takes at most {self.context_length} tokens, got {length}")
        hidden = self.embeddings(input_ids=input_ids)
        # A shorter batch (padding trimmed in training) is a prefix: under the causal mask its
        # tokens see exactly what they would see at full length.
        mask = self.causal_mask[:, :, :length, :length].to(hidden.dtype)
        hidden, weights = _run_encoder(self.encoder, hidden, mask)
        tokens = self.proj(self.final_layer_norm(hidden))
        eot = input_ids.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        global_feature = tokens[rows, eot]
        scores = weights.mean(dim=1)[rows, eot]  # EOT -> every position, averaged over heads
        return TowerOutput(tokens, global_feature, scores, text_valid_mask(input_ids))


__all__ = [
    "ClipTextBackbone",
    "ClipVisionBackbone",
    "ClipVisionEmbeddings",
    "resize_position_embedding",
]
