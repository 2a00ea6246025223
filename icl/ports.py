"""The small interfaces that search, enrolment and THI depend on.

Adapters implement them: Triton (orchestrator/triton/encoders.py), Milvus
(orchestrator/gallery.py), the crop store (orchestrator/crops.py), and in process
(icl/onnx_encoders.py, orchestrator/memory_gallery.py) for offline evaluation and unit tests.
Calls that can wait on a server carry the caller's deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# The caller's remaining time in seconds (None: no deadline), asked again at each step.
Remaining = Callable[[], float | None]


class TextEncoder(Protocol):
    async def encode_texts(
        self, texts: Sequence[str], timeout_s: float | None = None
    ) -> np.ndarray:
        """Normalised embeddings [len(texts), D], within `timeout_s` when given."""
        ...


class ImageEncoder(Protocol):
    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) that pixels must be resized to."""
        ...

    async def encode_images(self, pixels: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        """uint8 [B, H, W, 3] -> normalised embeddings [B, D], within `timeout_s` when given."""
        ...


class Encoders(TextEncoder, ImageEncoder, Protocol):
    """Both towers of one dual encoder (their embeddings share one space)."""


class Crops(Protocol):
    """Where enrolled crops are kept for THI (the MLLM looks at the pixels)."""

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None: ...

    def load(self, image_ids: Sequence[str]) -> list[np.ndarray]:
        """RGB uint8 arrays in the given order."""
        ...

    def delete(self, image_ids: Iterable[str]) -> None: ...

    def read(self, image_id: str) -> bytes | None:
        """The crop's bytes as enrolled, or None when none is stored."""
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
    # The cached VQA answers under the model key the search asked for (None: none cached).
    vqa: tuple[str, ...] | None = None


@dataclass(frozen=True)
class GalleryFilter:
    """Typed filter fields; adapters turn them into their own query language."""

    camera_ids: tuple[str, ...] = ()
    start_ms: int | None = None
    end_ms: int | None = None

    @property
    def empty(self) -> bool:
        return not self.camera_ids and self.start_ms is None and self.end_ms is None

    def matches(self, camera_id: str, captured_at_ms: int) -> bool:
        """Whether a row with these fields passes the filter (as the adapters filter)."""
        return (
            (not self.camera_ids or camera_id in self.camera_ids)
            and (self.start_ms is None or captured_at_ms >= self.start_ms)
            and (self.end_ms is None or captured_at_ms <= self.end_ms)
        )


@dataclass(frozen=True)
class GalleryEntry:
    """A gallery row's metadata (browsing: no embedding)."""

    image_id: str
    camera_id: str
    captured_at_ms: int
    track_id: str
    image_uri: str


@dataclass(frozen=True)
class GalleryStats:
    images: int
    per_camera: dict[str, int]
    oldest_ms: int | None
    newest_ms: int | None


class Gallery(Protocol):
    def upsert(self, records: Sequence[GalleryRecord]) -> None:
        """Store rows; a row with an existing id replaces it (and its cached VQA answers)."""
        ...

    def search(
        self, vector: np.ndarray, top_k: int, where: GalleryFilter, vqa_model_key: str = ""
    ) -> list[GalleryHit]:
        """The top_k rows by inner product; with `vqa_model_key`, each hit also carries the
        VQA answers cached under that key (THI reads them with the base ranking)."""
        ...

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

    def list_page(self, where: GalleryFilter, after: str | None, limit: int) -> list[GalleryEntry]:
        """Up to `limit` rows matching `where` whose image_id sorts after `after` (None: from
        the start), in image_id order: a keyset page, no offset, so each row is listed once
        however many are enrolled or deleted between pages."""
        ...

    def stats(self) -> GalleryStats:
        """Rows, rows per camera, oldest and newest capture time."""
        ...

    def reachable(self, timeout_s: float = 2.0) -> bool:
        """Whether the store answers and holds the collection (the service's health)."""
        ...

    def close(self) -> None: ...
