"""Run configuration: `[model]` (icl.models.config.ModelConfig) and `[train]` in one TOML file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from icl.models.config import ModelConfig


class RdaConfig(BaseModel):
    """RDA online (docs/rda.md): a reorganised caption as an extra positive per pair, from the
    `diversity_captions` that `icl rda` wrote; weight max(weight_floor, 1 - decay * epoch)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    weight_floor: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.03, ge=0)


class TrainConfig(BaseModel):
    """Optimisation and augmentation. Defaults are the paper's (docs/method.md section 2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(default=60, ge=1)
    batch_size: int = Field(default=64, ge=2)
    loss: Literal["tal", "sdm"] = "tal"
    tal_tau: float = Field(default=0.015, gt=0)
    tal_margin: float = 0.1
    sdm_scale: float = Field(default=50.0, gt=0)
    # Learning rates per parameter group (docs/training.md): `lr` for the towers' backbones
    # (what a pretrained tower brings; its trainable blocks when partly frozen), `proj_lr`
    # for each tower's projection to the joint width and its pooling (BGE; None: `lr`, as
    # for CLIP, whose projections are pretrained), `head_lr` for the TSE heads.
    lr: float = Field(default=1e-5, gt=0)
    proj_lr: float | None = Field(default=None, gt=0)
    head_lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=4e-5, ge=0)
    warmup_epochs: float = Field(default=5, ge=0)
    warmup_factor: float = Field(default=0.1, gt=0, le=1)
    # Image augmentation on the model's input size: horizontal flip, zero pad + random crop,
    # random erasing with this probability.
    flip: bool = True
    pad: int = Field(default=10, ge=0)
    erasing: float = Field(default=0.5, ge=0, le=1)
    # Text augmentation: each caption token is, with this probability, deleted or replaced
    # by a random token of the batch (half each).
    text_aug: float = Field(default=0.2, ge=0, lt=1)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)  # carved from train if no val split
    select_metric: Literal["r1", "map", "rsum"] = "rsum"
    seed: int = 0
    # Torch threads; None: the machine's cores (`icl train --threads` overrides both).
    threads: int | None = Field(default=None, ge=1)
    # Frozen-feature cache (icl/training/cache.py): a tower frozen whole whose inputs are
    # not augmented (images: flip = false, pad = 0, erasing = 0; text: text_aug = 0) runs
    # once per image/caption, not on every step. cache_dir None: `ICL_CACHE_DIR`, else
    # ~/.cache/icl/features.
    cache_features: bool = True
    cache_dir: str | None = None
    # Checkpoints name the frozen part of pretrained towers (weights file + sha256) instead
    # of storing it; loading reads it from there and checks the hash.
    omit_frozen_weights: bool = False
    rda: RdaConfig = Field(default_factory=RdaConfig)  # `[train.rda]`, off by default


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig
    train: TrainConfig = Field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """A run configuration that cannot be read; the message names the file and the field."""


def load_run_config(path: Path) -> RunConfig:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"{path}: {where}: {first['msg']} ({exc.error_count()} problem(s))"
        ) from None


__all__ = ["ConfigError", "RdaConfig", "RunConfig", "TrainConfig", "load_run_config"]
