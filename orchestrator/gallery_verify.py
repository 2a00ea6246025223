"""Is every gallery row reachable by search? Recall of the served search against exact search.

A row is unreachable when a search for its own stored vector, with a top_k that covers every
row scoring at least as high (its exact duplicates included), does not return it: no query
can then find it. Recall@k compares the served search for a sample of stored vectors with an
exact numpy search over every stored vector, by score, so equal vectors in any order count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from icl.orchestrator.gallery import MilvusGallery
from icl.ports import GalleryFilter

MAX_TOP_K = 16384  # a Milvus server's largest top_k
SCORE_TOLERANCE = 1e-4  # float32 scores from the backend against numpy's


@dataclass
class VerifyReport:
    rows: int
    sampled: int
    k: int
    recall_at_k: float
    unreachable: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # ties beyond MAX_TOP_K

    @property
    def ok(self) -> bool:
        return not self.unreachable


def verify_gallery(
    gallery: MilvusGallery, sample: int = 1000, k: int = 10, seed: int = 0
) -> VerifyReport:
    """Sample `sample` rows (0 or more than the gallery: all) and check them (see module doc)."""
    if k < 1 or k > MAX_TOP_K:
        raise ValueError(f"k must be 1 to {MAX_TOP_K}")
    if sample < 0:
        raise ValueError("sample must be 0 (all rows) or more")
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    for batch_ids, batch in gallery.iter_vectors():
        ids.extend(batch_ids)
        chunks.append(batch)
    if not ids:
        return VerifyReport(rows=0, sampled=0, k=k, recall_at_k=1.0)
    vectors = np.concatenate(chunks)
    n = len(ids)
    rng = np.random.default_rng(seed)
    picked = np.arange(n) if sample == 0 or sample >= n else rng.choice(n, sample, replace=False)
    recalls: list[float] = []
    report = VerifyReport(rows=n, sampled=len(picked), k=k, recall_at_k=0.0)
    for i in picked:
        scores = vectors @ vectors[i]
        want = min(k, n)
        kth = float(np.partition(-scores, want - 1)[want - 1]) * -1
        hits = gallery.search(vectors[i], want, GalleryFilter())
        good = sum(h.score >= kth - SCORE_TOLERANCE for h in hits[:want])
        recalls.append(good / want)
        # Every row scoring at least its own score (itself and its duplicates) must fit.
        ties = int(np.sum(scores >= scores[i] - SCORE_TOLERANCE))
        if ids[i] in {h.image_id for h in hits}:
            continue
        if ties > MAX_TOP_K:
            report.unchecked.append(ids[i])
            continue
        wide = gallery.search(vectors[i], max(ties, want), GalleryFilter())
        if ids[i] not in {h.image_id for h in wide}:
            report.unreachable.append(ids[i])
    report.recall_at_k = float(np.mean(recalls))
    return report
