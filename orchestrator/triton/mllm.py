"""The async `Mllm` contract over Triton's `mllm` model (tritonclient gRPC asyncio, streaming).

Each call opens one gRPC stream carrying one request and reads responses until the one
flagged final (the model's tensor contract is in docs/mllm.md). Crops travel encoded: a crop
from the crop store as the bytes it was enrolled with (`icl.images.EncodedImage`), any other
array as PNG (lossless, so the server sees exactly the client's pixels).

Errors: `MllmUnavailable` when the answer cannot be had (server down, model missing or not
ready, timeout, the backend failed): THI then keeps the base ranking. `MllmRequestError` when
the model refused the request as malformed: a bug in the caller, not an outage.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from icl.images import encoded_bytes
from icl.orchestrator.logs import current_request_id
from icl.orchestrator.triton import readiness

MLLM_MODEL = "mllm"
_REFUSED = "invalid request:"


class MllmError(RuntimeError):
    """Base of the errors this client raises."""


class MllmUnavailable(MllmError):
    """Triton could not answer (down, model not ready, timed out, backend failure)."""


class MllmRequestError(MllmError):
    """The `mllm` model refused the request (bad inputs)."""


def encode_png(image: np.ndarray) -> bytes:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be uint8 RGB [H, W, 3], got {array.dtype} {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _bytes_input(name: str, values: Sequence[bytes]) -> triton.InferInput:
    data = np.array(list(values), dtype=np.object_).reshape(len(values))
    inp = triton.InferInput(name, [len(values)], "BYTES")
    inp.set_data_from_numpy(data)
    return inp


def _is_final(result: triton.InferResult) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


class TritonMllm:
    """Implements `icl.mllm.contract.Mllm` against a Triton server; call `start()` first."""

    def __init__(
        self,
        url: str,
        model: str = MLLM_MODEL,
        *,
        timeout_s: float = 60.0,
        generate_timeout_s: float = 300.0,
    ) -> None:
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.generate_timeout_s = generate_timeout_s
        self._client = readiness.client(url)
        self._model_key: str | None = None
        self._can_generate = False

    @property
    def model_key(self) -> str:
        if self._model_key is None:
            raise MllmUnavailable(f"TritonMllm({self.url}, {self.model}) is not started")
        return self._model_key

    @property
    def can_generate(self) -> bool:
        return self._can_generate

    async def start(self, ready_timeout_s: float = 0.0) -> None:
        """Wait up to `ready_timeout_s` for the model, then read its model_key."""
        if not await readiness.wait_until_ready(self._client, [self.model], ready_timeout_s):
            raise MllmUnavailable(f"Triton at {self.url} does not serve {self.model!r}")
        results = await self._request("info", timeout_s=self.timeout_s)
        self._model_key = results[0].as_numpy("MODEL_KEY").reshape(-1)[0].decode("utf-8")
        self._can_generate = bool(results[0].as_numpy("CAN_GENERATE").reshape(-1)[0])

    async def ready(self) -> bool:
        """Whether Triton serves the model right now (the service's health follows it)."""
        return await readiness.models_ready(self._client, [self.model])

    async def _stream(
        self,
        task: str,
        *,
        images: Sequence[np.ndarray] = (),
        prompts: Sequence[str] = (),
        max_tokens: int | None = None,
        timeout_s: float,
        encoded_images: Sequence[bytes] | None = None,
    ) -> AsyncIterator[triton.InferResult]:
        """One request's responses. IMAGES is sent when there are images, or when
        `encoded_images` (already encoded bytes, possibly none) is given."""
        inputs = [_bytes_input("TASK", [task.encode()])]
        if encoded_images is None and images:
            # A stored crop goes as the bytes it was enrolled with: no decode-encode round trip.
            encoded_images = [encoded_bytes(im) or encode_png(im) for im in images]
        if encoded_images is not None:
            inputs.append(_bytes_input("IMAGES", encoded_images))
        if prompts:
            inputs.append(_bytes_input("PROMPTS", [p.encode("utf-8") for p in prompts]))
        if max_tokens is not None:
            inp = triton.InferInput("MAX_TOKENS", [1], "INT32")
            inp.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
            inputs.append(inp)

        # Read here: the request iterator may run in the stream's own task.
        request_id = current_request_id()

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.model, "inputs": inputs, "request_id": request_id}

        responses = self._client.stream_infer(one_request(), stream_timeout=timeout_s)
        try:
            async for result, error in responses:
                if error is not None:
                    message = error.message()
                    kind = MllmRequestError if _REFUSED in message else MllmUnavailable
                    raise kind(f"{self.model}: {message}")
                yield result
                if _is_final(result):
                    return
        except grpc.RpcError as exc:  # deadline, connection refused, server gone
            raise MllmUnavailable(f"{self.model} at {self.url}: {exc.code().name}") from None
        except InferenceServerException as exc:
            raise MllmUnavailable(f"{self.model} at {self.url}: {exc.message()}") from None
        finally:
            # Also when the caller gave up (timeout, cancelled task): Triton then flags the
            # request cancelled and the `mllm` model stops working on it.
            responses.cancel()

    async def _request(self, task: str, *, timeout_s: float, **kwargs: Any) -> list[Any]:
        async def collect() -> list[Any]:
            return [r async for r in self._stream(task, timeout_s=timeout_s, **kwargs)]

        try:
            results = await asyncio.wait_for(collect(), timeout_s)
        except TimeoutError:
            raise MllmUnavailable(f"{self.model}: no answer within {timeout_s:.0f}s") from None
        if not results:
            raise MllmUnavailable(f"{self.model}: the stream ended without a response")
        return results

    async def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        if not images:
            return []
        results = await self._request(
            "score", images=images, prompts=prompts, timeout_s=self.timeout_s
        )
        p_yes = results[-1].as_numpy("P_YES")
        if p_yes is None or p_yes.shape != (len(images),):
            raise MllmUnavailable(f"{self.model}: P_YES for {len(images)} images not returned")
        return [float(p) for p in p_yes]

    async def stream_generate(
        self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256
    ) -> AsyncIterator[str]:
        """The answer's pieces as the model produces them (joined and stripped = generate)."""
        async for result in self._stream(
            "generate",
            images=images,
            prompts=[prompt],
            max_tokens=max_tokens,
            timeout_s=self.generate_timeout_s,
        ):
            piece = result.as_numpy("TEXT")
            if piece is not None:
                yield piece.reshape(-1)[0].decode("utf-8")

    async def generate(
        self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256
    ) -> str:
        results = await self._request(
            "generate",
            images=images,
            prompts=[prompt],
            max_tokens=max_tokens,
            timeout_s=self.generate_timeout_s,
        )
        pieces = [r.as_numpy("TEXT") for r in results]
        return "".join(p.reshape(-1)[0].decode("utf-8") for p in pieces if p is not None).strip()

    async def close(self) -> None:
        await self._client.close()


__all__ = ["MllmError", "MllmRequestError", "MllmUnavailable", "TritonMllm", "encode_png"]
