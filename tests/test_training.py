"""Losses, augmentation, the TSE head, and `icl train` / `icl eval` on a small synthetic set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from icl.cli import app
from icl.data.readers import read_dataset
from icl.models.config import (
    ClipTextTower,
    ClipVisionTower,
    CnnImageTower,
    Conv1dTextTower,
    ModelConfig,
    TseConfig,
)
from icl.models.dual_encoder import build_model, load_checkpoint
from icl.models.heads import TseHead
from icl.synthetic.dataset import write_synthetic_dataset
from icl.text.tokenizer import ClipTokenizer
from icl.training.config import ConfigError, RunConfig, TrainConfig, load_run_config
from icl.training.losses import sdm_loss, tal_loss
from icl.training.trainer import augment_images, augment_text, train, trim_padding

runner = CliRunner()

TINY_MODEL = ModelConfig(
    image_size=(48, 16),
    context_length=77,
    embed_dim=32,
    image_tower=CnnImageTower(channels=(8, 16), blocks=(0, 1)),
    text_tower=Conv1dTextTower(width=16, layers=1),
    tse=TseConfig(dim=32, ratio=0.3),
)
TINY_TOML = """
[model]
image_size = [48, 16]
embed_dim = 32
[model.image_tower]
kind = "cnn"
channels = [8, 16]
blocks = [0, 1]
[model.text_tower]
kind = "conv1d"
width = 16
layers = 1
[model.tse]
dim = 32
[train]
epochs = 2
batch_size = 32
lr = 1e-3
warmup_epochs = 0.5
pad = 2
"""


TINY_CLIP = ModelConfig(
    image_size=(32, 16),
    context_length=77,
    embed_dim=32,
    image_tower=ClipVisionTower(width=32, layers=1, heads=2, patch_size=8),
    text_tower=ClipTextTower(width=32, layers=1, heads=2),
    tse=TseConfig(dim=32, ratio=0.3),
)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, ids=30, seed=3, difficulty="easy")
    return out


def _manual_tal(image, text, pids, tau, margin):
    total = 0.0
    for s in (text @ image.T, image @ text.T):
        for i in range(s.shape[0]):
            pos = [j for j in range(s.shape[1]) if pids[i] == pids[j]]
            neg = [j for j in range(s.shape[1]) if pids[i] != pids[j]]
            w = torch.softmax(s[i, pos] / tau, dim=0)
            p = float((w * s[i, pos]).sum())
            n = tau * math.log(sum(math.exp(float(s[i, j]) / tau) for j in neg))
            total += max(0.0, n - p + margin)
    return total


def test_tal_matches_its_definition_with_repeated_ids() -> None:
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    text = F.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    pids = torch.tensor([1, 1, 2, 3, 3, 4])
    got = float(tal_loss(image, text, pids, tau=0.1, margin=0.2))
    assert got == pytest.approx(_manual_tal(image, text, pids, 0.1, 0.2), rel=1e-5)


def test_tal_and_sdm_prefer_aligned_pairs() -> None:
    gen = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(8, 16, generator=gen), dim=-1)
    pids = torch.arange(8)
    shuffled = image[torch.randperm(8, generator=gen)]
    for loss in (tal_loss, sdm_loss):
        aligned, misaligned = float(loss(image, image, pids)), float(loss(image, shuffled, pids))
        assert aligned < misaligned
    # A perfect match with well separated negatives costs (almost) nothing.
    eye = torch.eye(8)
    assert float(sdm_loss(eye, eye, pids)) < 1e-3
    assert float(tal_loss(eye, eye, pids, margin=0.1)) == pytest.approx(0.0, abs=1e-6)


def test_text_augmentation_keeps_sos_and_eot() -> None:
    ids = torch.from_numpy(ClipTokenizer(77)(["a woman in a red coat with a black bag"] * 16))
    gen = torch.Generator().manual_seed(0)
    out = augment_text(ids, 0.5, gen)
    lengths_in, lengths_out = (ids > 0).sum(1), (out > 0).sum(1)
    assert torch.all(lengths_out <= lengths_in) and torch.all(lengths_out >= 3)
    assert torch.all(out[:, 0] == ids[0, 0])
    assert torch.all(out[torch.arange(16), lengths_out - 1] == 49407)
    assert not torch.equal(out, ids)
    assert torch.equal(augment_text(ids, 0.0, gen), ids)


def test_image_augmentation_shapes_and_flip() -> None:
    pixels = torch.randint(0, 256, (4, 12, 6, 3), dtype=torch.uint8)
    cfg = TrainConfig(flip=True, pad=0, erasing=0.0)
    gen = torch.Generator().manual_seed(0)
    out = augment_images(pixels, cfg, gen)
    assert out.dtype == torch.uint8 and out.shape == pixels.shape
    for a, b in zip(out, pixels, strict=True):
        assert torch.equal(a, b) or torch.equal(a, b.flip(1))
    padded = augment_images(pixels, TrainConfig(flip=False, pad=2, erasing=1.0), gen)
    assert padded.shape == pixels.shape and not torch.equal(padded, pixels)


@pytest.mark.parametrize("config", ["cnn+conv1d", "clip"])
def test_trimmed_batches_embed_exactly_like_full_length(config: str) -> None:
    model = build_model(TINY_MODEL if config == "cnn+conv1d" else TINY_CLIP).eval()
    ids = torch.from_numpy(ClipTokenizer(77)(["a man", "a woman with long black hair and a hat"]))
    full = model.text(ids)
    assert trim_padding(ids).shape[1] < 77
    torch.testing.assert_close(model.text(trim_padding(ids)), full, atol=1e-6, rtol=1e-5)


def test_tse_pools_only_valid_selected_tokens() -> None:
    head = TseHead(in_dim=4, out_dim=6, ratio=0.5, selectable=8).eval()  # k = 4
    tokens = torch.randn(1, 8, 4)
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.6, 0.5, 0.0, 0.0]])
    valid = torch.tensor([[True, True, False, False, False, False, False, False]])
    got = head(tokens, scores, valid)
    picked = F.normalize(tokens[:, :2], dim=-1)
    want = (head.mlp(picked) + head.linear(picked)).max(dim=1).values
    torch.testing.assert_close(got, want)


def test_served_score_is_mean_of_bge_and_tse_cosines() -> None:
    model = build_model(TINY_MODEL)
    ids = torch.from_numpy(ClipTokenizer(77)(["a man in a blue coat", "a woman in red"]))
    pixels = torch.randint(0, 256, (3, 48, 16, 3), dtype=torch.uint8)
    t, i = model.text.parts(ids), model.image.parts(pixels)
    want = (t.bge @ i.bge.T + t.tse @ i.tse.T) / 2
    torch.testing.assert_close(model.similarity(ids, pixels), want, atol=1e-6, rtol=1e-5)


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(TINY_TOML.replace("epochs = 2", "epochs = 2\nepoch = 3"))
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_run_config(path)
    path.write_text(TINY_TOML.replace('kind = "cnn"', 'kind = "resnet"'))
    with pytest.raises(ConfigError, match="image_tower"):
        load_run_config(path)


def test_resumed_run_equals_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    data = read_dataset(tiny_data)
    run = RunConfig(model=TINY_MODEL, train=TrainConfig(epochs=2, batch_size=32, pad=2))
    tok = ClipTokenizer(77)
    whole = train(
        run, data.split("train"), data.split("val"), tmp_path / "a", tok, show_progress=False
    )

    class Stop(Exception):
        pass

    def stop_after_first(epoch: int, record: dict) -> None:
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        train(
            run,
            data.split("train"),
            data.split("val"),
            tmp_path / "b",
            tok,
            show_progress=False,
            epoch_callback=stop_after_first,
        )
    with pytest.raises(FileExistsError, match="--resume"):
        train(run, data.split("train"), data.split("val"), tmp_path / "b", tok, show_progress=False)
    resumed = train(
        run,
        data.split("train"),
        data.split("val"),
        tmp_path / "b",
        tok,
        resume=True,
        show_progress=False,
    )
    assert resumed.best_val == whole.best_val
    a = torch.load(tmp_path / "a/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b/last.pt", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert len((tmp_path / "b/history.jsonl").read_text().splitlines()) == 2


def test_train_and_eval_commands(tiny_data: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "--data", str(tiny_data), "--config", str(config), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "best epoch" in result.output
    model = load_checkpoint(out / "best.pt")
    assert model.config == TINY_MODEL
    report = tmp_path / "metrics.json"
    result = runner.invoke(
        app,
        [
            "eval",
            "--data",
            str(tiny_data),
            "--checkpoint",
            str(out / "best.pt"),
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(report.read_text())
    assert payload["split"] == "test" and payload["metrics"]["queries"] > 0
    assert 0 <= payload["metrics"]["r1"] <= 100 and "cores" in payload["machine"]
    assert "R1" in result.output and "mINP" in result.output


def test_commands_fail_in_one_line(tiny_data: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["eval", "--data", str(tiny_data), "--checkpoint", str(bogus)])
    assert result.exit_code == 2 and "not a readable torch checkpoint" in result.output
    config = tmp_path / "run.toml"
    config.write_text(TINY_TOML)
    result = runner.invoke(
        app, ["train", "--data", str(tmp_path), "--config", str(config), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "error:" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("model", [TINY_MODEL, TINY_CLIP], ids=["cnn+conv1d", "clip"])
def test_train_runs_the_same_on_every_tower_kind(model, tiny_data: Path, tmp_path: Path) -> None:
    data = read_dataset(tiny_data)
    run = RunConfig(model=model, train=TrainConfig(epochs=1, batch_size=32, pad=1))
    result = train(
        run,
        data.split("train"),
        data.split("val"),
        tmp_path,
        ClipTokenizer(77),
        show_progress=False,
    )
    loaded = load_checkpoint(tmp_path / "best.pt")
    assert loaded.config == model and result.best_epoch == 0
    assert result.best_val["queries"] > 0
