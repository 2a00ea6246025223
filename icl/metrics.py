"""Retrieval metrics with the IRRA/RDE definitions (docs/method.md section 3).

Each query ranks the whole gallery; positives are the gallery images with the query's
person id. Ties are broken by gallery order (a stable sort), so results are reproducible.
Queries with no positive in the gallery have no defined AP or INP: they are left out of
every metric and counted in `queries_without_positive`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class RetrievalMetrics:
    r1: float
    r5: float
    r10: float
    map: float
    minp: float
    queries: int
    queries_without_positive: int

    @property
    def rsum(self) -> float:
        return self.r1 + self.r5 + self.r10

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "rsum": self.rsum}


def retrieval_metrics(
    similarity: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    chunk: int = 1024,
) -> RetrievalMetrics:
    """R1/R5/R10, mAP and mINP (all x100) of a [queries, gallery] similarity matrix."""
    similarity = np.asarray(similarity)
    query_ids = np.asarray(query_ids)
    gallery_ids = np.asarray(gallery_ids)
    if similarity.shape != (len(query_ids), len(gallery_ids)):
        raise ValueError(
            f"similarity is {similarity.shape}, expected ({len(query_ids)}, {len(gallery_ids)})"
        )
    if not np.all(np.isfinite(similarity)):
        raise ValueError("similarity holds NaN or infinite values")
    hits_at: dict[int, list[np.ndarray]] = {1: [], 5: [], 10: []}
    ap: list[np.ndarray] = []
    inp: list[np.ndarray] = []
    for start in range(0, len(query_ids), chunk):
        sims = similarity[start : start + chunk]
        order = np.argsort(-sims, axis=1, kind="stable")
        matches = gallery_ids[order] == query_ids[start : start + chunk, None]
        n_pos = matches.sum(axis=1)
        keep = n_pos > 0
        matches, n_pos = matches[keep], n_pos[keep]
        ranks = np.arange(1, matches.shape[1] + 1)
        cum = np.cumsum(matches, axis=1)
        for k in hits_at:
            hits_at[k].append(matches[:, :k].any(axis=1))
        ap.append((cum / ranks * matches).sum(axis=1) / n_pos)
        last = matches.shape[1] - np.argmax(
            matches[:, ::-1], axis=1
        )  # 1-based rank of last positive
        inp.append(n_pos / last)
    total = int(np.concatenate(ap).size) if ap else 0

    def pct(parts: list[np.ndarray]) -> float:
        joined = np.concatenate(parts) if parts else np.zeros(0)
        return float(joined.mean() * 100) if joined.size else 0.0

    return RetrievalMetrics(
        r1=pct(hits_at[1]),
        r5=pct(hits_at[5]),
        r10=pct(hits_at[10]),
        map=pct(ap),
        minp=pct(inp),
        queries=total,
        queries_without_positive=len(query_ids) - total,
    )
