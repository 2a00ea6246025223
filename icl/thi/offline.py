"""THI over a full similarity matrix (`icl eval --thi`): per-round metrics, costs, diagnostics.

Every query's top-K candidates are scored once (P(Yes) per candidate; the MLLM is
deterministic), so any (xi, threshold) setting can be replayed without asking again: that is
how xi and the Yes threshold are tuned on val. The reported configuration is then run through
the engine itself (`icl.thi.engine.run_thi`, lean and reference schedules) to count MLLM
evaluations and round trips, and its anchors are checked against the replay.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from icl.metrics import RetrievalMetrics, retrieval_metrics
from icl.mllm.contract import MllmBackend, anchor_prompt
from icl.thi.engine import (
    DictVqaCache,
    ThiParams,
    anchor_rule,
    describe,
    fuse,
    reference_evaluations,
    refine_query,
    run_thi,
)

TextEncoder = Callable[[Sequence[str]], np.ndarray]


@dataclass
class ThiData:
    """One split: base scores, queries, gallery images and embeddings."""

    sims: np.ndarray  # [Q, G] base scores (served embeddings' inner products)
    query_texts: Sequence[str]
    query_ids: np.ndarray
    gallery_ids: np.ndarray
    gallery_images: Sequence[np.ndarray]  # what the MLLM sees (crops at their own size)
    gallery_embeddings: np.ndarray  # [G, D]
    encode_texts: TextEncoder
    # Optional analysis: does gallery image g fit query q's caption (every stated attribute
    # true of g)? Used for the "fits the caption but another identity" share.
    fits_caption: Callable[[int, int], bool] | None = None


class DirectMllm:
    """A synchronous backend behind the async `Mllm` contract, called inline (offline
    evaluation is sequential: no thread hop per call, unlike `InProcessMllm`)."""

    def __init__(self, backend: MllmBackend) -> None:
        self.backend = backend
        self.model_key = backend.model_key
        self.can_generate = backend.can_generate

    async def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        return self.backend.score(images, prompts)

    async def generate(
        self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256
    ) -> str:
        return self.backend.generate(images, prompt, max_tokens)


@dataclass
class Row:
    name: str
    params: ThiParams
    metrics: RetrievalMetrics
    anchor_rate: float
    anchor_precision: float
    rounds: list[RetrievalMetrics] = field(default_factory=list)


class ThiReplay:
    """Scores top-K candidates once, then replays the rule for any parameters."""

    def __init__(self, data: ThiData, backend: MllmBackend, k: int, batch: int = 256) -> None:
        self.data, self.backend, self.k = data, backend, k
        self.order = np.argsort(-data.sims, axis=1, kind="stable")[:, :k]
        self.top = np.take_along_axis(data.sims, self.order, axis=1)
        self.p_yes = self._score_all(batch)
        self._answers: dict[int, list[str]] = {}
        self._refined: dict[tuple[int, int], np.ndarray] = {}

    def _score_all(self, batch: int) -> np.ndarray:
        q, k = self.order.shape
        pairs = [(i, j) for i in range(q) for j in range(k)]
        out = np.zeros((q, k))
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            images = [self.data.gallery_images[int(self.order[i, j])] for i, j in chunk]
            prompts = [anchor_prompt(self.data.query_texts[i]) for i, _ in chunk]
            for (i, j), p in zip(chunk, self.backend.score(images, prompts), strict=True):
                out[i, j] = p
        return out

    def perfect_p_yes(self) -> np.ndarray:
        """A verifier that knows identities: Yes iff the candidate is the query's person."""
        same = self.data.gallery_ids[self.order] == self.data.query_ids[:, None]
        return same.astype(np.float64)

    @property
    def n_candidates(self) -> int:
        """Candidates per query: K, or fewer when the gallery is smaller."""
        return int(self.order.shape[1])

    def anchor_positions(self, params: ThiParams, p_yes: np.ndarray | None = None) -> np.ndarray:
        """Candidate position (0 = rank 1) of each query's anchor, -1 for none."""
        p = self.p_yes if p_yes is None else p_yes
        k = min(params.candidates, self.n_candidates)
        out = np.full(len(self.order), -1)
        for i in range(len(self.order)):
            pos = anchor_rule(
                float(self.top[i, 0]), params.xi, list(p[i, :k] > params.yes_threshold)
            )
            if pos is not None:
                out[i] = pos
        return out

    def anchors(self, params: ThiParams, p_yes: np.ndarray | None = None) -> np.ndarray:
        """Gallery index of each query's anchor, -1 for none."""
        pos = self.anchor_positions(params, p_yes)
        rows = np.arange(len(pos))
        return np.where(pos >= 0, self.order[rows, np.maximum(pos, 0)], -1)

    def reference_evaluations(self, params: ThiParams) -> np.ndarray:
        """MLLM evaluations of the paper's schedule, per query (`reference_evaluations`)."""
        can_generate = self.backend.can_generate
        return np.array(
            [
                reference_evaluations(
                    params, None if a < 0 else int(a), can_generate, self.n_candidates
                )
                for a in self.anchor_positions(params)
            ]
        )

    def answers(self, g: int) -> list[str]:
        """Gallery image g's VQA answers, by the engine's step (as the service asks them)."""
        if g not in self._answers:
            mllm = DirectMllm(self.backend)
            self._answers[g] = asyncio.run(describe(self.data.gallery_images[g], mllm))
        return self._answers[g]

    def refined_query(self, q: int, g: int) -> str:
        """Query q refined with gallery image g's answers, by the engine's refinement step
        (the aggregation prompt for a generating MLLM, as the service does)."""
        return self.refined_queries([(q, g)])[0]

    def refined_queries(self, pairs: Sequence[tuple[int, int]]) -> list[str]:
        mllm = DirectMllm(self.backend)
        answers = [self.answers(g) for _, g in pairs]  # answers() runs its own event loop

        async def run() -> list[str]:
            return [
                (await refine_query(self.data.query_texts[q], a, mllm))[0]
                for (q, _), a in zip(pairs, answers, strict=True)
            ]

        return asyncio.run(run())

    def fused(self, anchors: np.ndarray, lam: float) -> np.ndarray:
        sims = self.data.sims.astype(np.float64, copy=True)
        todo = [
            (q, int(g))
            for q, g in enumerate(anchors)
            if g >= 0 and (q, int(g)) not in self._refined
        ]
        if todo:
            emb = self.data.encode_texts(self.refined_queries(todo))
            for (q, g), e in zip(todo, emb, strict=True):
                self._refined[(q, g)] = e @ self.data.gallery_embeddings.T
        for q, g in enumerate(anchors):
            if g >= 0:
                sims[q] = fuse(self.data.sims[q], self._refined[(q, int(g))], int(g), lam)
        return sims

    def evaluate(self, name: str, params: ThiParams, p_yes: np.ndarray | None = None) -> Row:
        anchors = self.anchors(params, p_yes)
        metrics = retrieval_metrics(
            self.fused(anchors, params.lam), self.data.query_ids, self.data.gallery_ids
        )
        rounds = [retrieval_metrics(self.data.sims, self.data.query_ids, self.data.gallery_ids)]
        for r in range(1, min(params.candidates, self.k) + 1):
            a = self.anchors(replace(params, candidates=r), p_yes)
            rounds.append(
                retrieval_metrics(
                    self.fused(a, params.lam), self.data.query_ids, self.data.gallery_ids
                )
            )
        has = anchors >= 0
        correct = self.data.gallery_ids[anchors[has]] == self.data.query_ids[has]
        return Row(
            name,
            params,
            metrics,
            anchor_rate=float(has.mean()),
            anchor_precision=float(correct.mean()) if has.any() else math.nan,
            rounds=rounds,
        )

    def fits_other_identity_share(self, k: int) -> float | None:
        """Share of top-K candidates that fit the caption but are another identity."""
        fits = self.data.fits_caption
        if fits is None:
            return None
        hits = total = 0
        for q in range(len(self.order)):
            for g in self.order[q, :k]:
                total += 1
                if self.data.gallery_ids[g] != self.data.query_ids[q] and fits(q, int(g)):
                    hits += 1
        return hits / max(1, total)

    def candidate_accuracy(self, threshold: float, k: int) -> float:
        """Verifier accuracy on the top-K candidates: Yes iff same identity."""
        same = self.data.gallery_ids[self.order[:, :k]] == self.data.query_ids[:, None]
        return float(((self.p_yes[:, :k] > threshold) == same).mean())


