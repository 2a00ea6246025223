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
from icl.models.pretrained import PretrainedWeightsError, state_hash
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

    @property
    def cacheable(self) -> bool:
        """Whether the tower's pretrained part is fixed, so its outputs can be cached."""
        return bool(getattr(self.tower, "cacheable", False))

    def _embed(self, out: TowerOutput) -> Embeddings:
        bge = F.normalize(out.global_feature, dim=-1)
        if self.tse is None:
            return Embeddings(bge, None)
        return Embeddings(bge, F.normalize(self.tse(out.tokens, out.scores, out.valid), dim=-1))


class ImageBranch(_Branch):
    """uint8 pixels [B, H, W, 3] -> served embedding [B, output_dim]."""

    def __init__(self, cfg: ModelConfig, load_weights: bool = True) -> None:
        super().__init__(build_image_tower(cfg.image_tower, cfg, load_weights), cfg)
        self.register_buffer("mean", torch.tensor(cfg.pixel_mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(cfg.pixel_std).view(1, 3, 1, 1) * 255.0)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.permute(0, 3, 1, 2).to(self.mean.dtype) - self.mean) / self.std

    def parts(self, pixels: torch.Tensor) -> Embeddings:
        return self._embed(self.tower(self.normalise(pixels)))

    def encode_fixed(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fixed (frozen, pretrained) part's outputs: what a feature cache stores."""
        return self.tower.encode_fixed(self.normalise(pixels))

    def parts_from_fixed(self, fixed: tuple[torch.Tensor, ...]) -> Embeddings:
        """`parts(pixels)` given `encode_fixed(pixels)`."""
        return self._embed(self.tower.from_fixed(fixed))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.parts(pixels).joint()


class TextBranch(_Branch):
    """Token ids [B, L] -> served embedding [B, output_dim]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(build_text_tower(cfg.text_tower, cfg), cfg)

    def parts(self, input_ids: torch.Tensor) -> Embeddings:
        return self._embed(self.tower(input_ids))

    def encode_fixed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.tower.encode_fixed(input_ids)

    def parts_from_fixed(
        self, input_ids: torch.Tensor, fixed: tuple[torch.Tensor, ...]
    ) -> Embeddings:
        """`parts(input_ids)` given `encode_fixed(input_ids)`."""
        selected = getattr(self.tower, "from_fixed_selected", None)
        if self.tse is not None and selected is not None:
            return self._embed(selected(input_ids, fixed, min(self.tse.k, input_ids.shape[1])))
        return self._embed(self.tower.from_fixed(input_ids, fixed))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.parts(input_ids).joint()


class DualEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, load_weights: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.image = ImageBranch(cfg, load_weights)
        self.text = TextBranch(cfg)

    def fixed_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per branch ("image", "text"), the state entries training never changes (the
        frozen part of a pretrained tower), under their model state-dict keys."""
        out = {}
        for name, branch in (("image", self.image), ("text", self.text)):
            fixed = getattr(branch.tower, "fixed_state", lambda: {})()
            if fixed:
                out[name] = {f"{name}.tower.{k}": v for k, v in fixed.items()}
        return out

    def tower_source(self, branch: str) -> str:
        """Where a pretrained tower's weights are read from (config `weights` / `path`)."""
        tower = self.config.image_tower if branch == "image" else self.config.text_tower
        return str(getattr(tower, "weights", None) or getattr(tower, "path", ""))

    def similarity(self, input_ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Score matrix [queries, images]: inner products of the served embeddings."""
        return self.text(input_ids) @ self.image(pixels).T


def build_model(cfg: ModelConfig, seed: int = 0) -> DualEncoder:
    """A freshly initialised model (pretrained towers load their own files); eval mode."""
    torch.manual_seed(seed)
    return DualEncoder(cfg).eval()


def fixed_references(model: DualEncoder) -> dict[str, dict[str, Any]]:
    """Per frozen tower: where its fixed weights come from and their `state_hash`."""
    return {
        branch: {
            "source": model.tower_source(branch),
            "sha256": state_hash(fixed.items()),
            "keys": sorted(fixed),
        }
        for branch, fixed in model.fixed_state().items()
        if model.tower_source(branch)  # randomly initialised frozen towers stay in the file
    }


def save_checkpoint(
    model: DualEncoder,
    path: Path,
    *,
    half: bool = False,
    extra: dict[str, Any] | None = None,
    omit_fixed: bool = False,
) -> None:
    """Write config + weights. `half` stores float weights as fp16 (committed demo weights).

    `omit_fixed` leaves out the frozen part of pretrained towers, stored instead as a
    reference (weights file or directory + sha256 of the tensors): loading reads them from
    there again and refuses weights whose hash differs.
    """
    references = fixed_references(model) if omit_fixed else {}
    left_out = {k for ref in references.values() for k in ref["keys"]}
    state = {
        k: (v.half() if half and v.is_floating_point() else v)
        for k, v in model.state_dict().items()
        if k not in left_out
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.model_dump(mode="json"),
        "state_dict": state,
        "extra": extra or {},
        "fixed_references": references,
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
    references = blob.get("fixed_references") or {}
    # A checkpoint that holds every weight does not read a pretrained tower's file again (it
    # may not exist on the machine that loads the checkpoint); one that left the frozen
    # image tower out must.
    try:
        model = DualEncoder(cfg, load_weights="image" in references)
    except PretrainedWeightsError as exc:
        raise CheckpointError(
            f"{path}: leaves out frozen tower weights, and they cannot be read: {exc}"
        ) from None
    check_fixed_references(model, references, path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    result = model.load_state_dict(state, strict=False)
    omitted = {k for ref in references.values() for k in ref["keys"]}
    result.missing_keys[:] = [k for k in result.missing_keys if k not in omitted]
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path}: weights do not match the stored config: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.eval()


def check_fixed_references(
    model: DualEncoder, references: dict[str, dict[str, Any]], path: Path
) -> None:
    """The frozen tower weights `model` read from its files are the ones `references` name."""
    fixed = model.fixed_state()
    for branch, ref in references.items():
        got = state_hash(fixed.get(branch, {}).items())
        if got != ref["sha256"]:
            raise CheckpointError(
                f"{path}: the frozen {branch} tower weights it leaves out were "
                f"{ref['source']} with sha256 {ref['sha256'][:16]}..., but that source now "
                f"holds sha256 {got[:16]}... (other weights): restore those weights"
            )


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
    "check_fixed_references",
    "checkpoint_extra",
    "fixed_references",
    "load_checkpoint",
    "save_checkpoint",
]
