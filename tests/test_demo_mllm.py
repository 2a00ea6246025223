"""The demo MLLM: the committed weights behind the contract, and `icl train-mllm`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from icl.cli import app
from icl.mllm.contract import VQA_PROMPT, anchor_prompt, parse_answers
from icl.mllm.demo import load_demo_backend, load_demo_mllm
from icl.synthetic.captions import caption_with_mentions
from icl.synthetic.dataset import write_synthetic_dataset
from icl.synthetic.render import render
from icl.synthetic.schema import sample_person


def test_committed_model_answers_the_contract() -> None:
    model = load_demo_backend()
    assert model.model_key.startswith("icl-demo-mllm@") and not model.can_generate
    rng = np.random.default_rng(7)
    people = [sample_person(rng, i) for i in range(40)]
    images = [render(p, rng) for p in people]
    captions = [caption_with_mentions(p, rng)[0] for p in people]
    matched = model.score(images, [anchor_prompt(c) for c in captions])
    shifted = model.score(images, [anchor_prompt(c) for c in captions[1:] + captions[:1]])
    assert all(0.0 <= p <= 1.0 for p in matched + shifted)
    # Reads pixels and text: its own caption beats another person's for most crops.
    assert np.mean(np.array(matched) > np.array(shifted)) > 0.8
    answers = parse_answers(model.generate(images[:1], VQA_PROMPT))
    assert len(answers) == 15 and answers[11] == "Cannot tell."
    with pytest.raises(ValueError, match="VQA"):
        model.generate(images[:1], "Describe the weather.")
    with pytest.raises(ValueError):
        model.score(images[:1], ["Is this a cat?"])


def test_train_mllm_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_synthetic_dataset(data, ids=30, seed=2, difficulty="easy")
    out = tmp_path / "mllm.pt"
    args = [
        "train-mllm",
        "--data",
        str(data),
        "--out",
        str(out),
        "--image-epochs",
        "1",
        "--parser-captions",
        "300",
        "--parser-epochs",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    model = load_demo_mllm(out)
    assert len(parse_answers(model.generate([np.zeros((128, 48, 3), np.uint8)], VQA_PROMPT))) == 15
    bad = CliRunner().invoke(app, ["train-mllm", "--data", str(tmp_path), "--out", str(out)])
    assert bad.exit_code == 2 and "attributes.json" in bad.output


def test_served_caches_answer_as_the_networks_do() -> None:
    """The served model remembers what it read per crop and per text; with the caches on,
    every score and answer equals the networks' own, whatever the batches, and the caches stay
    within their bounds."""
    served = load_demo_backend()
    plain = load_demo_backend()
    plain.cache(0, 0)
    rng = np.random.default_rng(3)
    people = [sample_person(rng, i) for i in range(12)]
    images = [render(p, rng) for p in people]
    captions = [anchor_prompt(caption_with_mentions(p, rng)[0]) for p in people]
    for _ in range(3):  # repeated crops and texts in changing batches: hits and misses mixed
        pick = rng.choice(12, size=5)
        got = served.score([images[i] for i in pick], [captions[i] for i in pick[::-1]])
        want = plain.score([images[i] for i in pick], [captions[i] for i in pick[::-1]])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert served.answers(images[pick[0]]) == plain.answers(images[pick[0]])
    small = load_demo_backend()
    small.cache(2, 1)
    small.score(images[:5], captions[:5])
    assert len(small._image_cache._data) == 2 and len(small._text_cache._data) == 1
    np.testing.assert_allclose(
        small.score(images[:5], captions[:5]), plain.score(images[:5], captions[:5]), atol=1e-6
    )
