"""RDA: `icl rda` (deterministic and generative paths, resume after SIGKILL, bad input), the
online reorganisation and its weight schedule, and training with RDA on.

Real parts throughout: the committed demo MLLM, the tiny random Qwen2-VL of
tests/test_mllm_qwen2vl.py (real transformers code), real subprocesses killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icl.cli import app
from icl.data.readers import read_dataset
from icl.mllm.demo import load_demo_backend
from icl.mllm.inprocess import InProcessMllm
from icl.rda.deterministic import decompose, paraphrases
from icl.rda.pipeline import GROUPS_FIELD, MANIFEST, RdaInputError, RdaOptions, run_rda
from icl.rda.progress import progress_bar
from icl.rda.reorganise import rda_weight, reorganise
from icl.rda.store import STATE_FILE
from icl.synthetic.dataset import write_synthetic_dataset
from icl.training.config import RdaConfig, RunConfig, TrainConfig, load_run_config
from icl.training.trainer import pair_set, rda_texts, train

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, ids=10, seed=4, difficulty="easy")
    return out


def _rda_cli(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "icl.cli", "rda", "--data", str(data), "--out", str(out), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def _done_rows(out: Path) -> int:
    try:
        with sqlite3.connect(out / STATE_FILE, timeout=1) as db:
            return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.Error:
        return 0


# -- the deterministic path ------------------------------------------------------------------


@pytest.mark.unit
def test_paraphrases_are_distinct_varied_and_order_free() -> None:
    for sentence in (
        "The person is a woman.",
        "The shoes are black.",
        "The person is not wearing a hat.",
        "The person is holding an umbrella.",
        "A man wearing a plain orange overcoat, black jeans and sports shoes.",
    ):
        out = paraphrases(sentence, 5)
        assert out[0] == sentence and len(out) == 5 and len(set(out)) == 5, out
        assert all(p[0].isupper() and p.endswith(".") for p in out), out
        assert paraphrases(sentence, 5) == out  # a function of the sentence alone
    assert "bag" in " ".join(paraphrases("The person is not carrying a bag.", 5)[1:])


@pytest.mark.unit
def test_caption_synonyms_never_change_an_attribute_value() -> None:
    """A synonym swap must keep the label: both words name the same value in the synthetic
    captioner's table (or neither names one). jacket -> coat once broke this."""
    from icl.rda.deterministic import _SYNONYMS
    from icl.synthetic.captions import PHRASES

    def values(term: str) -> set[tuple[str, str]]:
        return {
            (attr, value)
            for attr, table in PHRASES.items()
            for value, phrases in table.items()
            if term.lower() in (p.lower() for p in phrases)
        }

    for word, choices in _SYNONYMS:
        for choice in choices:
            assert values(choice) <= values(word) or not values(choice), (word, choice)
            assert not values(word) or not values(choice) or values(word) == values(choice)
    out = paraphrases("A man in a green jacket, a grey top and black bottoms.", 5)
    for text in out[1:]:
        assert "coat" not in text and "shirt" not in text and "trousers" not in text, text


@pytest.mark.unit
def test_decompose_keeps_the_caption_and_one_group_per_answer() -> None:
    caption = "A woman in a red coat"
    enriched = "A woman in a red coat. The person has long hair. The shoes are black."
    assert decompose(caption, enriched) == [
        "A woman in a red coat.",
        "The person has long hair.",
        "The shoes are black.",
    ]


# -- online reorganisation and its weight ----------------------------------------------------


@pytest.mark.unit
def test_reorganise_uses_every_group_once_in_shuffled_order() -> None:
    groups = [[f"g{i} v{k}." for k in range(3)] for i in range(6)]
    rng = random.Random(0)
    seen_orders, seen_picks = set(), set()
    for _ in range(50):
        text = reorganise(groups, rng)
        parts = [p + "." for p in text.rstrip(".").split(". ")]
        assert sorted(p.split()[0] for p in parts) == [f"g{i}" for i in range(6)]
        assert all(p in groups[int(p[1])] for p in parts)
        seen_orders.add(tuple(p.split()[0] for p in parts))
        seen_picks.update(parts)
    assert len(seen_orders) > 10  # the groups are shuffled
    assert len(seen_picks) == 18  # every paraphrase gets picked
    assert reorganise([], rng) == ""


