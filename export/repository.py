"""Write a Triton model repository for a dual encoder, CPU or GPU flavour.

Both flavours serve the same contract (docs/export.md): `text_encoder` TEXT BYTES [1] ->
EMBEDDING FP32 [D] and `image_encoder` PIXELS UINT8 [H, W, 3] -> EMBEDDING FP32 [D].

CPU flavour (served here by the bundled tritonserver, python backend only):
    text_encoder/config.pbtxt, text_encoder/1/{model.py, model.onnx}   tokeniser + onnxruntime
    image_encoder/config.pbtxt, image_encoder/1/{model.py, model.onnx}
GPU flavour (NGC Triton image with the TensorRT backend):
    tokenizer/         python, KIND_CPU: TEXT -> INPUT_IDS
    text_encoder_trt/  tensorrt_plan, KIND_GPU: input_ids -> embedding (1/model.plan)
    image_encoder_trt/ tensorrt_plan, KIND_GPU: pixels -> embedding (1/model.plan)
    text_encoder/      ensemble: tokenizer -> text_encoder_trt, renamed to the contract
    image_encoder/     ensemble: image_encoder_trt, renamed to the contract
    build_plans.sh     trtexec commands turning each `*_trt/1/model.onnx` into `model.plan`
The python-backend `model.py` files come from the project's `model_repository/` folder; the
configs are built here as Triton's own ModelConfig protobuf (tritonclient's model_config_pb2,
written in protobuf text format) so that shapes always match the exported graphs and a field
Triton does not know fails at export, not at load.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from icl.export.onnx_export import ParityReport, export_dual_encoder, export_fp16_variants
from icl.export.tensorrt import BUILD_SCRIPT, PlanBuild, render_build_script
from icl.models.config import ModelConfig
from icl.models.dual_encoder import DualEncoder
from icl.models.pretrained import tokenizer_files
from icl.text.hf_tokenizer import TOKENIZER_FILE

TEXT_ENCODER = "text_encoder"
IMAGE_ENCODER = "image_encoder"
TOKENIZER = "tokenizer"
TEXT_ENCODER_TRT = "text_encoder_trt"
IMAGE_ENCODER_TRT = "image_encoder_trt"
ALL_MODELS = (TEXT_ENCODER, IMAGE_ENCODER, TOKENIZER, TEXT_ENCODER_TRT, IMAGE_ENCODER_TRT)
DEFAULT_SERVING_IMAGE = "nvcr.io/nvidia/tritonserver:<YY.MM>-py3"
Flavour = Literal["cpu", "gpu"]


def _check_batching(max_batch: int, delay_us: int, preferred: tuple[int, ...]) -> None:
    if max_batch < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch}")
    if delay_us < 0:
        raise ValueError("max_queue_delay_us must be >= 0")
    if any(not 1 <= p <= max_batch for p in preferred):
        raise ValueError(f"preferred batch sizes {preferred} must lie in 1..{max_batch}")


@dataclass(frozen=True)
class CpuServingSettings:
    """Triton scheduling knobs for the CPU flavour."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    instances: int = 1
    intra_op_threads: int = 1
    preferred_batch_sizes: tuple[int, ...] = ()
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.instances < 1 or self.intra_op_threads < 1:
            raise ValueError(f"serving settings must be positive: {self}")
        _check_batching(self.max_batch_size, self.max_queue_delay_us, self.preferred_batch_sizes)


@dataclass(frozen=True)
class GpuServingSettings:
    """Triton scheduling and TensorRT build knobs for the GPU flavour."""

    max_batch_size: int = 64  # also the TensorRT profile's max batch
    opt_batch_size: int = 16  # the profile's opt batch: what the dynamic batcher mostly forms
    max_queue_delay_us: int = 500
    instances: int = 1  # TensorRT instances per GPU
    tokenizer_instances: int = 2  # python stubs (CPU) in front of the text plan
    preferred_batch_sizes: tuple[int, ...] = ()
    precision: Literal["fp16", "fp32"] = "fp16"
    serving_image: str = DEFAULT_SERVING_IMAGE
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.instances < 1 or self.tokenizer_instances < 1:
            raise ValueError(f"instance counts must be positive: {self}")
        if not 1 <= self.opt_batch_size <= self.max_batch_size:
            raise ValueError("opt_batch_size must lie in 1..max_batch_size")
        if self.precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {self.precision!r}")
        _check_batching(self.max_batch_size, self.max_queue_delay_us, self.preferred_batch_sizes)


