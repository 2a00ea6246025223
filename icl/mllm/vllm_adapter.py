"""The MLLM contract over Triton's vLLM backend: what the `mllm` model runs on a GPU deployment.

Qwen2-VL runs in the `mllm_vllm` model (backend "vllm"); its tensors are not THI's contract
(one prompt per request, the chat template rendered by the caller, base64 images, P(Yes) only
through log-probabilities). `VllmAdapterBackend` is an `MllmBackend` that speaks that
contract, so the `mllm` model, `TritonMllm` and THI stay unchanged (docs/mllm.md):

- prompts are rendered with the model directory's own chat template (`render_chat`, the code
  `Qwen2VLBackend` uses), one image placeholder per crop, which vLLM expands;
- each crop is fitted to the pixel budget first (`fit_to_budget`, aspect kept, 28 px grid),
  so vLLM's own resize (mm_processor_kwargs min/max_pixels = the budget) is a no-op and the
  visual tokens are the in-process backend's; crops travel as base64 PNG (lossless);
- `score`: one request per (crop, prompt) pair, all in flight at once (vLLM batches them),
  each `max_tokens 1, temperature 0, logprobs K` with `return_logprobs`; P(Yes) = softmax of
  the pooled "Yes" against the pooled "No" log-probabilities of the first answer token (the
  ids of `answer_token_ids`, as in-process: with every id present this is exactly the
  in-process two-logit softmax, log-softmax differing from logits by a constant);
- `generate`: one streamed request (greedy: temperature 0), pieces forwarded as they come;
- `model_key`: `model_key_for` on the same directory, with `image_pixels` and the dtype the
  engine runs (model.json's), so the key is the CPU path's for the same weights and dtype.

The transport is injected (`VllmTransport`): the `mllm` model passes a BLS transport
(model_repository/mllm/1/model.py); this module imports nothing of Triton.

Log-probabilities when an answer word is not among the top K returned: its probability is
at most the smallest one returned and at most the mass not returned, so that bound is used
(P(Yes) is never more extreme than the data allows); when neither word is returned the
model is not answering the question, and P(Yes) is 0 (logged).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from icl.mllm.contract import MllmCancelled
from icl.mllm.qwen2vl import (
    answer_token_ids,
    chat_template_of,
    fit_to_budget,
    model_key_for,
    render_chat,
)

log = logging.getLogger(__name__)

VLLM_MODEL = "mllm_vllm"
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class VllmRequest:
    """The inputs of one request to Triton's vLLM backend (tensor names in comments)."""

    text_input: str  # text_input BYTES [1]: already rendered with the chat template
    images: tuple[bytes, ...]  # image BYTES [-1]: base64 of PNG
    sampling_parameters: Mapping[str, Any]  # sampling_parameters BYTES [1]: JSON
    stream: bool = False  # stream BOOL [1]
    return_logprobs: bool = False  # return_logprobs BOOL [1]
    exclude_input_in_output: bool = True  # exclude_input_in_output BOOL [1]

    def sampling_json(self) -> str:
        return json.dumps(dict(self.sampling_parameters), sort_keys=True)


@dataclass(frozen=True)
class VllmOutput:
    """One response: the new text (`text_output`) and, when asked, the new tokens' top
    log-probabilities (`logprobs`: one {token id: logprob} per generated token)."""

    text: str
    logprobs: list[dict[int, float]] | None = field(default=None)


class VllmTransport(Protocol):
    """Sends requests to the vLLM model. `submit` puts every request in flight before
    returning, then each iterator yields that request's responses in order."""

    def submit(self, requests: Sequence[VllmRequest]) -> list[Iterator[VllmOutput]]: ...


def parse_logprobs(raw: bytes | str) -> list[dict[int, float]] | None:
    """The `logprobs` output tensor element: JSON `[{token_id: {"logprob", "rank",
    "decoded_token"}}, ...]` (one dict per new token; "null" when not requested)."""
    data = json.loads(raw)
    if data is None:
        return None
    return [{int(k): float(v["logprob"]) for k, v in step.items()} for step in data]


def pooled(logprobs: Mapping[int, float], ids: Sequence[int]) -> float | None:
    """logsumexp of the listed ids' log-probabilities (None when none of them is listed)."""
    values = [logprobs[i] for i in ids if i in logprobs]
    if not values:
        return None
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def p_yes(logprobs: Mapping[int, float], yes_ids: Sequence[int], no_ids: Sequence[int]) -> float:
    """P(Yes) = softmax over {pooled Yes, pooled No} of the first answer token's top
    log-probabilities; a word missing from them gets the bound of its probability (the
    smallest listed, and the mass not listed), neither listed gives 0."""
    yes, no = pooled(logprobs, yes_ids), pooled(logprobs, no_ids)
    if yes is None and no is None:
        log.warning("neither Yes nor No among the %d returned log-probabilities", len(logprobs))
        return 0.0
    if yes is None or no is None:
        listed = list(logprobs.values())
        rest = 1.0 - sum(math.exp(v) for v in listed)
        bound = min(min(listed), math.log(rest) if rest > 0 else -math.inf)
        yes = bound if yes is None else yes
        no = bound if no is None else no
    if no == -math.inf:
        return 1.0
    if yes == -math.inf:
        return 0.0
    return 1.0 / (1.0 + math.exp(no - yes))  # sigmoid(yes - no), as in-process


