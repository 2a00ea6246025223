"""Export the two towers of a dual encoder to ONNX and check them against torch.

Tensor names are part of the serving contract and are the same in every flavour:
text tower `input_ids` (int64 [B, L]) -> `embedding` (fp32 [B, D]);
image tower `pixels` (uint8 [B, H, W, 3]) -> `embedding` (fp32 [B, D]).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from icl.models.dual_encoder import DualEncoder
from icl.onnx_encoders import onnx_session

OPSET = 17
MIN_COSINE_FP32 = 0.9999
PARITY_TEXTS = (
    "a woman in a red coat carrying a black backpack",
    "The man wears a white short-sleeved shirt, blue jeans and black shoes.",
    "young person with long brown hair",
)


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch model closely enough."""


@dataclass(frozen=True)
class ParityReport:
    tower: str
    min_cosine: float
    max_abs_diff: float


def _export(module: torch.nn.Module, example: torch.Tensor, input_name: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The TorchScript exporter at opset 17 is the one TensorRT parsers handle best; its
    # deprecation notice is not actionable here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _torch_export(module, example, input_name, path)
    onnx.checker.check_model(str(path), full_check=True)


def _torch_export(
    module: torch.nn.Module, example: torch.Tensor, input_name: str, path: Path
) -> None:
    torch.onnx.export(
        module,
        (example,),
        str(path),
        input_names=[input_name],
        output_names=["embedding"],
        dynamic_axes={input_name: {0: "batch"}, "embedding": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )


def _parity(
    tower: str, module: torch.nn.Module, path: Path, inputs: np.ndarray, name: str
) -> ParityReport:
    with torch.no_grad():
        ref = module(torch.from_numpy(inputs)).numpy()
    got = onnx_session(path).run(["embedding"], {name: inputs})[0]
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    report = ParityReport(tower, float(cos.min()), float(np.abs(ref - got).max()))
    if report.min_cosine < MIN_COSINE_FP32:
        raise ParityError(
            f"{tower} ONNX export at {path} differs from torch: min cosine "
            f"{report.min_cosine:.6f} < {MIN_COSINE_FP32} (max abs diff {report.max_abs_diff:.2e})"
        )
    return report


def export_dual_encoder(
    model: DualEncoder, text_path: Path, image_path: Path
) -> list[ParityReport]:
    """Write both towers to ONNX, validate them with onnx.checker and check parity."""
    model = model.eval()
    cfg = model.config
    from icl.models.pretrained import tokenizer_for

    ids = tokenizer_for(cfg)(PARITY_TEXTS)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, *cfg.image_size, 3), dtype=np.uint8)
    _export(model.text, torch.from_numpy(ids[:2]), "input_ids", text_path)
    _export(model.image, torch.from_numpy(pixels[:2]), "pixels", image_path)
    return [
        _parity("text", model.text, text_path, ids, "input_ids"),
        _parity("image", model.image, image_path, pixels, "pixels"),
    ]