@pytest.mark.unit
def test_rda_weight_schedule() -> None:
    assert rda_weight(0) == 1.0
    assert rda_weight(10) == pytest.approx(0.7)
    assert rda_weight(29) == pytest.approx(0.13)
    assert rda_weight(30) == pytest.approx(0.1)
    assert rda_weight(100) == 0.1
    assert rda_weight(5, floor=0.5, decay=0.2) == 0.5


@pytest.mark.unit
def test_rda_is_off_by_default_and_switched_on_by_the_config() -> None:
    assert TrainConfig().rda.enabled is False
    assert load_run_config(REPO / "icl/demo/dual_encoder.toml").train.rda.enabled is False
    on = load_run_config(REPO / "icl/demo/dual_encoder_rda.toml")
    off = load_run_config(REPO / "icl/demo/dual_encoder.toml")
    assert on.train.rda.enabled is True
    # Same model, data and budget otherwise.
    assert on.model == off.model
    assert on.train.model_copy(update={"rda": off.train.rda}) == off.train


@pytest.mark.unit
def test_plain_progress_lines_give_rate_and_eta() -> None:
    stream = io.StringIO()  # not a terminal
    with progress_bar("rda", 10, 2, unit="captions", stream=stream, every_s=0) as advance:
        time.sleep(0.01)
        advance(4)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("rda: 2/10 captions")
    assert "rda: 6/10 captions (60.0%)" in lines[1] and "captions/s" in lines[1]
    assert "ETA 0:00:" in lines[1]


# -- icl rda ---------------------------------------------------------------------------------


