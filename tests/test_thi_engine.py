"""THI's rules and schedules, with a scripted MLLM (no model can run the paper's 7B VLM here).

The scripted MLLM answers from a table keyed by (query, image), deterministically, like a
VLM at temperature ~0; that is exactly the property the lean schedule relies on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from icl.mllm.contract import VQA_PROMPT, anchor_prompt, parse_answers
from icl.thi.engine import (
    MLLM_FAILED,
    NO_ANCHOR_NO_CANDIDATES,
    NO_ANCHOR_NO_YES,
    NO_ANCHOR_RANK1_NO,
    NO_ANCHOR_RANK1_YES,
    DictVqaCache,
    ThiParams,
    anchor_rule,
    fuse,
    reference_evaluations,
    run_thi,
)

pytestmark = pytest.mark.unit  # pure and fast: no server


class ScriptedMllm:
    """P(Yes) from a table; VQA answers derived from the image id; aggregation joins."""

    def __init__(self, p_yes: dict[tuple[str, int], float], can_generate: bool = True) -> None:
        self.p_yes = p_yes
        self.can_generate = can_generate
        self.model_key = "scripted@1"
        self.scored = 0
        self.generated = 0
        self.calls = 0

    async def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        self.calls += 1
        self.scored += len(images)
        return [self.p_yes[(p, int(img[0, 0, 0]))] for img, p in zip(images, prompts, strict=True)]

    async def generate(self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256):
        self.calls += 1
        self.generated += 1
        if images:
            assert prompt == VQA_PROMPT
            i = int(images[0][0, 0, 0])
            return f"1. The person is person {i}.\n2. Hair {i % 3}.\n"
        return "AGG: " + " | ".join(line for line in prompt.splitlines() if line.startswith("- "))


async def load(ids: Sequence[str]) -> list[np.ndarray]:
    return [np.full((2, 2, 3), int(i), dtype=np.uint8) for i in ids]


@pytest.mark.parametrize(
    ("s1", "yes", "want"),
    [
        (0.9, [True, True, True], 0),
        (0.9, [False, True, True], None),
        (0.3, [True, True, False], None),
        (0.3, [False, False, True], 2),
        (0.3, [False, True, True], 1),
        (0.3, [False, False, False], None),
        (0.5, [True, False], None),  # s1 == xi walks: rank 1 Yes stops with no anchor
        (0.5, [False, True], 1),
    ],
)
def test_acceptance_rule(s1: float, yes: list[bool], want: int | None) -> None:
    assert anchor_rule(s1, 0.5, yes) == want


def _expected_lazy_evaluations(s1: float, xi: float, yes: list[bool]) -> int:
    if s1 > xi:
        return 1
    for i, y in enumerate(yes):
        if y:
            return i + 1
    return len(yes)


def _expected_reference_evaluations(s1: float, xi: float, yes: list[bool]) -> int:
    """The paper's rounds, counted from the method's text: round r asks every query without
    an anchor about its rank-r candidate; the query leaves with an anchor (then VQA and
    aggregation: 2 more calls) when rank 1 says Yes with s1 > xi, or when a later rank is
    the first Yes after rank 1 said No with s1 <= xi; otherwise it is asked in every round."""
    asked = 0
    for r, said_yes in enumerate(yes):
        asked += 1
        if r == 0 and said_yes and s1 > xi:
            return asked + 2
        if r > 0 and said_yes and s1 <= xi and not yes[0] and not any(yes[1:r]):
            return asked + 2
    return asked


def test_lean_schedules_equal_reference_on_random_matrices() -> None:
    rng = np.random.default_rng(0)
    k, totals = 5, {"reference": 0, "lazy": 0, "batched": 0}
    trips = {"reference": 0, "lazy": 0, "batched": 0}
    for trial in range(60):
        queries, gallery = 12, 40
        sims = rng.uniform(0.0, 1.0, size=(queries, gallery))
        xi = float(rng.choice([0.3, 0.5, 0.7, float("inf"), float("-inf")]))
        yes_rate = rng.uniform(0.1, 0.9)
        for q in range(queries):
            text = f"query {trial}-{q}"
            table = {
                (
                    f'Can this text accurately describe the image? Text: {text}. Answer "Yes" or '
                    f'"No".',
                    g,
                ): float(
                    rng.uniform(0.5, 1.0) if rng.random() < yes_rate else rng.uniform(0.0, 0.5)
                )
                for g in range(gallery)
            }
            order = np.argsort(-sims[q], kind="stable")[:k]
            ids, scores = [str(i) for i in order], sims[q, order]
            results = {}
            for name, params in {
                "reference": ThiParams(xi=xi, schedule="reference"),
                "lazy": ThiParams(xi=xi, schedule="lean", walk="lazy"),
                "batched": ThiParams(xi=xi, schedule="lean", walk="batched"),
            }.items():
                mllm = ScriptedMllm(table)
                out = asyncio.run(run_thi(text, ids, scores, load, mllm, params, DictVqaCache()))
                results[name] = out
                totals[name] += out.evaluations
                trips[name] += out.round_trips
                assert out.evaluations == mllm.scored + mllm.generated
                assert out.round_trips == mllm.calls
                # A reason exactly when the base ranking is kept; never a failure here.
                assert (out.fallback_reason == "") == (out.anchor is not None)
                assert not out.failed
            ref = results["reference"]
            yes = [table[(anchor_prompt(text), int(g))] > 0.5 for g in order]
            assert ref.anchor == anchor_rule(float(scores[0]), xi, yes)
            expected = _expected_reference_evaluations(float(scores[0]), xi, yes)
            assert ref.evaluations == expected
            assert reference_evaluations(ThiParams(), ref.anchor, True, len(ids)) == expected
            lazy = results["lazy"]
            assert lazy.evaluations <= ref.evaluations
            assert lazy.evaluations - (2 if lazy.anchor is not None else 0) == (
                _expected_lazy_evaluations(float(scores[0]), xi, yes)
            )
            for name in ("lazy", "batched"):
                got = results[name]
                assert got.anchor == ref.anchor
                assert got.answers == ref.answers
                assert got.refined_query == ref.refined_query
                for p, prob in got.p_yes.items():
                    assert prob == table[(anchor_prompt(text), int(ids[p]))]
                    if p in ref.p_yes:
                        assert prob == ref.p_yes[p]
                if ref.anchor is not None:
                    refined = rng.uniform(0, 1, gallery)
                    a = fuse(sims[q], refined, int(ids[ref.anchor]), 0.8)
                    b = fuse(sims[q], refined, int(ids[got.anchor]), 0.8)
                    assert np.array_equal(
                        np.argsort(-a, kind="stable"), np.argsort(-b, kind="stable")
                    )
    # The lazy walk never asks more than the paper's rounds; the batched check may (it asks
    # every candidate the rule may need at once, where the rounds stop at the anchor).
    assert totals["lazy"] < totals["reference"]
    assert trips["batched"] <= trips["lazy"]


@pytest.mark.parametrize(
    ("xi", "answers", "want"),
    [
        (float("inf"), [0.1, 0.1, 0.1], 3),  # no Yes: asked in all 3 rounds, not K = 5
        (float("inf"), [0.9, 0.1, 0.1], 3),  # rank 1 Yes with s1 <= xi: no anchor, still asked
        (float("-inf"), [0.1, 0.9, 0.9], 3),  # rank 1 No with s1 > xi: no anchor, still asked
        (float("inf"), [0.1, 0.9, 0.1], 2 + 2),  # anchor at rank 2, then VQA and aggregation
        (float("-inf"), [0.9, 0.1, 0.1], 1 + 2),  # anchor at rank 1
    ],
)
def test_reference_schedule_with_a_gallery_smaller_than_k(
    xi: float, answers: list[float], want: int
) -> None:
    text = "a man in a red coat"
    mllm = ScriptedMllm(_table(text, answers))
    params = ThiParams(candidates=5, xi=xi, schedule="reference")
    out = asyncio.run(
        run_thi(text, ["0", "1", "2"], [0.5, 0.4, 0.3], load, mllm, params, DictVqaCache())
    )
    assert out.evaluations == want == mllm.scored + mllm.generated
    assert reference_evaluations(params, out.anchor, True, 3) == want


def test_vqa_answers_are_cached_per_image_and_model() -> None:
    table = {}
    for text in ("a", "b"):
        prompt = f'Can this text accurately describe the image? Text: {text}. Answer "Yes" or "No".'
        table |= {(prompt, 7): 0.9, (prompt, 8): 0.1}
    cache = DictVqaCache()
    mllm = ScriptedMllm(table)
    params = ThiParams(xi=0.0)  # s1 > xi: rank 1 is checked alone
    first = asyncio.run(run_thi("a", ["7", "8"], [0.5, 0.4], load, mllm, params, cache))
    assert first.anchor == 0 and not first.vqa_cached
    assert first.answers == parse_answers("1. The person is person 7.\n2. Hair 1.\n")
    generated = mllm.generated
    second = asyncio.run(run_thi("b", ["7", "8"], [0.5, 0.4], load, mllm, params, cache))
    assert second.vqa_cached and second.answers == first.answers
    assert mllm.generated == generated + 1  # aggregation only
    other = ScriptedMllm(table)
    other.model_key = "scripted@2"  # another model version never reuses those answers
    third = asyncio.run(run_thi("b", ["7", "8"], [0.5, 0.4], load, other, params, cache))
    assert not third.vqa_cached


def test_backend_without_generation_merges_deterministically() -> None:
    prompt = 'Can this text accurately describe the image? Text: a man. Answer "Yes" or "No".'
    mllm = ScriptedMllm({(prompt, 3): 0.8}, can_generate=False)
    out = asyncio.run(run_thi("a man", ["3"], [0.9], load, mllm, ThiParams(), DictVqaCache()))
    assert out.refined_query == "a man. The person is person 3. Hair 0."
    assert out.evaluations == 2  # one yes/no, one VQA; no aggregation call


def _table(text: str, answers: list[float]) -> dict[tuple[str, int], float]:
    prompt = anchor_prompt(text)
    return {(prompt, g): p for g, p in enumerate(answers)}


@pytest.mark.parametrize("schedule", ["reference", "lazy", "batched"])
@pytest.mark.parametrize(
    ("s1", "xi", "answers", "want"),
    [
        (0.9, 0.5, [0.2, 0.9, 0.9], NO_ANCHOR_RANK1_NO),
        (0.9, float("-inf"), [0.2, 0.9, 0.9], NO_ANCHOR_RANK1_NO),
        (0.4, 0.5, [0.9, 0.9, 0.1], NO_ANCHOR_RANK1_YES),
        (0.5, 0.5, [0.9, 0.1, 0.1], NO_ANCHOR_RANK1_YES),  # s1 == xi walks
        (0.4, 0.5, [0.1, 0.2, 0.3], NO_ANCHOR_NO_YES),
        (0.4, float("inf"), [0.1, 0.2, 0.3], NO_ANCHOR_NO_YES),
        (0.9, 0.5, [0.9, 0.1, 0.1], ""),  # anchor at rank 1
        (0.4, 0.5, [0.1, 0.1, 0.9], ""),  # anchor at rank 3
    ],
)
def test_the_trace_says_why_the_base_ranking_is_kept(
    schedule: str, s1: float, xi: float, answers: list[float], want: str
) -> None:
    text = "a man in a red coat"
    if schedule == "reference":
        params = ThiParams(xi=xi, schedule="reference")
    else:
        params = ThiParams(xi=xi, schedule="lean", walk=schedule)  # type: ignore[arg-type]
    mllm = ScriptedMllm(_table(text, answers))
    scores = [s1, s1 - 0.01, s1 - 0.02]
    out = asyncio.run(run_thi(text, ["0", "1", "2"], scores, load, mllm, params, DictVqaCache()))
    assert out.fallback_reason == want
    assert (out.anchor is None) == bool(want)
    assert not out.failed


def test_no_candidates_is_a_no_anchor_reason() -> None:
    out = asyncio.run(run_thi("a man", [], [], load, ScriptedMllm({}), ThiParams(), None))
    assert out.anchor is None and out.fallback_reason == NO_ANCHOR_NO_CANDIDATES
    assert not out.failed and out.evaluations == 0


class FailingMllm(ScriptedMllm):
    async def score(self, images, prompts):
        raise TimeoutError("mllm deadline exceeded")


def test_mllm_failure_degrades_to_base_ranking() -> None:
    out = asyncio.run(
        run_thi("a man", ["1", "2"], [0.9, 0.8], load, FailingMllm({}), ThiParams(), None)
    )
    assert out.anchor is None and "deadline" in out.fallback_reason
    assert out.fallback_reason.startswith(MLLM_FAILED + ": TimeoutError") and out.failed


def test_fuse_pins_the_anchor() -> None:
    base = np.array([0.5, 0.45, 0.1])
    refined = np.array([0.2, 0.3, 0.9])
    fused = fuse(base, refined, anchor_index=1, lam=0.8)
    np.testing.assert_allclose(fused, [0.44, 0.56, 0.26])
    assert int(np.argmax(fused)) == 1


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="candidates"):
        ThiParams(candidates=0)
    with pytest.raises(ValueError, match="lambda"):
        ThiParams(lam=1.5)
