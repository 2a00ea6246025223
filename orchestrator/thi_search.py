"""Search with THI online: the engine of icl.thi over the Gallery, Crops and Mllm ports
(Milvus, the crop store and Triton in the service).

Fusion needs every image's base and refined score. Online the gallery is only reachable by
nearest-neighbour search, so the pool is the union of the base query's and the refined
query's top-N (same filters), re-scored exactly from the stored embeddings. An image in
neither list scores below lambda * (N-th base score) + (1 - lambda) * (N-th refined score);
when the k-th fused score is at least that bound the returned top-k is exactly the
full-gallery fusion (the trace says whether it was).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import numpy as np

from icl.mllm.contract import Mllm
from icl.ports import Crops, Gallery, GalleryFilter, GalleryHit, GalleryRecord
from icl.thi.engine import (
    MLLM_TIMEOUT,
    NO_ANCHOR_NO_CANDIDATES,
    OnStep,
    ThiOutcome,
    ThiParams,
    ThiStep,
    fuse,
    run_thi,
)

POOL = 100  # top-N of each list that THI re-scores


class GalleryVqaCache:
    """The engine's VQA cache over the gallery's cached-answers field (per image, per model).

    The engine is synchronous about the cache; answers are fetched for the candidates before
    it runs and written back after, so Milvus is called at most twice per search."""

    def __init__(self, known: dict[str, list[str]]) -> None:
        self.known = known
        self.new: dict[str, list[str]] = {}

    def get(self, image_id: str, model_key: str) -> list[str] | None:
        return self.known.get(image_id)

    def put(self, image_id: str, model_key: str, answers: list[str]) -> None:
        self.new[image_id] = list(answers)


@dataclass
class ThiSearchResult:
    hits: list[GalleryHit]
    outcome: ThiOutcome
    candidates: list[GalleryHit]
    exact: bool
    anchor_id: str = ""  # the anchor's image id ("" when THI kept the base ranking)


InGallery = Callable[..., Awaitable]
Stage = Callable[[str], AbstractContextManager[None]]


def _untimed(name: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def _no_steps(step: ThiStep) -> None:
    return None


async def thi_search(
    text: str,
    query_vector: np.ndarray,
    top_k: int,
    where: GalleryFilter,
    params: ThiParams,
    *,
    gallery: Gallery,
    in_gallery: InGallery,
    encode_texts: Callable[[Sequence[str]], Awaitable[np.ndarray]],
    mllm: Mllm,
    crops: Crops,
    mllm_timeout_s: float,
    stage: Stage = _untimed,
    on_step: OnStep = _no_steps,
    on_base: Callable[[list[GalleryHit]], None] | None = None,
    confirmed_anchor: GalleryRecord | None = None,
) -> ThiSearchResult:
    """`stage(name)` times the gallery searches and the fusion (the service's metrics);
    the encoder and the MLLM are timed by whoever passes `encode_texts` and `mllm`.

    `on_base` sees the base ranking (the whole pool) before THI starts and `on_step` each THI
    step (SearchStream). `encode_texts` turns the refined query into the refined vector (the
    service combines it with a query crop). `confirmed_anchor`: an operator's anchor (any
    gallery row, also outside the candidates or the filter): no yes/no walk; it is pinned in
    the fusion when it passes the filter."""
    pool_n = max(POOL, top_k, params.candidates)
    with stage("gallery_search"):
        base_hits: list[GalleryHit] = await in_gallery(gallery.search, query_vector, pool_n, where)
    if on_base is not None:
        on_base(base_hits)
    candidates = base_hits[: params.candidates]
    if not candidates:
        return ThiSearchResult([], ThiOutcome(fallback_reason=NO_ANCHOR_NO_CANDIDATES), [], True)
    ids = [h.image_id for h in candidates]
    scores = [h.score for h in candidates]
    anchor_at: int | None = None
    if confirmed_anchor is not None:
        # The engine starts from the anchor: it sees it as its only candidate.
        ids = [confirmed_anchor.image_id]
        scores = [float(np.dot(confirmed_anchor.embedding, query_vector))]
        anchor_at = 0
    cached = await in_gallery(gallery.get_vqa, ids, mllm.model_key)
    cache = GalleryVqaCache(cached)

    async def load(image_ids: Sequence[str]) -> list[np.ndarray]:
        return await asyncio.to_thread(crops.load, image_ids)

    try:
        outcome = await asyncio.wait_for(
            run_thi(text, ids, scores, load, mllm, params, cache, on_step, anchor_at),
            mllm_timeout_s,
        )
    except TimeoutError:
        outcome = ThiOutcome(fallback_reason=f"{MLLM_TIMEOUT}: limit {mllm_timeout_s:g} s")
    if cache.new:
        await in_gallery(gallery.put_vqa, cache.new, mllm.model_key)
    if outcome.anchor is None:
        return ThiSearchResult(base_hits[:top_k], outcome, candidates, True)

    refined_vector = (await encode_texts([outcome.refined_query]))[0]
    with stage("gallery_search"):
        refined_hits: list[GalleryHit] = await in_gallery(
            gallery.search, refined_vector, pool_n, where
        )
    by_id = {h.image_id: h for h in [*refined_hits, *base_hits]}
    anchor_id = ids[outcome.anchor]
    a = confirmed_anchor
    if a is not None and a.image_id not in by_id and where.matches(a.camera_id, a.captured_at_ms):
        by_id[a.image_id] = GalleryHit(
            a.image_id, a.camera_id, a.captured_at_ms, a.track_id, a.image_uri, 0.0
        )
    pool = list(by_id)
    with stage("fusion"):
        records = await in_gallery(gallery.fetch, pool)
        emb = np.stack([r.embedding for r in records])
        pool = [r.image_id for r in records]
        anchor_index = pool.index(anchor_id) if anchor_id in pool else None
        fused = fuse(emb @ query_vector, emb @ refined_vector, anchor_index, params.lam)
        order = np.argsort(-fused, kind="stable")[:top_k]
    hits = [replace(by_id[pool[i]], score=float(fused[i])) for i in order]
    # Exact when nothing outside both lists could outscore the k-th hit.
    bound = -np.inf
    if len(base_hits) == pool_n and len(refined_hits) == pool_n:
        bound = params.lam * base_hits[-1].score + (1 - params.lam) * refined_hits[-1].score
    exact = len(hits) == 0 or hits[-1].score >= bound
    return ThiSearchResult(hits, outcome, candidates, bool(exact), anchor_id)


__all__ = ["POOL", "GalleryVqaCache", "ThiSearchResult", "thi_search"]
