"""THI: test-time human-centred interaction (docs/method.md section 4), as pure logic.

The engine sees a query, its top-K candidates of the base ranking (ids and base scores), a
way to load candidate crops, an MLLM behind `icl.mllm.contract.Mllm`, and a VQA cache. It
returns the anchor (if any), every P(Yes) it asked for, the anchor's VQA answers and the
refined query, with counts of MLLM evaluations (image-prompt pairs, and text-only calls) and
round trips. Re-encoding the refined query and fusing the scores belong to the caller
(`fuse`), because only the caller knows its gallery (a Milvus collection online, a full
similarity matrix offline); both use this module, so both rank the same way.

Acceptance rule (as the public code behaves), with s1 the base score of rank 1:
- s1 > xi: rank 1 is the anchor if it says Yes; otherwise there is no anchor;
- s1 <= xi: walk ranks 1..K; if rank 1 says Yes, stop with no anchor (keep the base
  ranking); otherwise the first later rank that says Yes is the anchor.

Schedules: `reference` asks as the paper's code does (round r asks each query still without
an anchor about its rank-r candidate, one call each; VQA and aggregation for every anchor);
`lean` asks only what the rule needs, either lazily (one candidate per round trip, stopping
at the first decisive answer: fewest evaluations, the default) or as one batched call over
the candidates the rule may need (fewest round trips); VQA answers come from the cache when
present. Both schedules give identical anchors,
answers and refined queries for a deterministic MLLM.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from icl.mllm.contract import (
    VQA_PROMPT,
    Mllm,
    aggregate_prompt,
    anchor_prompt,
    merge_answers,
    parse_answers,
)

DEFAULT_CANDIDATES = 5
DEFAULT_XI = 0.50  # 0.55 for ICFG-PEDES in the paper
DEFAULT_LAMBDA = 0.8

# Why THI kept the base ranking (`ThiOutcome.fallback_reason`, the trace's fallback_reason):
# short, stable strings that clients may match. "no anchor..." reasons are THI working as
# designed; the MLLM reasons are failures (details follow after ": ").
NO_ANCHOR = "no anchor"
NO_ANCHOR_RANK1_NO = "no anchor: rank 1 said No with s1 > xi"
NO_ANCHOR_RANK1_YES = "no anchor: rank 1 said Yes with s1 <= xi"
NO_ANCHOR_NO_YES = "no anchor: no candidate said Yes"
NO_ANCHOR_NO_CANDIDATES = "no anchor: no candidates"
MLLM_FAILED = "MLLM failed"
MLLM_TIMEOUT = "MLLM did not answer in time"


@dataclass(frozen=True)
class ThiParams:
    candidates: int = DEFAULT_CANDIDATES
    xi: float = DEFAULT_XI
    lam: float = DEFAULT_LAMBDA
    yes_threshold: float = 0.5  # Yes iff P(Yes) > threshold (0.5: the Yes logit beats No)
    schedule: Literal["lean", "reference"] = "lean"
    walk: Literal["lazy", "batched"] = "lazy"

    def __post_init__(self) -> None:
        if not 1 <= self.candidates <= 50:
            raise ValueError(f"THI candidates must be 1..50, got {self.candidates}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"THI lambda must be in [0, 1], got {self.lam}")
        if not np.isfinite(self.xi) and self.xi not in (float("inf"), float("-inf")):
            raise ValueError("THI xi must be a number")


@dataclass(frozen=True)
class ThiStep:
    """One step of THI as it happens (for streaming to an operator): `candidate` (position,
    p_yes), `anchor` (position, confirmed), `vqa` (answers, cached), `refined` (text)."""

    kind: Literal["candidate", "anchor", "vqa", "refined"]
    image_id: str = ""  # the candidate's or the anchor's
    position: int | None = None
    p_yes: float = 0.0
    confirmed: bool = False
    answers: tuple[str, ...] = ()
    cached: bool = False
    text: str = ""


# Called synchronously with each step; it must not block (the service puts it on a queue).
OnStep = Callable[[ThiStep], None]


def _no_steps(step: ThiStep) -> None:
    return None


class VqaCache(Protocol):
    """Answers per gallery image, keyed by the MLLM's model key (they do not see the query)."""

    def get(self, image_id: str, model_key: str) -> list[str] | None: ...

    def put(self, image_id: str, model_key: str, answers: list[str]) -> None: ...