Tensor = tuple[str, int, tuple[int, ...]]  # (name, Triton DataType, dims without batch)


def _text(config: mc.ModelConfig) -> str:
    """config.pbtxt text: Triton's own ModelConfig message in protobuf text format."""
    return text_format.MessageToString(config, use_short_repeated_primitives=True)


def _inputs(tensors: list[Tensor]) -> list[mc.ModelInput]:
    return [mc.ModelInput(name=n, data_type=t, dims=d) for n, t, d in tensors]


def _outputs(tensors: list[Tensor]) -> list[mc.ModelOutput]:
    return [mc.ModelOutput(name=n, data_type=t, dims=d) for n, t, d in tensors]


def _dynamic_batching(delay_us: int, preferred: tuple[int, ...]) -> mc.ModelDynamicBatching:
    return mc.ModelDynamicBatching(
        preferred_batch_size=preferred, max_queue_delay_microseconds=delay_us
    )


def _instances(kind: int, count: int) -> list[mc.ModelInstanceGroup]:
    return [mc.ModelInstanceGroup(kind=kind, count=count)]


def _warmup(inputs: list[Tensor], batch_sizes: tuple[int, ...]) -> list[mc.ModelWarmup]:
    """Zero-filled warm-up requests (BYTES zeros are empty strings), one per batch size.

    So the first real request does not pay for onnxruntime's or TensorRT's lazy set-up.
    """
    return [
        mc.ModelWarmup(
            name=f"zeros_batch_{b}",
            batch_size=b,
            inputs={
                n: mc.ModelWarmup.Input(data_type=t, dims=d, zero_data=True) for n, t, d in inputs
            },
        )
        for b in dict.fromkeys(batch_sizes)
    ]


def _text_input(name: str = "TEXT") -> Tensor:
    return (name, mc.TYPE_STRING, (1,))


def _pixels_input(name: str, image_size: tuple[int, int]) -> Tensor:
    return (name, mc.TYPE_UINT8, (*image_size, 3))


def _embedding(name: str, dim: int) -> Tensor:
    return (name, mc.TYPE_FP32, (dim,))


def _encoder_config(
    name: str, inp: Tensor, embed_dim: int, s: CpuServingSettings
) -> mc.ModelConfig:
    return mc.ModelConfig(
        name=name,
        backend="python",
        max_batch_size=s.max_batch_size,
        input=_inputs([inp]),
        output=_outputs([_embedding("EMBEDDING", embed_dim)]),
        dynamic_batching=_dynamic_batching(s.max_queue_delay_us, s.preferred_batch_sizes),
        instance_group=_instances(mc.ModelInstanceGroup.KIND_CPU, s.instances),
        parameters={
            "onnx_file": mc.ModelParameter(string_value="model.onnx"),
            "intra_op_threads": mc.ModelParameter(string_value=str(s.intra_op_threads)),
        },
        model_warmup=_warmup([inp], (1,)) if s.warmup else [],
    )


def text_encoder_config(embed_dim: int, s: CpuServingSettings) -> mc.ModelConfig:
    return _encoder_config(TEXT_ENCODER, _text_input(), embed_dim, s)


def image_encoder_config(
    image_size: tuple[int, int], embed_dim: int, s: CpuServingSettings
) -> mc.ModelConfig:
    return _encoder_config(IMAGE_ENCODER, _pixels_input("PIXELS", image_size), embed_dim, s)


def render_text_encoder_config(embed_dim: int, s: CpuServingSettings) -> str:
    return _text(text_encoder_config(embed_dim, s))


