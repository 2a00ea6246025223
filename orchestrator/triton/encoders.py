"""Text and image encoders served by Triton, reached with tritonclient's gRPC asyncio client."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from icl.orchestrator.logs import current_request_id
from icl.orchestrator.triton import readiness

TEXT_MODEL = "text_encoder"
IMAGE_MODEL = "image_encoder"
MODELS = (TEXT_MODEL, IMAGE_MODEL)


class EncoderUnavailable(RuntimeError):
    """Triton could not answer (down, model not ready, timed out); safe to retry."""


class TritonEncoders:
    """Both towers behind one Triton endpoint; implements the TextEncoder and ImageEncoder ports."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._client = readiness.client(url)
        self._image_size: tuple[int, int] = (0, 0)
        self.dim = 0
        self.max_batch_size = 1

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    async def start(self, ready_timeout_s: float = 60.0) -> None:
        """Wait for both models and read the shapes the rest of the service relies on."""
        if not await readiness.wait_until_ready(self._client, MODELS, ready_timeout_s):
            raise EncoderUnavailable(
                f"Triton at {self.url} did not serve {TEXT_MODEL} and {IMAGE_MODEL} "
                f"within {ready_timeout_s:.0f}s"
            )
        image = await self._client.get_model_metadata(IMAGE_MODEL, as_json=True)
        text = await self._client.get_model_metadata(TEXT_MODEL, as_json=True)
        _, h, w, _ = (int(d) for d in image["inputs"][0]["shape"])
        self._image_size = (h, w)
        self.dim = int(image["outputs"][0]["shape"][-1])
        text_dim = int(text["outputs"][0]["shape"][-1])
        if text_dim != self.dim:
            raise EncoderUnavailable(
                f"text ({text_dim}-d) and image ({self.dim}-d) embeddings differ"
            )
        config = await self._client.get_model_config(IMAGE_MODEL, as_json=True)
        self.max_batch_size = max(1, int(config["config"].get("max_batch_size", 1)))

    async def ready(self) -> bool:
        """Whether Triton serves both towers right now (the service's health follows it)."""
        return await readiness.models_ready(self._client, MODELS)

    async def _infer(
        self, model: str, inp: triton.InferInput, timeout_s: float | None
    ) -> np.ndarray:
        timeout = self.timeout_s if timeout_s is None else min(self.timeout_s, timeout_s)
        try:
            result = await self._client.infer(
                model,
                [inp],
                outputs=[triton.InferRequestedOutput("EMBEDDING")],
                client_timeout=max(timeout, 0.001),
                request_id=current_request_id(),  # Triton's logs and traces name the call
            )
        except InferenceServerException as exc:
            raise EncoderUnavailable(f"{model}: {exc.message()}") from None
        return result.as_numpy("EMBEDDING")

    async def encode_texts(
        self, texts: Sequence[str], timeout_s: float | None = None
    ) -> np.ndarray:
        data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        inp = triton.InferInput("TEXT", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        return await self._infer(TEXT_MODEL, inp, timeout_s)

    async def encode_images(self, pixels: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
        # Chunks of max_batch_size go out concurrently; Triton's dynamic batcher regroups them.
        async def one(chunk: np.ndarray) -> np.ndarray:
            inp = triton.InferInput("PIXELS", list(chunk.shape), "UINT8")
            inp.set_data_from_numpy(np.ascontiguousarray(chunk))
            return await self._infer(IMAGE_MODEL, inp, timeout_s)

        step = self.max_batch_size
        parts = await asyncio.gather(
            *(one(pixels[i : i + step]) for i in range(0, len(pixels), step))
        )
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    async def close(self) -> None:
        await self._client.close()