@dataclass(frozen=True)
class TuningLimits:
    """What a setting must keep on the tuning split to be eligible (the product's targets)."""

    max_r5_drop: float = 0.5  # R5 points below the base ranking
    max_cost_ratio: float = 0.35  # lean lazy-walk evaluations / the paper's schedule's


def lazy_cost_ratio(replay: ThiReplay, params: ThiParams) -> float:
    """Evaluations of the lean lazy walk (VQA on demand, cached per image) over the paper's
    schedule's, computed from the replay exactly as the engine would count them."""
    k = min(params.candidates, replay.n_candidates)  # a gallery smaller than K has fewer
    walk = 0
    for i in range(len(replay.order)):
        if replay.top[i, 0] > params.xi:
            walk += 1
            continue
        yes = replay.p_yes[i, :k] > params.yes_threshold
        walk += next((j + 1 for j in range(k) if yes[j]), k)
    anchors = replay.anchors(params)
    anchored = anchors >= 0
    vqa = len(set(anchors[anchored].tolist()))
    lean = walk + vqa + int(replay.backend.can_generate) * int(anchored.sum())
    reference = int(replay.reference_evaluations(params).sum())
    return lean / max(1, reference)


def tune(
    replay: ThiReplay,
    base: ThiParams,
    xis: Sequence[float],
    thresholds: Sequence[float],
    limits: TuningLimits | None = None,
) -> tuple[ThiParams, bool]:
    """The (xi, threshold) with the best R1 + mAP among the settings within `limits`
    (ties: fewer anchors); if none is within them, the best overall and False."""
    limits = limits or TuningLimits()
    data = replay.data
    r5_base = retrieval_metrics(data.sims, data.query_ids, data.gallery_ids).r5
    best: dict[bool, tuple[float, ThiParams]] = {}
    for xi in xis:
        for thr in thresholds:
            params = replace(base, xi=xi, yes_threshold=thr)
            anchors = replay.anchors(params)
            m = retrieval_metrics(
                replay.fused(anchors, params.lam), data.query_ids, data.gallery_ids
            )
            key = m.r1 + m.map - 1e-6 * float((anchors >= 0).sum())
            within = (
                r5_base - m.r5 <= limits.max_r5_drop + 1e-9
                and lazy_cost_ratio(replay, params) <= limits.max_cost_ratio
            )
            if within not in best or key > best[within][0]:
                best[within] = (key, params)
    if True in best:
        return best[True][1], True
    return best[False][1], False


