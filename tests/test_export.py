"""ONNX export parity and the rendered Triton configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl.export.onnx_export import ParityError, _parity, export_dual_encoder
from icl.export.repository import CpuServingSettings, render_image_encoder_config, write_repository
from icl.onnx_encoders import OnnxEncoders
from icl.text.tokenizer import ClipTokenizer


def test_export_matches_torch(demo_model, tmp_path):
    reports = export_dual_encoder(demo_model, tmp_path / "t.onnx", tmp_path / "i.onnx")
    assert {r.tower for r in reports} == {"text", "image"}
    assert all(r.min_cosine >= 0.9999 for r in reports)
    enc = OnnxEncoders(tmp_path / "t.onnx", tmp_path / "i.onnx")
    ids = ClipTokenizer()(["a man in a blue jacket"] * 5)  # batch size not seen at export
    with torch.no_grad():
        ref = demo_model.text(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(enc.embed_texts(["a man in a blue jacket"] * 5), ref, atol=1e-5)


def test_parity_failure_is_reported(demo_model, tmp_path):
    export_dual_encoder(demo_model, tmp_path / "t.onnx", tmp_path / "i.onnx")
    other = torch.nn.Sequential(demo_model.text, torch.nn.Identity())
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    ids = ClipTokenizer()(["a woman"])
    with pytest.raises(ParityError, match="differs from torch"):
        _parity("text", other, tmp_path / "t.onnx", ids, "input_ids")


def test_repository_configs_follow_the_model(demo_model, tmp_path):
    write_repository(demo_model, tmp_path, CpuServingSettings(instances=2, intra_op_threads=1))
    image = (tmp_path / "image_encoder/config.pbtxt").read_text()
    h, w = demo_model.config.image_size
    assert f"dims: [ {h}, {w}, 3 ]" in image
    assert f"dims: [ {demo_model.config.output_dim} ]" in image
    assert "count: 2" in image and "KIND_CPU" in image
    assert (tmp_path / "text_encoder/1/model.py").is_file()
    assert (tmp_path / "text_encoder/1/model.onnx").is_file()


def test_serving_settings_are_validated():
    with pytest.raises(ValueError):
        CpuServingSettings(instances=0)
    assert 'name: "image_encoder"' in render_image_encoder_config((8, 4), 16, CpuServingSettings())
