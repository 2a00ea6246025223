"""`icl eval --thi` on a small synthetic split with the committed demo models.

Structural checks that hold for any verifier: the engine's anchors equal the replay's
(checked inside evaluate_thi), round 0 is the base ranking, a rank-1-only anchor cannot move
R1, a perfect verifier never lowers R1, and the lazy walk never costs more than the paper's
rounds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from icl.cli import app
from icl.data.readers import read_dataset
from icl.demo import DEMO_WEIGHTS, demo_path
from icl.mllm.contract import VQA_PROMPT, anchor_prompt
from icl.mllm.demo import load_demo_backend
from icl.models.dual_encoder import load_checkpoint
from icl.synthetic.dataset import write_synthetic_dataset
from icl.thi.engine import ThiParams
from icl.thi.offline import ThiData, ThiReplay, engine_cost, lazy_cost_ratio, tune
from icl.thi.report import evaluate_thi


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("thi_data")
    write_synthetic_dataset(out, ids=140, seed=4242, difficulty="medium")
    return out


def test_thi_rows_rounds_and_costs(small: Path) -> None:
    model = load_checkpoint(demo_path(DEMO_WEIGHTS))
    result = evaluate_thi(model, read_dataset(small), load_demo_backend(), base=ThiParams())
    base, tuned, walk, rank1, perfect = result["rows"]
    assert base["anchor_rate"] == 0.0
    for row in (tuned, walk, rank1, perfect):
        assert len(row["rounds"]) == 6
        assert row["rounds"][0] == base["metrics"]
    assert rank1["metrics"]["r1"] == base["metrics"]["r1"]
    assert perfect["metrics"]["r1"] >= base["metrics"]["r1"]
    assert perfect["anchor_precision"] == 1.0
    costs = result["costs"]
    reference = costs["reference (paper's schedule)"]
    for name, cost in costs.items():
        if "batched" not in name:  # the batched check may ask more than the paper's rounds
            assert cost["evaluations_per_query"] <= reference["evaluations_per_query"], name
    assert result["paper_schedule_evaluations_per_query"] == reference["evaluations_per_query"]
    assert (
        costs["lean, lazy walk, VQA at enrolment"]["evaluations_per_query"]
        <= costs["lean, lazy walk (default)"]["evaluations_per_query"]
    )
    assert (
        costs["lean, batched check"]["round_trips_per_query"]
        <= costs["lean, lazy walk (default)"]["round_trips_per_query"]
    )
    assert 0.0 <= result["verifier_accuracy_top_k"] <= 1.0
    assert result["fits_caption_other_identity_share"] is not None


def test_eval_thi_command_writes_json(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "thi.json"
    args = ["eval", "--data", str(small), "--checkpoint", str(demo_path(DEMO_WEIGHTS)), "--thi"]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "THI on test" in result.output and "MLLM cost per query" in result.output
    payload = json.loads(out.read_text())
    assert payload["thi"]["tuned_on"] == "val" and payload["thi"]["split"] == "test"
    names = [row["name"] for row in payload["thi"]["rows"]]
    assert names[0] == "base (THI off)" and names[-1] == "THI, perfect verifier"
    bad = CliRunner().invoke(app, [*args, "--split", "val"])
    assert bad.exit_code == 2 and "tunes on val" in bad.output


def test_eval_thi_with_fixed_xi_and_threshold_does_not_tune(tmp_path: Path) -> None:
    """Comparing two encoders under one THI setting: --xi/--yes-threshold skip the tuning."""
    data = tmp_path / "data"
    write_synthetic_dataset(data, ids=30, seed=4242, difficulty="medium")
    out = tmp_path / "thi.json"
    args = ["eval", "--data", str(data), "--checkpoint", str(demo_path(DEMO_WEIGHTS)), "--thi"]
    fixed = ["--xi", "0.45", "--yes-threshold", "0.7"]
    result = CliRunner().invoke(app, [*args, *fixed, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "fixed by --xi/--yes-threshold" in " ".join(result.output.split())
    thi = json.loads(out.read_text())["thi"]
    assert thi["tuned_on"] == "(fixed, not tuned)"
    assert thi["params"]["xi"] == 0.45 and thi["params"]["yes_threshold"] == 0.7
    assert thi["rows"][1]["name"] == "THI, xi 0.45, Yes > 0.7"
    half = CliRunner().invoke(app, [*args, "--xi", "0.45"])
    assert half.exit_code == 2 and "go together" in half.output


class ScriptedBackend:
    """P(Yes) from a table per (query, gallery image): the counts below need chosen answers,
    which no trained model gives on demand (the demo model runs in the tests above)."""

    model_key = "scripted@1"
    can_generate = False

    def __init__(self, p_yes: dict[tuple[str, int], float]) -> None:
        self.p_yes = p_yes

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        return [self.p_yes[(p, int(im[0, 0, 0]))] for im, p in zip(images, prompts, strict=True)]

    def generate(self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256) -> str:
        assert prompt == VQA_PROMPT and len(images) == 1
        return f"1. The person is person {int(images[0][0, 0, 0])}."


def _tiny_split(yes: list[list[bool]]) -> tuple[ThiData, ScriptedBackend]:
    """len(yes) queries over a gallery of len(yes[0]) images, base scores all below 0.5."""
    queries, gallery = len(yes), len(yes[0])
    rng = np.random.default_rng(0)
    sims = np.sort(rng.uniform(0.1, 0.4, (queries, gallery)), axis=1)[:, ::-1].copy()
    texts = [f"query {q}" for q in range(queries)]
    table = {
        (anchor_prompt(texts[q]), g): 0.9 if yes[q][g] else 0.1
        for q in range(queries)
        for g in range(gallery)
    }
    emb = rng.normal(size=(gallery, 8))

    def encode(batch: Sequence[str]) -> np.ndarray:
        return np.stack([np.random.default_rng(len(t)).normal(size=8) for t in batch])

    data = ThiData(
        sims=sims,
        query_texts=texts,
        query_ids=np.arange(queries),
        gallery_ids=np.arange(gallery),
        gallery_images=[np.full((2, 2, 3), g, np.uint8) for g in range(gallery)],
        gallery_embeddings=emb,
        encode_texts=encode,
    )
    return data, ScriptedBackend(table)


@pytest.mark.unit
def test_cost_ratio_and_paper_count_with_a_gallery_smaller_than_k() -> None:
    # Rank order = gallery order (sims sorted descending). xi = inf: every query walks.
    yes = [
        [False, False, False],  # no Yes: lean asks 3, the paper's rounds ask 3 (not K = 5)
        [False, True, False],  # anchor at rank 2: lean 2 + VQA; paper 2 + VQA
        [True, False, False],  # rank 1 Yes with s1 <= xi: lean 1, paper 3 (no anchor)
    ]
    data, backend = _tiny_split(yes)
    replay = ThiReplay(data, backend, k=5)
    params = ThiParams(candidates=5, xi=float("inf"), yes_threshold=0.5)
    assert replay.n_candidates == 3
    assert replay.reference_evaluations(params).tolist() == [3, 2 + 1, 3]
    lean, paper = (3) + (2 + 1) + (1), 3 + 3 + 3
    assert lazy_cost_ratio(replay, params) == pytest.approx(lean / paper)
    reference = engine_cost(
        replay, backend, ThiParams(candidates=5, xi=float("inf"), schedule="reference")
    )
    assert reference.evaluations_per_query == pytest.approx(paper / 3)
    lazy = engine_cost(replay, backend, params)
    assert lazy.evaluations_per_query == pytest.approx(lean / 3)
    tuned, _ = tune(replay, params, [float("-inf"), 0.5, float("inf")], [0.5, 0.95])
    assert tuned.candidates == 5
