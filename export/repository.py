"""Write a Triton model repository (CPU flavour) for a dual encoder.

Layout written under `out/`:
    text_encoder/config.pbtxt, text_encoder/1/{model.py, model.onnx}
    image_encoder/config.pbtxt, image_encoder/1/{model.py, model.onnx}
The python-backend `model.py` files come from the project's `model_repository/` folder; the
configs are rendered here so that shapes always match the exported graphs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from icl.export.onnx_export import ParityReport, export_dual_encoder
from icl.models.dual_encoder import DualEncoder
from icl.models.pretrained import tokenizer_files
from icl.text.hf_tokenizer import TOKENIZER_FILE

TEXT_ENCODER = "text_encoder"
IMAGE_ENCODER = "image_encoder"


@dataclass(frozen=True)
class CpuServingSettings:
    """Triton scheduling knobs for the CPU flavour."""

    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    instances: int = 1
    intra_op_threads: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.instances < 1 or self.intra_op_threads < 1:
            raise ValueError(f"serving settings must be positive: {self}")
        if self.max_queue_delay_us < 0:
            raise ValueError("max_queue_delay_us must be >= 0")


def _render(name: str, inputs: str, embed_dim: int, s: CpuServingSettings) -> str:
    return f"""name: "{name}"
backend: "python"
max_batch_size: {s.max_batch_size}
{inputs}
output [
  {{ name: "EMBEDDING", data_type: TYPE_FP32, dims: [ {embed_dim} ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {s.max_queue_delay_us} }}
instance_group [ {{ kind: KIND_CPU, count: {s.instances} }} ]
parameters {{ key: "onnx_file", value: {{ string_value: "model.onnx" }} }}
parameters {{ key: "intra_op_threads", value: {{ string_value: "{s.intra_op_threads}" }} }}
"""


def render_text_encoder_config(embed_dim: int, s: CpuServingSettings) -> str:
    inputs = 'input [\n  { name: "TEXT", data_type: TYPE_STRING, dims: [ 1 ] }\n]'
    return _render(TEXT_ENCODER, inputs, embed_dim, s)


def render_image_encoder_config(
    image_size: tuple[int, int], embed_dim: int, s: CpuServingSettings
) -> str:
    h, w = image_size
    inputs = f'input [\n  {{ name: "PIXELS", data_type: TYPE_UINT8, dims: [ {h}, {w}, 3 ] }}\n]'
    return _render(IMAGE_ENCODER, inputs, embed_dim, s)


def _model_py(name: str) -> bytes:
    return resources.files("icl.model_repository").joinpath(name, "1", "model.py").read_bytes()


def write_repository(
    model: DualEncoder, out: Path, settings: CpuServingSettings | None = None
) -> list[ParityReport]:
    """Export `model` into a fresh CPU-flavour repository at `out` (replaced if present)."""
    s = settings or CpuServingSettings()
    cfg = model.config
    for name in (TEXT_ENCODER, IMAGE_ENCODER):
        shutil.rmtree(out / name, ignore_errors=True)
        (out / name / "1").mkdir(parents=True)
        (out / name / "1" / "model.py").write_bytes(_model_py(name))
    (out / TEXT_ENCODER / "config.pbtxt").write_text(render_text_encoder_config(cfg.output_dim, s))
    (out / IMAGE_ENCODER / "config.pbtxt").write_text(
        render_image_encoder_config(cfg.image_size, cfg.output_dim, s)
    )
    if cfg.text_tower.kind == "hf_encoder":
        # The served text model tokenises with the file shipped next to its graph.
        shutil.copyfile(tokenizer_files(cfg)[0], out / TEXT_ENCODER / "1" / TOKENIZER_FILE)
    return export_dual_encoder(
        model, out / TEXT_ENCODER / "1" / "model.onnx", out / IMAGE_ENCODER / "1" / "model.onnx"
    )
