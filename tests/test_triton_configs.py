"""Every config.pbtxt the export writes, read back through Triton's own ModelConfig proto.

The configs are built as `tritonclient.grpc.model_config_pb2.ModelConfig` messages; these
tests parse the written text (text_format.Parse: an unknown field or enum fails here) and
compare every field that matters (names, dims, data types, batching, instance groups,
parameters, ensemble steps, warm-up) with what the export was asked for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from icl.export.mllm_repository import render_mllm_config, write_mllm_model
from icl.export.repository import (
    CpuServingSettings,
    GpuServingSettings,
    render_gpu_configs,
    render_image_encoder_config,
    render_text_encoder_config,
    write_gpu_repository,
    write_repository,
)
from icl.triton_models import model_parameters

CPU, GPU = mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_GPU
STRING, UINT8, INT64, INT32 = mc.TYPE_STRING, mc.TYPE_UINT8, mc.TYPE_INT64, mc.TYPE_INT32
FP32, BOOL = mc.TYPE_FP32, mc.TYPE_BOOL


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def summary(c: mc.ModelConfig) -> dict[str, Any]:
    """The fields of a ModelConfig that the export sets, as plain data."""
    tensors = lambda ts: [(t.name, t.data_type, list(t.dims), t.optional) for t in ts]  # noqa: E731
    return {
        "name": c.name,
        "backend": c.backend,
        "platform": c.platform,
        "max_batch_size": c.max_batch_size,
        "decoupled": c.model_transaction_policy.decoupled,
        "input": tensors(c.input),
        "output": [(t.name, t.data_type, list(t.dims)) for t in c.output],
        "dynamic_batching": (
            (list(c.dynamic_batching.preferred_batch_size),
             c.dynamic_batching.max_queue_delay_microseconds)
            if c.HasField("dynamic_batching") else None
        ),
        "instance_group": [(g.kind, g.count) for g in c.instance_group],
        "parameters": {k: v.string_value for k, v in c.parameters.items()},
        "ensemble": [
            (s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
            for s in c.ensemble_scheduling.step
        ],
        "warmup": [
            (w.name, w.batch_size,
             {k: (i.data_type, list(i.dims), i.zero_data) for k, i in w.inputs.items()})
            for w in c.model_warmup
        ],
    }  # fmt: skip


def expected(name: str, **fields: Any) -> dict[str, Any]:
    base = {
        "name": name,
        "backend": "",
        "platform": "",
        "max_batch_size": 0,
        "decoupled": False,
        "input": [],
        "output": [],
        "dynamic_batching": None,
        "instance_group": [],
        "parameters": {},
        "ensemble": [],
        "warmup": [],
    }
    assert fields.keys() <= base.keys()
    return base | fields


def zeros(inputs: dict[str, tuple[int, list[int]]], *batches: int) -> list:
    return [
        (f"zeros_batch_{b}", b, {k: (t, d, True) for k, (t, d) in inputs.items()}) for b in batches
    ]


def cpu_expected(s: CpuServingSettings, image_size: tuple[int, int], dim: int) -> dict:
    h, w = image_size
    common = {
        "backend": "python",
        "max_batch_size": s.max_batch_size,
        "output": [("EMBEDDING", FP32, [dim])],
        "dynamic_batching": (list(s.preferred_batch_sizes), s.max_queue_delay_us),
        "instance_group": [(CPU, s.instances)],
        "parameters": {"onnx_file": "model.onnx", "intra_op_threads": str(s.intra_op_threads)},
    }
    text_warmup = zeros({"TEXT": (STRING, [1])}, 1) if s.warmup else []
    image_warmup = zeros({"PIXELS": (UINT8, [h, w, 3])}, 1) if s.warmup else []
    return {
        "text_encoder": expected(
            "text_encoder",
            input=[("TEXT", STRING, [1], False)],
            warmup=text_warmup,
            **common,
        ),
        "image_encoder": expected(
            "image_encoder",
            input=[("PIXELS", UINT8, [h, w, 3], False)],
            warmup=image_warmup,
            **common,
        ),
    }


def gpu_expected(s: GpuServingSettings, image_size: tuple[int, int], dim: int, length: int):
    h, w = image_size
    batching = (list(s.preferred_batch_sizes), s.max_queue_delay_us)
    plan = {"platform": "tensorrt_plan", "max_batch_size": s.max_batch_size}
    plan |= {"dynamic_batching": batching, "instance_group": [(GPU, s.instances)]}
    plan["output"] = [("embedding", FP32, [dim])]
    ensemble = {"platform": "ensemble", "max_batch_size": s.max_batch_size}
    ensemble["output"] = [("EMBEDDING", FP32, [dim])]
    plan_batches = dict.fromkeys((1, s.opt_batch_size))
    return {
        "tokenizer": expected(
            "tokenizer",
            backend="python",
            max_batch_size=s.max_batch_size,
            input=[("TEXT", STRING, [1], False)],
            output=[("INPUT_IDS", INT64, [length])],
            dynamic_batching=([], s.max_queue_delay_us),
            instance_group=[(CPU, s.tokenizer_instances)],
            warmup=zeros({"TEXT": (STRING, [1])}, 1) if s.warmup else [],
        ),
        "text_encoder_trt": expected(
            "text_encoder_trt",
            input=[("input_ids", INT64, [length], False)],
            warmup=zeros({"input_ids": (INT64, [length])}, *plan_batches) if s.warmup else [],
            **plan,
        ),
        "image_encoder_trt": expected(
            "image_encoder_trt",
            input=[("pixels", UINT8, [h, w, 3], False)],
            warmup=zeros({"pixels": (UINT8, [h, w, 3])}, *plan_batches) if s.warmup else [],
            **plan,
        ),
        "text_encoder": expected(
            "text_encoder",
            input=[("TEXT", STRING, [1], False)],
            ensemble=[
                ("tokenizer", -1, {"TEXT": "TEXT"}, {"INPUT_IDS": "token_ids"}),
                ("text_encoder_trt", -1, {"input_ids": "token_ids"}, {"embedding": "EMBEDDING"}),
            ],
            **ensemble,
        ),
        "image_encoder": expected(
            "image_encoder",
            input=[("PIXELS", UINT8, [h, w, 3], False)],
            ensemble=[("image_encoder_trt", -1, {"pixels": "PIXELS"}, {"embedding": "EMBEDDING"})],
            **ensemble,
        ),
    }


def mllm_expected(
    name: str = "mllm",
    *,
    backend: str = "demo",
    path: str = "",
    kind: int = CPU,
    instances: int = 1,
    options: str = "{}",
    threads: int = 0,
    max_images: int = 64,
    max_tokens_limit: int = 1024,
) -> dict:
    return expected(
        name,
        backend="python",
        decoupled=True,
        input=[
            ("TASK", STRING, [1], False),
            ("IMAGES", STRING, [-1], True),
            ("PROMPTS", STRING, [-1], True),
            ("MAX_TOKENS", INT32, [1], True),
        ],
        output=[
            ("P_YES", FP32, [-1]),
            ("TEXT", STRING, [1]),
            ("MODEL_KEY", STRING, [1]),
            ("CAN_GENERATE", BOOL, [1]),
        ],
        instance_group=[(kind, instances)],
        parameters={
            "backend": backend,
            "path": path,
            "options": options,
            "threads": str(threads),
            "max_images": str(max_images),
            "max_tokens_limit": str(max_tokens_limit),
        },
    )


CPU_SETTINGS = [
    CpuServingSettings(),
    CpuServingSettings(instances=3, intra_op_threads=4, preferred_batch_sizes=(8, 32)),
    CpuServingSettings(max_batch_size=8, max_queue_delay_us=0, warmup=False),
]
GPU_SETTINGS = [
    GpuServingSettings(),
    GpuServingSettings(max_batch_size=32, opt_batch_size=8, preferred_batch_sizes=(8, 16)),
    GpuServingSettings(instances=2, tokenizer_instances=4, opt_batch_size=1, warmup=False),
]


@pytest.mark.unit
@pytest.mark.parametrize("s", CPU_SETTINGS, ids=["default", "tuned", "no-warmup"])
def test_cpu_configs_carry_the_requested_settings(s: CpuServingSettings) -> None:
    want = cpu_expected(s, (64, 24), 40)
    assert summary(parse(render_text_encoder_config(40, s))) == want["text_encoder"]
    assert summary(parse(render_image_encoder_config((64, 24), 40, s))) == want["image_encoder"]


@pytest.mark.unit
@pytest.mark.parametrize("s", GPU_SETTINGS, ids=["default", "tuned", "no-warmup"])
def test_gpu_configs_carry_the_requested_settings(s: GpuServingSettings, demo_model) -> None:
    cfg = demo_model.config
    got = {name: summary(parse(text)) for name, text in render_gpu_configs(cfg, s).items()}
    assert got == gpu_expected(s, cfg.image_size, cfg.output_dim, cfg.context_length)


@pytest.mark.unit
def test_mllm_configs_carry_the_requested_settings() -> None:
    # The demo model defaults to one torch thread (export/mllm_repository.DEFAULT_THREADS).
    assert summary(parse(render_mllm_config("demo", None))) == mllm_expected(threads=1)
    options = {"b": [1, 'x"y'], "a": "é"}
    text = render_mllm_config(
        "qwen2vl",
        '/models/q w"en',
        name="mllm_gpu",
        kind="KIND_GPU",
        instances=2,
        threads=4,
        options=options,
        max_images=8,
        max_tokens_limit=16,
    )
    assert summary(parse(text)) == mllm_expected(
        "mllm_gpu",
        backend="qwen2vl",
        path='/models/q w"en',
        kind=GPU,
        instances=2,
        options=json.dumps(options, sort_keys=True),
        threads=4,
        max_images=8,
        max_tokens_limit=16,
    )


@pytest.mark.unit
def test_model_parameters_reads_what_triton_hands_the_python_backend() -> None:
    """The python backend gets config.pbtxt as JSON (proto field names, defaults included)."""
    config = parse(render_mllm_config("demo", None, threads=2, options={"k": 1}))
    as_json = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    params = model_parameters(json.loads(json.dumps(as_json)))
    assert params == mllm_expected(threads=2, options='{"k": 1}')["parameters"]
    assert model_parameters({"name": "m"}) == {}


def _written(root: Path) -> dict[str, dict[str, Any]]:
    return {p.parent.name: summary(parse(p.read_text())) for p in root.glob("*/config.pbtxt")}


def test_written_repositories_hold_exactly_the_requested_configs(demo_model, tmp_path) -> None:
    """The files on disk, CPU flavour plus the mllm model, and the GPU flavour."""
    cfg = demo_model.config
    cpu = CPU_SETTINGS[1]
    write_repository(demo_model, tmp_path / "cpu", cpu)
    write_mllm_model(tmp_path / "cpu", "demo", None, instances=2, threads=1)
    assert _written(tmp_path / "cpu") == cpu_expected(cpu, cfg.image_size, cfg.output_dim) | {
        "mllm": mllm_expected(instances=2, threads=1)
    }
    gpu = GpuServingSettings(precision="fp32", max_batch_size=16, opt_batch_size=4)
    write_gpu_repository(demo_model, tmp_path / "gpu", gpu)
    assert _written(tmp_path / "gpu") == gpu_expected(
        gpu, cfg.image_size, cfg.output_dim, cfg.context_length
    )
