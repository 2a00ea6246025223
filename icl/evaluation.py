"""Offline evaluation: every caption of a split queries every image of that split.

Scores are inner products of the served embeddings (`model.text` / `model.image`), exactly
what the online service ranks by, and the metrics are icl.metrics (IRRA/RDE definitions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from icl.data.readers import ImageRecord
from icl.images import ImageRejected, decode_crop
from icl.metrics import RetrievalMetrics, retrieval_metrics
from icl.models.dual_encoder import DualEncoder

if TYPE_CHECKING:
    from icl.training.cache import FeatureCache

Progress = Callable[[int], None]


@dataclass(frozen=True)
class RetrievalSet:
    """Queries (captions) and gallery (images) of one split, images already at model size."""

    query_texts: tuple[str, ...]
    query_ids: np.ndarray
    gallery_pixels: np.ndarray  # uint8 [N, H, W, 3]
    gallery_ids: np.ndarray
    gallery_paths: tuple[Path, ...]


def load_pixels(
    paths: Sequence[Path],
    size: tuple[int, int],
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Decode image files to uint8 [N, H, W, 3] at `size`; a bad file is an error naming it."""
    out = np.empty((len(paths), *size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = decode_crop(path.read_bytes(), size)
        except (OSError, ImageRejected) as exc:
            raise ImageRejected(f"{path}: {exc}") from None
        if progress is not None:
            progress(1)
    return out


def retrieval_set(
    records: Sequence[ImageRecord],
    size: tuple[int, int],
    progress: Progress | None = None,
) -> RetrievalSet:
    texts = tuple(c for r in records for c in r.captions)
    qids = np.array([r.person_id for r in records for _ in r.captions], dtype=np.int64)
    paths = tuple(r.image_path for r in records)
    return RetrievalSet(
        texts,
        qids,
        load_pixels(paths, size, progress),
        np.array([r.person_id for r in records], dtype=np.int64),
        paths,
    )


@torch.no_grad()
def embed_texts(
    model: DualEncoder,
    ids: np.ndarray,
    batch: int = 512,
    cache: FeatureCache | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Served text embeddings; from cached features when `cache` is given and the text
    tower is frozen whole (computing and storing them on the first call)."""
    model.eval()
    all_ids = torch.from_numpy(ids)
    if cache is not None and model.text.cacheable:
        fixed = cache.text_features(model, all_ids)
        length = fixed[0].shape[1]
        parts = []
        for i in range(0, len(ids), batch):
            rows = slice(i, i + batch)
            embs = model.text.parts_from_fixed(
                all_ids[rows, :length], tuple(f[rows] for f in fixed)
            )
            parts.append(embs.joint())
            if progress is not None:
                progress(len(embs.bge))
        return torch.cat(parts).numpy()
    parts = []
    for i in range(0, len(ids), batch):
        parts.append(model.text(all_ids[i : i + batch]))
        if progress is not None:
            progress(len(parts[-1]))
    return torch.cat(parts).numpy()


@torch.no_grad()
def embed_images(
    model: DualEncoder,
    pixels: np.ndarray,
    batch: int = 256,
    cache: FeatureCache | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Served image embeddings; from cached features as `embed_texts` does."""
    model.eval()
    all_pixels = torch.from_numpy(pixels)
    if cache is not None and model.image.cacheable:
        fixed = cache.image_features(model, all_pixels)
        parts = []
        for i in range(0, len(pixels), batch):
            embs = model.image.parts_from_fixed(tuple(f[i : i + batch] for f in fixed))
            parts.append(embs.joint())
            if progress is not None:
                progress(len(embs.bge))
        return torch.cat(parts).numpy()
    parts = []
    for i in range(0, len(pixels), batch):
        parts.append(model.image(all_pixels[i : i + batch]))
        if progress is not None:
            progress(len(parts[-1]))
    return torch.cat(parts).numpy()


def similarity_matrix(
    model: DualEncoder,
    data: RetrievalSet,
    tokenizer: Callable[[Sequence[str]], np.ndarray],
    cache: FeatureCache | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """[queries, gallery] scores of the served embeddings. `progress` counts captions, then
    images (len(query_texts) + len(gallery_pixels) in all)."""
    text = embed_texts(model, tokenizer(data.query_texts), cache=cache, progress=progress)
    image = embed_images(model, data.gallery_pixels, cache=cache, progress=progress)
    return text @ image.T


def evaluate(
    model: DualEncoder,
    data: RetrievalSet,
    tokenizer: Callable[[Sequence[str]], np.ndarray],
    cache: FeatureCache | None = None,
    progress: Progress | None = None,
) -> RetrievalMetrics:
    sims = similarity_matrix(model, data, tokenizer, cache, progress)
    return retrieval_metrics(sims, data.query_ids, data.gallery_ids)


__all__ = [
    "RetrievalSet",
    "embed_images",
    "embed_texts",
    "evaluate",
    "load_pixels",
    "retrieval_set",
    "similarity_matrix",
]