def test_rda_writes_groups_next_to_each_caption(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "rda"
    result = runner.invoke(app, ["rda", "--data", str(small_data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "deterministic path" in result.output
    raw = json.loads((out / "reid_raw.json").read_text())
    source = json.loads((small_data / "reid_raw.json").read_text())
    assert len(raw) == len(source)
    full = n_groups = 0
    for new, old in zip(raw, source, strict=True):
        assert new["captions"] == old["captions"]
        if old["split"] != "train":
            assert GROUPS_FIELD not in new
            continue
        groups_per_caption = new[GROUPS_FIELD]
        assert len(groups_per_caption) == len(old["captions"])
        for caption, groups in zip(old["captions"], groups_per_caption, strict=True):
            assert groups[0][0] == caption.strip().rstrip(".") + "."
            assert len(groups) >= 2  # the demo MLLM's answers add attribute groups
            assert all(1 <= len(g) <= 5 and len(set(g)) == len(g) for g in groups)
            full += sum(len(g) == 5 for g in groups)
            n_groups += len(groups)
    assert full >= 0.95 * n_groups  # m paraphrases almost always
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["path"] == "deterministic"
    assert manifest["files"]["reid_raw.json"]["path"] == "deterministic"
    assert manifest["mllm_model_key"].startswith("icl-demo-mllm@")
    assert (
        manifest["augmented"]
        == manifest["captions"]
        == sum(len(r["captions"]) for r in source if r["split"] == "train")
    )
    # The output folder is a dataset root: the readers take it, with the groups.
    dataset = read_dataset(out)
    train_records = dataset.split("train")
    assert all(len(r.diversity) == len(r.captions) for r in train_records)
    # Run again: nothing left to do, no MLLM call, same bytes.
    before = (out / "reid_raw.json").read_bytes()
    again = runner.invoke(app, ["rda", "--data", str(small_data), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert "0 MLLM calls" in again.output
    assert (out / "reid_raw.json").read_bytes() == before


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_run_resumes_to_the_uninterrupted_output(
    small_data: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    full = tmp_path / "full"
    proc = _rda_cli(small_data, full, "--batch-size", "4")
    assert proc.wait(timeout=120) == 0, proc.stdout.read() if proc.stdout else ""

    out = tmp_path / "killed"
    # A slow MLLM (0.1 s a call) so the kill lands midway.
    proc = _rda_cli(small_data, out, "--batch-size", "2", "--mllm-option", "delay_s=0.1")
    deadline = time.monotonic() + 60
    while _done_rows(out) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    done = _done_rows(out)
    total = json.loads((full / MANIFEST).read_text())["captions"]
    assert 4 <= done < total, (done, total)
    assert not (out / "reid_raw.json").exists()  # no half-written output
    with sqlite3.connect(out / STATE_FILE) as db:
        answered_before = int(db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    proc = _rda_cli(small_data, out, "--batch-size", "3")  # batch size does not matter
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert f"{done} were done before this run" in output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["resumed_from"] == done
    # Every image is asked once over both runs: what was answered before comes from the cache.
    n_images = len(read_dataset(small_data).split("train"))
    assert answered_before >= 2
    assert manifest["mllm_calls_this_run"] == n_images - answered_before
    assert (out / "reid_raw.json").read_bytes() == (full / "reid_raw.json").read_bytes()


def test_resume_refuses_other_settings(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "rda"
    assert runner.invoke(app, ["rda", "--data", str(small_data), "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["rda", "--data", str(small_data), "--out", str(out), "-m", "3"])
    assert result.exit_code == 2
    assert "paraphrases: 5 -> 3" in result.output


def _bad_copy(small_data: Path, tmp_path: Path) -> Path:
    data = tmp_path / "bad"
    data.mkdir()
    (data / "imgs").symlink_to(small_data / "imgs")
    raw = json.loads((small_data / "reid_raw.json").read_text())
    train_at = [i for i, r in enumerate(raw) if r["split"] == "train"]
    raw[train_at[1]]["file_path"] = "train/nowhere.png"
    raw[train_at[2]]["captions"][1] = "   "
    raw.append(dict(raw[train_at[3]]))
    (data / "reid_raw.json").write_text(json.dumps(raw))
    return data


def test_bad_records_are_named_and_nothing_is_dropped(small_data: Path, tmp_path: Path) -> None:
    data = _bad_copy(small_data, tmp_path)
    raw = json.loads((data / "reid_raw.json").read_text())
    train_at = [i for i, r in enumerate(raw) if r["split"] == "train"]
    out = tmp_path / "rda"
    result = runner.invoke(app, ["rda", "--data", str(data / "reid_raw.json"), "--out", str(out)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "3 problem record(s) (1 duplicate, 1 empty caption, 1 missing image)" in text
    assert f"record {train_at[1]} (train/nowhere.png): image file not found" in text
    assert f"record {train_at[2]} " in text and "captions[1] is empty" in text
    assert f"record {len(raw) - 1} " in text and f"same image as record {train_at[3]}" in text
    assert "--skip-bad" in text
    assert not (out / "reid_raw.json").exists()

    result = runner.invoke(
        app, ["rda", "--data", str(data / "reid_raw.json"), "--out", str(out), "--skip-bad"]
    )
    assert result.exit_code == 0, result.output
    assert "1 missing image" in result.output and "1 duplicate" in result.output
    written = json.loads((out / "reid_raw.json").read_text())
    assert len(written) == len(raw)  # every record is still there
    assert written[train_at[1]][GROUPS_FIELD] == [[], []]
    assert written[train_at[2]][GROUPS_FIELD][1] == [] and written[train_at[2]][GROUPS_FIELD][0]
    assert written[-1][GROUPS_FIELD] == [[], []]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["problems"] == {"missing_image": 1, "empty_caption": 1, "duplicate": 1}
    assert [p["record"] for p in manifest["problem_records"]] == sorted(
        [train_at[1], train_at[2], len(raw) - 1]
    )
    n_train_captions = sum(len(r["captions"]) for r in raw if r["split"] == "train")
    assert manifest["captions"] == manifest["augmented"] == n_train_captions - 2 - 1 - 2


def test_generative_path_with_a_real_qwen2vl(small_data: Path, tmp_path: Path) -> None:
    """The tiny random Qwen2-VL answers noise; the test checks that every step asks it and
    that the output is well formed, not what it says."""
    import torch

    from icl.mllm.qwen2vl import Qwen2VLBackend
    from tests.test_mllm_qwen2vl import build_tiny_qwen2vl

    torch.set_num_threads(2)
    data = tmp_path / "two"
    data.mkdir()
    (data / "imgs").symlink_to(small_data / "imgs")
    raw = json.loads((small_data / "reid_raw.json").read_text())
    two = [r for r in raw if r["split"] == "train"][:2]
    (data / "reid_raw.json").write_text(json.dumps(two))
    backend = Qwen2VLBackend(build_tiny_qwen2vl(tmp_path / "tiny-qwen2vl"), max_new_tokens=24)
    mllm = InProcessMllm(backend)
    out = tmp_path / "rda"
    summary = asyncio.run(run_rda(data, out, mllm, RdaOptions(paraphrases=3, max_tokens=24)))
    assert summary.path == "generative" and summary.augmented == 4
    # VQA once per image and aggregation once per caption; then at least one decomposition and
    # one rewrite (identical prompts are asked once: the random model often repeats itself).
    # The deterministic path would make 2 calls here.
    assert summary.mllm_calls >= 2 + 4 + 1 + 1
    written = json.loads((out / "reid_raw.json").read_text())
    for rec in written:
        assert len(rec[GROUPS_FIELD]) == 2
        for groups in rec[GROUPS_FIELD]:
            assert groups and all(1 <= len(g) <= 3 and all(s.strip() for s in g) for g in groups)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["path"] == "generative" and manifest["mllm_model_key"] == backend.model_key
    assert read_dataset(out).split("train")[0].diversity  # the readers take it

    again = asyncio.run(run_rda(data, out, mllm, RdaOptions(paraphrases=3, max_tokens=24)))
    assert again.mllm_calls == 0 and again.resumed_from == 4


def test_demo_backend_is_asked_through_the_cache(small_data: Path, tmp_path: Path) -> None:
    """Two captions per image: one VQA call per image, the second caption hits the batch."""
    out = tmp_path / "rda"
    mllm = InProcessMllm(load_demo_backend())
    summary = asyncio.run(run_rda(small_data, out, mllm, RdaOptions(batch_size=64)))
    n_images = len(read_dataset(small_data).split("train"))
    assert summary.mllm_calls == n_images
    assert summary.augmented == 2 * n_images


def test_missing_split_is_a_clear_error(small_data: Path, tmp_path: Path) -> None:
    with pytest.raises(RdaInputError, match="no record in split 'nope'"):
        asyncio.run(
            run_rda(
                small_data,
                tmp_path / "o",
                InProcessMllm(load_demo_backend()),
                RdaOptions(split="nope"),
            )
        )


# -- training with RDA -----------------------------------------------------------------------


def test_training_with_rda_on(small_data: Path, tmp_path: Path) -> None:
    from tests.test_training import TINY_MODEL

    out = tmp_path / "rda"
    assert runner.invoke(app, ["rda", "--data", str(small_data), "--out", str(out)]).exit_code == 0
    dataset = read_dataset(out)
    records = dataset.split("train")
    from icl.text.tokenizer import ClipTokenizer

    tok = ClipTokenizer(77)
    pairs = pair_set(records, TINY_MODEL.image_size, tok)
    import torch

    batch = torch.arange(len(pairs.ids))
    texts = rda_texts(pairs, batch, random.Random(0))
    assert texts is not None and all(texts)
    # Each reorganised text holds the caption (one of its wordings) and the answer groups.
    caption_groups = [records[0].diversity[0][0]]
    assert any(c in texts[0] for c in caption_groups[0])

    base = TrainConfig(epochs=2, batch_size=16, pad=2, lr=1e-3, warmup_epochs=0.5)
    on = RunConfig(model=TINY_MODEL, train=base.model_copy(update={"rda": RdaConfig(enabled=True)}))
    off = RunConfig(model=TINY_MODEL, train=base)
    val = dataset.split("val")
    result = train(on, records, val, tmp_path / "on", tok, show_progress=False)
    assert result.best_epoch >= 0
    history = [
        json.loads(line) for line in (tmp_path / "on/history.jsonl").read_text().splitlines()
    ]
    assert len(history) == 2
    train(off, records, val, tmp_path / "off", tok, show_progress=False)
    loss_on = [
        json.loads(x)["loss"] for x in (tmp_path / "on/history.jsonl").read_text().splitlines()
    ]
    loss_off = [
        json.loads(x)["loss"] for x in (tmp_path / "off/history.jsonl").read_text().splitlines()
    ]
    assert loss_on[0] > loss_off[0]  # the extra positive adds its own loss

    # RDA on without the groups is a clear error, not a silent baseline run.
    with pytest.raises(ValueError, match="run `icl rda`"):
        train(on, read_dataset(small_data).split("train"), val, tmp_path / "x", tok)
