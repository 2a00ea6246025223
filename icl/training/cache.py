"""Frozen-feature cache: a frozen tower's outputs, computed once and stored on disk.

A pretrained tower frozen whole (`frozen = true`, `unfreeze_last = 0`) maps the same input
to the same features on every step, so training would otherwise pay for the same forward
pass on every epoch (and an image once per caption). What is stored is the fixed part's
output that the trained layers read (`encode_fixed`: MobileNetV2's feature map;
a transformers encoder's last hidden states and [CLS] attention), in float32, so a step on
cached features computes what a step on the tower would.

A file is named by a sha256 over: the tower's config, the hash of its fixed weights
(`state_hash`), the preprocessing (image size and normalisation; the text tower's
tokenised ids are input, so the tokenizer is covered by the input hash) and the input
tensor itself. Changing any of them is a different file; nothing needs invalidating.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from icl.models.dual_encoder import DualEncoder
from icl.models.pretrained import state_hash

CACHE_FORMAT = "icl-feature-cache/1"


def default_cache_dir() -> Path:
    """`ICL_CACHE_DIR`, else `$XDG_CACHE_HOME/icl/features` (~/.cache/icl/features)."""
    if os.environ.get("ICL_CACHE_DIR"):
        return Path(os.environ["ICL_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "icl" / "features"


def _tensor_hash(t: torch.Tensor) -> str:
    t = t.contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class FeatureCache:
    """Stores and reuses `encode_fixed` outputs of a model's frozen towers under `directory`."""

    def __init__(self, directory: Path, batch_size: int = 64) -> None:
        self.directory = Path(directory)
        self.batch_size = batch_size
        self.hits = self.misses = 0
        self._weights: dict[tuple[int, str], str] = {}

    def _key(self, model: DualEncoder, branch: str, inputs: torch.Tensor) -> str:
        memo = (id(model), branch)
        if memo not in self._weights:  # hashing the weights costs ~0.1-1 s: once per model
            fixed = model.fixed_state()[branch]
            self._weights[memo] = state_hash(fixed.items())
        cfg = model.config
        tower = cfg.image_tower if branch == "image" else cfg.text_tower
        preprocessing = (
            {"size": cfg.image_size, "mean": cfg.pixel_mean, "std": cfg.pixel_std}
            if branch == "image"
            else {"context_length": cfg.context_length}
        )
        description = {
            "format": CACHE_FORMAT,
            "branch": branch,
            "tower": tower.model_dump(mode="json"),
            "weights": self._weights[memo],
            "preprocessing": preprocessing,
            "inputs": _tensor_hash(inputs),
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()

    def _get(
        self,
        model: DualEncoder,
        branch: str,
        inputs: torch.Tensor,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
        progress: Callable[[int], None] | None,
    ) -> tuple[torch.Tensor, ...]:
        path = self.directory / f"{branch}-{self._key(model, branch, inputs)}.pt"
        if path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                self.hits += 1
                if progress is not None:
                    progress(len(inputs))
                return tuple(stored)
            except Exception:  # a truncated or foreign file: compute again, overwrite it
                pass
        self.misses += 1
        parts: list[tuple[torch.Tensor, ...]] = []
        with torch.no_grad():
            for i in range(0, len(inputs), self.batch_size):
                parts.append(tuple(t.contiguous() for t in encode(inputs[i : i + self.batch_size])))
                if progress is not None:
                    progress(min(self.batch_size, len(inputs) - i))
        features = tuple(torch.cat(column) for column in zip(*parts, strict=True))
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save(list(features), tmp)
        tmp.replace(path)  # readers never see a half-written file
        return features

    def image_features(
        self,
        model: DualEncoder,
        pixels: torch.Tensor,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """`model.image.encode_fixed` of uint8 pixels [N, H, W, 3], row i for image i."""
        if not model.image.cacheable:
            raise ValueError("the image tower is not frozen whole: its features cannot be cached")
        return self._get(model, "image", pixels, model.image.encode_fixed, progress)

    def text_features(
        self,
        model: DualEncoder,
        ids: torch.Tensor,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """`model.text.encode_fixed` of token ids [N, L], trimmed to the longest caption:
        slice a batch's rows to its own length (padding never changes real tokens)."""
        if not model.text.cacheable:
            raise ValueError("the text tower is not frozen whole: its features cannot be cached")
        used = int((ids != 0).sum(dim=1).max()) if len(ids) else 0
        return self._get(model, "text", ids[:, : max(used, 3)], model.text.encode_fixed, progress)


__all__ = ["CACHE_FORMAT", "FeatureCache", "default_cache_dir"]