class DictVqaCache:
    """In-memory cache (offline evaluation; tests)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], list[str]] = {}

    def get(self, image_id: str, model_key: str) -> list[str] | None:
        return self.data.get((image_id, model_key))

    def put(self, image_id: str, model_key: str, answers: list[str]) -> None:
        self.data[(image_id, model_key)] = list(answers)


@dataclass
class ThiOutcome:
    """What THI decided for one query. Positions index the candidate list (0 = rank 1)."""

    anchor: int | None = None
    p_yes: dict[int, float] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    refined_query: str = ""
    evaluations: int = 0  # image-prompt pairs scored + generate calls
    round_trips: int = 0
    vqa_cached: bool = False
    fallback_reason: str = ""  # why the base ranking is kept; empty when there is an anchor
    anchor_confirmed: bool = False  # the anchor was given by an operator, not found by the MLLM

    @property
    def failed(self) -> bool:
        """The MLLM failed or timed out (as opposed to THI finding no anchor)."""
        return is_failure(self.fallback_reason)


def is_failure(reason: str) -> bool:
    """A fallback reason that is an MLLM failure, not a "no anchor" decision."""
    return bool(reason) and not reason.startswith(NO_ANCHOR)


def anchor_rule(s1: float, xi: float, yes: Sequence[bool]) -> int | None:
    """The acceptance rule over yes/no answers of ranks 1..K (yes[0] is rank 1)."""
    if not yes:
        return None
    if s1 > xi:
        return 0 if yes[0] else None
    if yes[0]:
        return None
    for position in range(1, len(yes)):
        if yes[position]:
            return position
    return None


def no_anchor_reason(s1: float, xi: float, yes: Sequence[bool]) -> str:
    """Why the rule found no anchor, from the answers asked (yes[0] is rank 1)."""
    if not yes:
        return NO_ANCHOR_NO_CANDIDATES
    if s1 > xi:
        return NO_ANCHOR_RANK1_NO
    return NO_ANCHOR_RANK1_YES if yes[0] else NO_ANCHOR_NO_YES


def ranks_the_rule_may_need(s1: float, xi: float, k: int) -> list[int]:
    return [0] if s1 > xi else list(range(k))


ImageLoader = Callable[[Sequence[str]], Awaitable[list[np.ndarray]]]


async def locate_anchor(
    query: str,
    candidate_ids: Sequence[str],
    base_scores: Sequence[float],
    load_images: ImageLoader,
    mllm: Mllm,
    params: ThiParams,
    outcome: ThiOutcome,
    on_step: OnStep = _no_steps,
) -> int | None:
    k = min(params.candidates, len(candidate_ids))
    if k == 0:
        return None
    s1 = float(base_scores[0])
    prompt = anchor_prompt(query)

    async def ask(positions: list[int]) -> None:
        images = await load_images([candidate_ids[p] for p in positions])
        probs = await mllm.score(images, [prompt] * len(positions))
        outcome.evaluations += len(positions)
        outcome.round_trips += 1
        for p, prob in zip(positions, probs, strict=True):
            outcome.p_yes[p] = float(prob)
            on_step(ThiStep("candidate", candidate_ids[p], p, p_yes=float(prob)))

    def yes(p: int) -> bool:
        return outcome.p_yes[p] > params.yes_threshold

    if params.schedule == "reference":
        # The paper's code: round r asks every query still without an anchor about its
        # rank-r candidate, one call each; a query leaves once it has an anchor. A query
        # without one (rank 1 said No with s1 > xi, or Yes with s1 <= xi) is asked to rank K.
        for p in range(k):
            await ask([p])
            anchor = anchor_rule(s1, params.xi, [yes(q) for q in range(p + 1)])
            if anchor is not None:
                return anchor
        return None
    needed = ranks_the_rule_may_need(s1, params.xi, k)
    if params.walk == "batched":
        await ask(needed)
        return anchor_rule(s1, params.xi, [yes(p) for p in needed])
    asked = 0
    for p in needed:  # the first Yes decides: rank 1 -> no anchor (or the anchor if s1 > xi)
        await ask([p])
        asked += 1
        if yes(p):
            break
    return anchor_rule(s1, params.xi, [yes(q) for q in range(asked)])


async def describe(image: np.ndarray, mllm: Mllm) -> list[str]:
    """The anchor's answers to the human-centred questions (method step 3; the query is not
    shown, so they can be cached per image): one MLLM call, online and offline alike."""
    return parse_answers(await mllm.generate([image], VQA_PROMPT))


async def refine_query(query: str, answers: Sequence[str], mllm: Mllm) -> tuple[str, int]:
    """The refined query from the anchor's VQA answers (method step 4), the one refinement step
    of online search and offline evaluation. An MLLM that generates text is asked the
    aggregation prompt (one text-only call); a backend without free-text generation (the demo
    MLLM), or an empty aggregation, gets the deterministic merge of query and answers.
    Returns the refined query and the MLLM calls made (0 or 1)."""
    if not mllm.can_generate:
        return merge_answers(query, answers), 0
    refined = (await mllm.generate([], aggregate_prompt(query, answers))).strip()
    return refined or merge_answers(query, answers), 1


async def run_thi(
    query: str,
    candidate_ids: Sequence[str],
    base_scores: Sequence[float],
    load_images: ImageLoader,
    mllm: Mllm,
    params: ThiParams,
    cache: VqaCache | None = None,
    on_step: OnStep = _no_steps,
    confirmed_anchor: int | None = None,
) -> ThiOutcome:
    """Anchor, VQA of the anchor, aggregation. Any MLLM failure returns the base ranking's
    outcome (no anchor) with the reason, never an exception.

    `confirmed_anchor` (a position in `candidate_ids`): an operator has confirmed that image
    as the target, so the yes/no walk is skipped and VQA and refinement start from it.
    `on_step` sees each step as it happens (SearchStream)."""
    if confirmed_anchor is not None and not 0 <= confirmed_anchor < len(candidate_ids):
        raise ValueError(f"confirmed anchor {confirmed_anchor} is not a candidate")
    outcome = ThiOutcome()
    try:
        if confirmed_anchor is not None:
            outcome.anchor, outcome.anchor_confirmed = confirmed_anchor, True
        else:
            outcome.anchor = await locate_anchor(
                query, candidate_ids, base_scores, load_images, mllm, params, outcome, on_step
            )
        if outcome.anchor is None:
            asked = [outcome.p_yes[p] > params.yes_threshold for p in sorted(outcome.p_yes)]
            s1 = float(base_scores[0]) if len(base_scores) else 0.0
            outcome.fallback_reason = no_anchor_reason(s1, params.xi, asked)
            return outcome
        anchor_id = candidate_ids[outcome.anchor]
        on_step(ThiStep("anchor", anchor_id, outcome.anchor, confirmed=outcome.anchor_confirmed))
        cached = None
        if params.schedule == "lean" and cache is not None:
            cached = cache.get(anchor_id, mllm.model_key)
        if cached is not None:
            outcome.answers, outcome.vqa_cached = list(cached), True
        else:
            (image,) = await load_images([anchor_id])
            outcome.answers = await describe(image, mllm)
            outcome.evaluations += 1
            outcome.round_trips += 1
            if cache is not None:
                cache.put(anchor_id, mllm.model_key, outcome.answers)
        on_step(
            ThiStep("vqa", anchor_id, answers=tuple(outcome.answers), cached=outcome.vqa_cached)
        )
        outcome.refined_query, calls = await refine_query(query, outcome.answers, mllm)
        outcome.evaluations += calls
        outcome.round_trips += calls
        on_step(ThiStep("refined", text=outcome.refined_query))
    except Exception as exc:  # any backend failure degrades to the base ranking
        detail = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
        return ThiOutcome(
            p_yes=outcome.p_yes,
            evaluations=outcome.evaluations,
            round_trips=outcome.round_trips,
            fallback_reason=f"{MLLM_FAILED}: {detail}",
        )
    return outcome


def fuse(
    base_scores: np.ndarray, refined_scores: np.ndarray, anchor_index: int | None, lam: float
) -> np.ndarray:
    """lambda * S_base + (1 - lambda) * S_ref with S_ref[anchor] pinned to 1 (no pin when the
    anchor is not among the scored images: a confirmed anchor outside the search's filter)."""
    refined = np.array(refined_scores, dtype=np.float64, copy=True)
    if anchor_index is not None:
        refined[anchor_index] = 1.0
    return lam * np.asarray(base_scores, dtype=np.float64) + (1.0 - lam) * refined


def reference_evaluations(
    params: ThiParams, anchor: int | None, can_generate: bool, n_candidates: int
) -> int:
    """MLLM evaluations of the paper's schedule for one query with `n_candidates` candidates
    (min(K, gallery size)): one yes/no per round until the anchor (position `anchor`, 0 =
    rank 1) is found, or all K rounds without one; then VQA (+ aggregation when the MLLM
    generates text)."""
    k = min(params.candidates, n_candidates)
    if anchor is None:
        return k
    return anchor + 1 + 1 + int(can_generate)


__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_LAMBDA",
    "DEFAULT_XI",
    "MLLM_FAILED",
    "MLLM_TIMEOUT",
    "NO_ANCHOR",
    "NO_ANCHOR_NO_CANDIDATES",
    "NO_ANCHOR_NO_YES",
    "NO_ANCHOR_RANK1_NO",
    "NO_ANCHOR_RANK1_YES",
    "DictVqaCache",
    "OnStep",
    "ThiOutcome",
    "ThiParams",
    "ThiStep",
    "VqaCache",
    "anchor_rule",
    "describe",
    "fuse",
    "is_failure",
    "locate_anchor",
    "no_anchor_reason",
    "ranks_the_rule_may_need",
    "reference_evaluations",
    "refine_query",
    "run_thi",
]
