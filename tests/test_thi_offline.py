"""`icl eval --thi` on a small synthetic split with the committed demo models.

Structural checks that hold for any verifier: the engine's anchors equal the replay's
(checked inside evaluate_thi), round 0 is the base ranking, a rank-1-only anchor cannot move
R1, a perfect verifier never lowers R1, and the lean schedules never cost more than the
paper's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icl.cli import app
from icl.data.readers import read_dataset
from icl.demo import DEMO_WEIGHTS, demo_path
from icl.mllm.demo import load_demo_backend
from icl.models.dual_encoder import load_checkpoint
from icl.synthetic.dataset import write_synthetic_dataset
from icl.thi.engine import ThiParams
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
        assert cost["evaluations_per_query"] <= reference["evaluations_per_query"], name
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