@dataclass
class ScheduleCost:
    evaluations_per_query: float
    round_trips_per_query: float
    anchors: np.ndarray


def engine_cost(
    replay: ThiReplay, backend: MllmBackend, params: ThiParams, vqa_at_enrolment: bool = False
) -> ScheduleCost:
    """Run the engine itself over every query; count evaluations and round trips per query.
    With `vqa_at_enrolment` every gallery image's answers are in the cache before the first
    query (as when the orchestrator computes them at enrolment): that cost is not per query."""
    data = replay.data

    async def load(ids: Sequence[str]) -> list[np.ndarray]:
        return [data.gallery_images[int(i)] for i in ids]

    cache = DictVqaCache()
    if vqa_at_enrolment:  # before the event loop: replay.answers runs one of its own
        for g in range(len(data.gallery_images)):
            cache.put(str(g), backend.model_key, replay.answers(g))

    async def run_all() -> ScheduleCost:
        mllm = DirectMllm(backend)
        evaluations = trips = 0
        anchors = np.full(len(replay.order), -1)
        for q in range(len(replay.order)):
            ids = [str(int(g)) for g in replay.order[q]]
            out = await run_thi(
                data.query_texts[q], ids, replay.top[q].tolist(), load, mllm, params, cache
            )
            if out.failed:
                raise RuntimeError(f"query {q}: {out.fallback_reason}")
            evaluations += out.evaluations
            trips += out.round_trips
            if out.anchor is not None:
                anchors[q] = int(ids[out.anchor])
        n = max(1, len(replay.order))
        return ScheduleCost(evaluations / n, trips / n, anchors)

    return asyncio.run(run_all())


__all__ = ["DirectMllm", "Row", "ScheduleCost", "ThiData", "ThiReplay", "engine_cost", "tune"]