def encode_png_b64(image: Any) -> bytes:
    """A PIL image as base64 of lossless PNG (what the vLLM backend's `image` input takes)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue())


class VllmAdapterBackend:
    """`MllmBackend` for a Qwen2-VL-class directory served by `mllm_vllm` (module docstring).

    Loads only the tokenizer of `path` (chat template, Yes/No ids); the weights are read
    from `path` for `model_key` (sampled) but never loaded here.
    """

    can_generate = True
    can_stream = True  # generate() takes on_text
    can_stop = True  # score() and generate() take should_stop

    def __init__(
        self,
        path: str | Path,
        *,
        transport: VllmTransport,
        image_pixels: int = 224 * 224,
        dtype: str = "bfloat16",
        logprobs: int = 20,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
    ) -> None:
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a model directory (no config.json)")
        if image_pixels < 28 * 28:
            raise ValueError("image_pixels must be at least 28*28 (one visual token)")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} (the engine's), got {dtype!r}")
        if logprobs < 2:
            raise ValueError("logprobs must be >= 2 (Yes and No)")
        self.transport = transport
        self.image_pixels = int(image_pixels)
        self.logprobs = int(logprobs)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.chat_template = chat_template_of(self.tokenizer, self.path)
        self.yes_ids = answer_token_ids(self.tokenizer, "Yes")
        self.no_ids = answer_token_ids(self.tokenizer, "No")
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"Yes and No share token ids {self.yes_ids} / {self.no_ids}")
        # The CPU path keys with str(torch dtype), e.g. "torch.bfloat16": the same here.
        self.model_key = model_key_for(
            self.path, image_pixels=self.image_pixels, dtype=f"torch.{dtype}"
        )

    def _images(self, images: Sequence[np.ndarray]) -> tuple[bytes, ...]:
        return tuple(encode_png_b64(fit_to_budget(im, self.image_pixels)) for im in images)

    def requests_for_score(
        self, images: Sequence[np.ndarray], prompts: Sequence[str]
    ) -> list[VllmRequest]:
        if len(prompts) == 1:
            prompts = [prompts[0]] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        sampling = {"max_tokens": 1, "temperature": 0.0, "logprobs": self.logprobs}
        return [
            VllmRequest(
                render_chat(self.tokenizer, self.chat_template, 1, prompt),
                self._images([image]),
                sampling,
                return_logprobs=True,
            )
            for image, prompt in zip(images, prompts, strict=True)
        ]

    def score(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        should_stop: Callable[[], bool] = lambda: False,
    ) -> list[float]:
        """P(Yes) per pair; one prompt is used for every image. All requests in flight."""
        if not images:
            return []
        streams = self.transport.submit(self.requests_for_score(images, prompts))
        out = []
        for i, responses in enumerate(streams):
            first: dict[int, float] | None = None
            for response in responses:
                if should_stop():
                    raise MllmCancelled
                if first is None and response.logprobs:
                    first = response.logprobs[0]
            if first is None:
                raise RuntimeError(f"mllm_vllm returned no logprobs for pair {i}")
            out.append(p_yes(first, self.yes_ids, self.no_ids))
        return out

    def request_for_generate(
        self, images: Sequence[np.ndarray], prompt: str, max_tokens: int
    ) -> VllmRequest:
        sampling = {"max_tokens": int(max_tokens), "temperature": self.temperature}
        return VllmRequest(
            render_chat(self.tokenizer, self.chat_template, len(images), prompt),
            self._images(images),
            sampling,
            stream=True,
        )

    def generate(
        self,
        images: Sequence[np.ndarray],
        prompt: str,
        max_tokens: int | None = None,
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> str:
        """Greedy answer to `prompt` about `images`, streamed to `on_text` piece by piece."""
        limit = self.max_new_tokens if max_tokens is None else int(max_tokens)
        if limit < 1:
            raise ValueError("max_tokens must be >= 1")
        (responses,) = self.transport.submit([self.request_for_generate(images, prompt, limit)])
        pieces = []
        for response in responses:
            if should_stop():
                raise MllmCancelled
            if response.text:
                pieces.append(response.text)
                if on_text is not None:
                    on_text(response.text)
        return "".join(pieces).strip()


__all__ = [
    "VLLM_MODEL",
    "VllmAdapterBackend",
    "VllmOutput",
    "VllmRequest",
    "VllmTransport",
    "encode_png_b64",
    "p_yes",
    "parse_logprobs",
    "pooled",
]
