"""The RDE-style dual encoder: any image/text towers, BGE and TSE heads, one served vector.

Score(q, g) = (cos(BGE_q, BGE_g) + cos(TSE_q, TSE_g)) / 2 (docs/method.md section 2). Each
branch serves [BGE/|BGE|, TSE/|TSE|] / sqrt(2), so one inner product of two served vectors
is exactly that score and the gallery stores one vector per image. Without TSE the served
vector is the normalised BGE and the score is its cosine.

The image branch takes uint8 pixels [B, H, W, 3] and normalises inside the graph, so every
runtime (torch, ONNX, TensorRT, Triton) receives the same raw tensor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from icl.models.config import ModelConfig
from icl.models.heads import TseHead
from icl.models.towers import TowerOutput, build_image_tower, build_text_tower

CHECKPOINT_FORMAT = "icl-dual-encoder/1"


class Embeddings(NamedTuple):
    """Normalised BGE [B, embed_dim] and TSE [B, tse.dim] (None when TSE is off)."""

    bge: torch.Tensor
    tse: torch.Tensor | None

    def joint(self) -> torch.Tensor:
        if self.tse is None:
            return self.bge
        return torch.cat([self.bge, self.tse], dim=-1) * (1.0 / math.sqrt(2.0))


class _Branch(nn.Module):
    def __init__(self, tower: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.tower = tower
        self.tse = (
            TseHead(cfg.embed_dim, cfg.tse.dim, cfg.tse.ratio, tower.num_tokens)
            if cfg.tse.enabled
            else None
        )

    def _embed(self, out: TowerOutput) -> Embeddings:
        bge = F.normalize(out.global_feature, dim=-1)
        if self.tse is None:
            return Embeddings(bge, None)
        return Embeddings(bge, F.normalize(self.tse(out.tokens, out.scores, out.valid), dim=-1))


class ImageBranch(_Branch):
    """uint8 pixels [B, H, W, 3] -> served embedding [B, output_dim]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(build_image_tower(cfg.image_tower, cfg), cfg)
        self.register_buffer("mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1) * 255.0)

    def parts(self, pixels: torch.Tensor) -> Embeddings:
        x = (pixels.permute(0, 3, 1, 2).to(self.mean.dtype) - self.mean) / self.std
        return self._embed(self.tower(x))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.parts(pixels).joint()


class TextBranch(_Branch):
    """Token ids [B, L] -> served embedding [B, output_dim]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(build_text_tower(cfg.text_tower, cfg), cfg)

    def parts(self, input_ids: torch.Tensor) -> Embeddings:
        return self._embed(self.tower(input_ids))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.parts(input_ids).joint()


class DualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image = ImageBranch(cfg)
        self.text = TextBranch(cfg)

    def similarity(self, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Score matrix [queries, images]: inner products of the served embeddings."""
        return self.text(input_ids) @ self.image(pixels).T


def build_model(cfg: ModelConfig, seed: int = 0) -> DualEncoder:
    """A freshly initialised model (pretrained towers load their own files); eval mode."""
    torch.manual_seed(seed)
    return DualEncoder(cfg).eval()


def save_checkpoint(
    model: DualEncoder, path: Path, *, half: bool = False, extra: dict[str, Any] | None = None
) -> None:
    """Write config + weights. `half` stores float weights as fp16 (committed demo weights)."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.model_dump(mode="json"),
        "state_dict": state,
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)  # never leave a half-written checkpoint under the real name


class CheckpointError(ValueError):
    """A checkpoint file that is not one of ours, or does not match its own config."""


def load_checkpoint(path: Path) -> DualEncoder:
    """Load a checkpoint written by `save_checkpoint`; missing or extra keys are an error."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: not an icl dual-encoder checkpoint (expected format {CHECKPOINT_FORMAT}; "
            "convert CLIP/RDE/IRRA weights with `icl convert`)"
        )
    cfg = ModelConfig.model_validate(blob["config"])
    # The checkpoint holds every weight: do not read a pretrained tower's file again (it may
    # not exist on the machine that loads the checkpoint).
    build_cfg = cfg
    if getattr(cfg.image_tower, "weights", None):
        build_cfg = cfg.model_copy(
            update={"image_tower": cfg.image_tower.model_copy(update={"weights": None})}
        )
    model = DualEncoder(build_cfg)
    model.config = cfg
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match the stored config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()


def checkpoint_extra(path: Path) -> dict[str, Any]:
    """The free-form metadata stored next to the weights (training run, metrics)."""
    return dict(torch.load(path, map_location="cpu", weights_only=True).get("extra", {}))


__all__ = [
    "CheckpointError",
    "DualEncoder",
    "Embeddings",
    "ImageBranch",
    "TextBranch",
    "build_model",
    "checkpoint_extra",
    "load_checkpoint",
    "save_checkpoint",
]
