"""ONNX export parity and the rendered Triton configs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

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
    other = copy.deepcopy(demo_model.text)  # demo_model is shared by the session
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
    parsed = text_format.Parse(image, mc.ModelConfig())
    assert list(parsed.input[0].dims) == [h, w, 3]
    assert list(parsed.output[0].dims) == [demo_model.config.output_dim]
    assert "count: 2" in image and "KIND_CPU" in image
    assert (tmp_path / "text_encoder/1/model.py").is_file()
    assert (tmp_path / "text_encoder/1/model.onnx").is_file()


def test_serving_settings_are_validated():
    with pytest.raises(ValueError):
        CpuServingSettings(instances=0)
    assert 'name: "image_encoder"' in render_image_encoder_config((8, 4), 16, CpuServingSettings())


def test_cpu_configs_parse_as_triton_model_configs(demo_model):
    from icl.export.repository import render_text_encoder_config

    s = CpuServingSettings(instances=2, intra_op_threads=1, preferred_batch_sizes=(8, 32))
    h, w = demo_model.config.image_size
    for text in (
        render_text_encoder_config(demo_model.config.output_dim, s),
        render_image_encoder_config((h, w), demo_model.config.output_dim, s),
    ):
        config = text_format.Parse(text, mc.ModelConfig())
        assert config.backend == "python" and config.max_batch_size == 64
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert config.instance_group[0].count == 2
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 32]
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert config.parameters["intra_op_threads"].string_value == "1"
        assert [wu.batch_size for wu in config.model_warmup] == [1]
    with pytest.raises(ValueError, match="preferred"):
        CpuServingSettings(max_batch_size=16, preferred_batch_sizes=(32,))


def test_fp16_parity_failure_names_the_precision(demo_model, tmp_path):
    from icl.export.onnx_export import MIN_COSINE_FP16, convert_to_fp16

    export_dual_encoder(demo_model, tmp_path / "t.onnx", tmp_path / "i.onnx")
    convert_to_fp16(tmp_path / "t.onnx", tmp_path / "t16.onnx")
    other = copy.deepcopy(demo_model.text)  # demo_model is shared by the session
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)
    ids = ClipTokenizer()(["a woman"])
    with pytest.raises(ParityError, match="text fp16 ONNX export"):
        _parity("text", other, tmp_path / "t16.onnx", ids, "input_ids", MIN_COSINE_FP16, "fp16")
