"""In-process encoders on the exported ONNX graphs (offline evaluation, parity checks).

Same inputs and outputs as the Triton models, so offline and online rankings agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from icl.text.hf_tokenizer import serving_tokenizer


def onnx_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session; one inter-op thread, `threads` intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoders:
    def __init__(self, text_onnx: Path, image_onnx: Path, threads: int = 1) -> None:
        self._text = onnx_session(text_onnx, threads)
        self._image = onnx_session(image_onnx, threads)
        self._tokenizer = serving_tokenizer(text_onnx.parent, self._text.get_inputs()[0].shape[1])
        _, h, w, _ = self._image.get_inputs()[0].shape
        self._image_size = (int(h), int(w))

    @classmethod
    def from_repository(cls, repo: Path, threads: int = 1) -> OnnxEncoders:
        return cls(repo / "text_encoder/1/model.onnx", repo / "image_encoder/1/model.onnx", threads)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._text.run(["embedding"], {"input_ids": self._tokenizer(texts)})[0]

    def embed_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._image.run(["embedding"], {"pixels": pixels})[0]

    # The ports' async calls; in process there is nothing to wait on, so the deadline is
    # only checked by the caller.
    async def encode_texts(
        self, texts: Sequence[str], timeout_s: float | None = None
    ) -> np.ndarray:
        return self.embed_texts(texts)

    async def encode_images(self, pixels: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        return self.embed_images(pixels)
