"""The small interfaces that search, enrolment and THI depend on.

Adapters implement them: Triton (orchestrator/triton/encoders.py), Milvus
(orchestrator/gallery.py), and in-process onnxruntime/torch for offline evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class TextEncoder(Protocol):
    async def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised embeddings [len(texts), D]."""
        ...


class ImageEncoder(Protocol):
    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) that pixels must be resized to."""
        ...

    async def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> normalised embeddings [B, D]."""
        ...


@dataclass(frozen=True)
class GalleryRecord:
    image_id: str
    camera_id: str
    captured_at_ms: int
    track_id: str
    image_uri: str
    embedding: np.ndarray


@dataclass(frozen=True)
class GalleryHit:
    image_id: str
    camera_id: str
    captured_at_ms: int
    track_id: str
    image_uri: str
    score: float


@dataclass(frozen=True)
class GalleryFilter:
    """Typed filter fields; adapters turn them into their own query language."""

    camera_ids: tuple[str, ...] = ()
    start_ms: int | None = None
    end_ms: int | None = None

    @property
    def empty(self) -> bool:
        return not self.camera_ids and self.start_ms is None and self.end_ms is None


class Gallery(Protocol):
    dim: int

    def upsert(self, records: Sequence[GalleryRecord]) -> None:
        """Store rows; a row with an existing id replaces it (and its cached VQA answers)."""
        ...

    def search(self, vector: np.ndarray, top_k: int, where: GalleryFilter) -> list[GalleryHit]: ...

    def delete(self, image_ids: Sequence[str], where: GalleryFilter) -> list[str]:
        """Remove the listed ids, or every row matching `where`; returns the ids removed."""
        ...

    def unknown_cameras(self, camera_ids: Sequence[str]) -> list[str]: ...

    def count(self) -> int: ...

    def fetch(self, image_ids: Sequence[str]) -> list[GalleryRecord]:
        """Stored rows for the ids that exist, in the given order."""
        ...

    def get_vqa(self, image_ids: Sequence[str], model_key: str) -> dict[str, list[str]]:
        """Cached VQA answers stored under exactly `model_key` (e.g. MLLM name and version)."""
        ...

    def put_vqa(self, answers: Mapping[str, list[str]], model_key: str) -> None:
        """Cache answers per image id under `model_key`, keeping every other field."""
        ...