def render_image_encoder_config(
    image_size: tuple[int, int], embed_dim: int, s: CpuServingSettings
) -> str:
    return _text(image_encoder_config(image_size, embed_dim, s))


def tokenizer_config(context_length: int, s: GpuServingSettings) -> mc.ModelConfig:
    inp = _text_input()
    return mc.ModelConfig(
        name=TOKENIZER,
        backend="python",
        max_batch_size=s.max_batch_size,
        input=_inputs([inp]),
        output=_outputs([("INPUT_IDS", mc.TYPE_INT64, (context_length,))]),
        dynamic_batching=_dynamic_batching(s.max_queue_delay_us, ()),
        instance_group=_instances(mc.ModelInstanceGroup.KIND_CPU, s.tokenizer_instances),
        model_warmup=_warmup([inp], (1,)) if s.warmup else [],
    )


def plan_config(name: str, inp: Tensor, embed_dim: int, s: GpuServingSettings) -> mc.ModelConfig:
    """A TensorRT plan model; its tensors keep the ONNX names (input_ids/pixels, embedding)."""
    return mc.ModelConfig(
        name=name,
        platform="tensorrt_plan",
        max_batch_size=s.max_batch_size,
        input=_inputs([inp]),
        output=_outputs([_embedding("embedding", embed_dim)]),
        dynamic_batching=_dynamic_batching(s.max_queue_delay_us, s.preferred_batch_sizes),
        instance_group=_instances(mc.ModelInstanceGroup.KIND_GPU, s.instances),
        model_warmup=_warmup([inp], (1, s.opt_batch_size)) if s.warmup else [],
    )


def _step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> mc.ModelEnsembling.Step:
    return mc.ModelEnsembling.Step(
        model_name=model, model_version=-1, input_map=inputs, output_map=outputs
    )


def ensemble_config(
    name: str,
    inp: Tensor,
    embed_dim: int,
    steps: list[mc.ModelEnsembling.Step],
    s: GpuServingSettings,
) -> mc.ModelConfig:
    return mc.ModelConfig(
        name=name,
        platform="ensemble",
        max_batch_size=s.max_batch_size,
        input=_inputs([inp]),
        output=_outputs([_embedding("EMBEDDING", embed_dim)]),
        ensemble_scheduling=mc.ModelEnsembling(step=steps),
    )


def gpu_configs(cfg: ModelConfig, s: GpuServingSettings) -> dict[str, mc.ModelConfig]:
    """Triton's ModelConfig per model name, for the GPU flavour."""
    d, length = cfg.output_dim, cfg.context_length
    ids: Tensor = ("input_ids", mc.TYPE_INT64, (length,))
    pixels = _pixels_input("pixels", cfg.image_size)
    text_steps = [
        _step(TOKENIZER, {"TEXT": "TEXT"}, {"INPUT_IDS": "token_ids"}),
        _step(TEXT_ENCODER_TRT, {"input_ids": "token_ids"}, {"embedding": "EMBEDDING"}),
    ]
    image_steps = [_step(IMAGE_ENCODER_TRT, {"pixels": "PIXELS"}, {"embedding": "EMBEDDING"})]
    return {
        TOKENIZER: tokenizer_config(length, s),
        TEXT_ENCODER_TRT: plan_config(TEXT_ENCODER_TRT, ids, d, s),
        IMAGE_ENCODER_TRT: plan_config(IMAGE_ENCODER_TRT, pixels, d, s),
        TEXT_ENCODER: ensemble_config(TEXT_ENCODER, _text_input(), d, text_steps, s),
        IMAGE_ENCODER: ensemble_config(
            IMAGE_ENCODER, _pixels_input("PIXELS", cfg.image_size), d, image_steps, s
        ),
    }


def render_gpu_configs(cfg: ModelConfig, s: GpuServingSettings) -> dict[str, str]:
    """config.pbtxt text per model name, for the GPU flavour."""
    return {name: _text(config) for name, config in gpu_configs(cfg, s).items()}


