"""A small CLIP-style dual encoder with the serving interface of the full model.

Both towers end in one L2-normalised vector whose inner product is the retrieval score, so
the gallery stores one vector per image and Milvus ranks by inner product. The image tower
takes uint8 pixels [B, H, W, 3] and normalises inside the graph, so every runtime (torch,
ONNX, TensorRT, Triton) receives the same raw tensor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icl.text.tokenizer import VOCAB_SIZE

# CLIP's image statistics; kept for every config so pretrained towers can be dropped in.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class DualEncoderConfig:
    """Sizes of the small dual encoder. `image_size` is (height, width)."""

    image_size: tuple[int, int] = (96, 32)
    context_length: int = 77
    vocab_size: int = VOCAB_SIZE
    embed_dim: int = 256
    image_channels: tuple[int, ...] = (32, 64, 128)
    text_width: int = 128
    text_layers: int = 2
    pixel_mean: tuple[float, float, float] = field(default=CLIP_MEAN)
    pixel_std: tuple[float, float, float] = field(default=CLIP_STD)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DualEncoderConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("image_size", "image_channels", "pixel_mean", "pixel_std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


class ImageTower(nn.Module):
    """uint8 pixels [B, H, W, 3] -> normalised embedding [B, D]."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1) * 255.0)
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch in cfg.image_channels:
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(in_ch, cfg.embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        x = self.features(x).mean(dim=(2, 3))
        return F.normalize(self.proj(x), dim=-1)


class TextTower(nn.Module):
    """CLIP token ids [B, L] -> normalised embedding [B, D] (masked mean of conv features)."""

    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.text_width, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(cfg.context_length, cfg.text_width))
        self.convs = nn.ModuleList(
            nn.Conv1d(cfg.text_width, cfg.text_width, 3, padding=1) for _ in range(cfg.text_layers)
        )
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = (input_ids != 0).unsqueeze(-1).float()
        x = (self.embed(input_ids) + self.pos[: input_ids.shape[1]]) * mask
        h = x.transpose(1, 2)
        for conv in self.convs:
            h = h + F.gelu(conv(h))
        h = h.transpose(1, 2) * mask
        pooled = h.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return F.normalize(self.proj(pooled), dim=-1)


class DualEncoder(nn.Module):
    def __init__(self, cfg: DualEncoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image = ImageTower(cfg)
        self.text = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # ln(100), as CLIP

    def similarity(self, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Score matrix [queries, images]: inner products of the normalised embeddings."""
        return self.text(input_ids) @ self.image(pixels).T


def build_model(cfg: DualEncoderConfig | None = None, seed: int = 0) -> DualEncoder:
    """A freshly initialised model; the seed makes random weights reproducible."""
    torch.manual_seed(seed)
    return DualEncoder(cfg or DualEncoderConfig()).eval()


@torch.no_grad()
def calibrate_batchnorm(model: DualEncoder, pixels: torch.Tensor) -> DualEncoder:
    """Set batch-norm statistics from real crops (data-dependent initialisation).

    An untrained image tower with default statistics maps every crop to nearly the same
    vector; calibrated statistics spread the embeddings so rankings are well defined.
    """
    norms = [m for m in model.image.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batch
    model.image.train()
    model.image(pixels)
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def save_checkpoint(model: DualEncoder, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(model.config), "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Path) -> DualEncoder:
    """Load a checkpoint written by `save_checkpoint`; missing or extra keys are an error."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = DualEncoder(DualEncoderConfig.from_dict(blob["config"]))
    model.load_state_dict(blob["state_dict"], strict=True)
    return model.eval()


__all__ = [
    "DualEncoder",
    "DualEncoderConfig",
    "build_model",
    "calibrate_batchnorm",
    "load_checkpoint",
    "save_checkpoint",
]
