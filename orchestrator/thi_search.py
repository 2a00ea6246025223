"""Search with THI online: the engine of icl.thi over the Gallery, Crops and Mllm ports
(Milvus, the crop store and Triton in the service).

Fusion is linear in the gallery embedding: for every image but the anchor,
lambda * e.q + (1 - lambda) * e.r = e.(lambda * q + (1 - lambda) * r). So the fused top-k over
the whole gallery is one exact search with the fused vector (normalised; its norm scales the
scores back), and the anchor, whose refined score is pinned to 1, is put in at its own fused
score. One gallery call instead of a refined search plus a fetch of both lists' embeddings,
and exact by construction, since the gallery's index is exact (FLAT, docs/gallery.md).
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

# Below this norm the fused direction is numerically meaningless (q and r opposite).
MIN_FUSED_NORM = 1e-6


class GalleryVqaCache:
    """The engine's VQA cache over the gallery's cached-answers field (per image, per model).

    The engine is synchronous about the cache: the candidates' answers come with the base
    ranking before it runs, new ones are written back after."""

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
    exact: bool  # the top-k is the full-gallery fusion (the gallery searches exactly)
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
    with stage("gallery_search"):
        # The candidates' cached VQA answers come with the base ranking (one gallery call).
        base_hits: list[GalleryHit] = await in_gallery(
            gallery.search, query_vector, max(top_k, params.candidates), where, mllm.model_key
        )
    if on_base is not None:
        on_base(base_hits)
    candidates = base_hits[: params.candidates]
    if not candidates:
        return ThiSearchResult([], ThiOutcome(fallback_reason=NO_ANCHOR_NO_CANDIDATES), [], True)
    ids = [h.image_id for h in candidates]
    scores = [h.score for h in candidates]
    anchor_at: int | None = None
    cached = {h.image_id: list(h.vqa) for h in candidates if h.vqa is not None}
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

    async def cache_answers() -> None:
        if cache.new:
            await in_gallery(gallery.put_vqa, cache.new, mllm.model_key)

    if outcome.anchor is None:
        await cache_answers()
        return ThiSearchResult(base_hits[:top_k], outcome, candidates, True)

    # The new answers are cached while the refined query is encoded (both need only them).
    refined, _ = await asyncio.gather(encode_texts([outcome.refined_query]), cache_answers())
    refined_vector = np.asarray(refined[0], dtype=np.float64)
    anchor_id = ids[outcome.anchor]
    # The anchor's fused score, by the method's rule (its refined score pinned to 1).
    anchor_score = float(fuse(np.array([scores[outcome.anchor]]), np.zeros(1), 0, params.lam)[0])
    anchor_hit = next((h for h in candidates if h.image_id == anchor_id), None)
    a = confirmed_anchor
    if a is not None:
        anchor_hit = None
        if where.matches(a.camera_id, a.captured_at_ms):  # outside the filter: not returned
            anchor_hit = GalleryHit(
                a.image_id, a.camera_id, a.captured_at_ms, a.track_id, a.image_uri, 0.0
            )
    with stage("fusion"):
        query = np.asarray(query_vector, dtype=np.float64)
        fused_vector = params.lam * query + (1.0 - params.lam) * refined_vector
        norm = float(np.linalg.norm(fused_vector))
        # Below MIN_FUSED_NORM every non-anchor image scores ~0: keep the base order.
        direction, norm = (fused_vector / norm, norm) if norm >= MIN_FUSED_NORM else (query, 0.0)
        # One more than asked: the anchor may be among them and is put in at its own score.
        found: list[GalleryHit] = await in_gallery(
            gallery.search, direction.astype(np.float32), top_k + 1, where
        )
        fused = [replace(h, score=norm * h.score) for h in found if h.image_id != anchor_id]
        if anchor_hit is not None:
            fused.append(replace(anchor_hit, score=anchor_score))
        fused.sort(key=lambda h: -h.score)  # stable: the gallery's order among equal scores
    return ThiSearchResult(fused[:top_k], outcome, candidates, True, anchor_id)


__all__ = ["MIN_FUSED_NORM", "GalleryVqaCache", "ThiSearchResult", "thi_search"]