def gpu_plan_builds(cfg: ModelConfig, s: GpuServingSettings) -> list[PlanBuild]:
    """The two engines of the GPU flavour, paths relative to the repository root."""
    h, w = cfg.image_size
    return [
        PlanBuild(
            f"{name}/1/model.onnx",
            f"{name}/1/model.plan",
            tensor,
            shape,
            1,
            s.opt_batch_size,
            s.max_batch_size,
        )
        for name, tensor, shape in (
            (TEXT_ENCODER_TRT, "input_ids", (cfg.context_length,)),
            (IMAGE_ENCODER_TRT, "pixels", (h, w, 3)),
        )
    ]


def _model_py(name: str) -> bytes:
    return resources.files("icl.model_repository").joinpath(name, "1", "model.py").read_bytes()


def _fresh(out: Path, names: tuple[str, ...]) -> None:
    """Remove every model either flavour writes (a stale one would fail the server's load)."""
    for name in ALL_MODELS:
        shutil.rmtree(out / name, ignore_errors=True)
    for stale in (BUILD_SCRIPT,):
        (out / stale).unlink(missing_ok=True)
    for name in names:
        (out / name / "1").mkdir(parents=True)


def _copy_tokenizer_file(cfg: ModelConfig, folder: Path) -> None:
    if cfg.text_tower.kind == "hf_encoder":
        # The served tokeniser reads the file shipped next to it; none means CLIP BPE.
        shutil.copyfile(tokenizer_files(cfg)[0], folder / TOKENIZER_FILE)


def write_repository(
    model: DualEncoder, out: Path, settings: CpuServingSettings | None = None
) -> list[ParityReport]:
    """Export `model` into a fresh CPU-flavour repository at `out` (its models replaced)."""
    s = settings or CpuServingSettings()
    cfg = model.config
    _fresh(out, (TEXT_ENCODER, IMAGE_ENCODER))
    for name in (TEXT_ENCODER, IMAGE_ENCODER):
        (out / name / "1" / "model.py").write_bytes(_model_py(name))
    (out / TEXT_ENCODER / "config.pbtxt").write_text(render_text_encoder_config(cfg.output_dim, s))
    (out / IMAGE_ENCODER / "config.pbtxt").write_text(
        render_image_encoder_config(cfg.image_size, cfg.output_dim, s)
    )
    _copy_tokenizer_file(cfg, out / TEXT_ENCODER / "1")
    return export_dual_encoder(
        model, out / TEXT_ENCODER / "1" / "model.onnx", out / IMAGE_ENCODER / "1" / "model.onnx"
    )


def write_gpu_repository(
    model: DualEncoder, out: Path, settings: GpuServingSettings | None = None
) -> list[ParityReport]:
    """Export `model` into a fresh GPU-flavour repository at `out`, plans not yet built.

    Writes the ONNX graphs the plans are built from (fp16 by default, checked against torch
    fp32 at cosine >= 0.999 after the fp32 graphs passed >= 0.9999), every config.pbtxt and
    `build_plans.sh`; `icl.export.tensorrt.run_build_script` (or the script itself, where
    trtexec exists) turns the graphs into plans.
    """
    s = settings or GpuServingSettings()
    cfg = model.config
    _fresh(out, ALL_MODELS)
    for name, text in render_gpu_configs(cfg, s).items():
        (out / name / "config.pbtxt").write_text(text)
    (out / TOKENIZER / "1" / "model.py").write_bytes(_model_py(TOKENIZER))
    _copy_tokenizer_file(cfg, out / TOKENIZER / "1")
    text_onnx = out / TEXT_ENCODER_TRT / "1" / "model.onnx"
    image_onnx = out / IMAGE_ENCODER_TRT / "1" / "model.onnx"
    if s.precision == "fp32":
        reports = export_dual_encoder(model, text_onnx, image_onnx)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = (Path(tmp) / "text.onnx", Path(tmp) / "image.onnx")
            reports = export_dual_encoder(model, *fp32)
            reports += export_fp16_variants(model, fp32, (text_onnx, image_onnx))
    script = out / BUILD_SCRIPT
    script.write_text(render_build_script(gpu_plan_builds(cfg, s), s.serving_image))
    script.chmod(0o755)
    return reports
