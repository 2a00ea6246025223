"""Triton python-backend model `mllm`: any `MllmBackend` behind one decoupled model.

The backend comes from config parameters (written by icl.export.mllm_repository):
`backend` ("qwen2vl" | "demo" | "vllm"), `path` (model directory; relative paths are taken from this
model's folder), `options` (JSON keyword arguments for the backend), `threads` (torch
intra-op threads of this instance).

Tensor contract (model_repository/README.md, docs/mllm.md):
  inputs  TASK BYTES [1]          "score" | "generate" | "info"
          IMAGES BYTES [-1]       encoded PNG/JPEG crops (optional: generate may have none)
          PROMPTS BYTES [-1]      score: one per image or one for all; generate: exactly one
          MAX_TOKENS INT32 [1]    generate only, optional
  outputs P_YES FP32 [-1]         score: one response, one value per image
          TEXT BYTES [1]          generate: streamed pieces; the last one carries the final flag
          MODEL_KEY BYTES [1]     info: the backend's model_key, and CAN_GENERATE BOOL [1]
Every request ends with exactly one response flagged final. A request this model refuses
gets an error response starting with "invalid request:"; a backend failure one starting with
"backend failed:"; the stub never dies on a request. A request whose client gave up (its
stream was cancelled) is dropped between steps: before it starts, after decoding its images,
inside backends that take `should_stop` (`can_stop`), and per streamed piece.

Backend "vllm" (GPU): the backend renders prompts and fits crops here and sends the requests
to the vLLM model (option `vllm_model`, default "mllm_vllm") in the same server through BLS
(`BlsVllmTransport` below): every score pair in flight at once, generate streamed.
"""

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

from icl.mllm.contract import MllmCancelled
from icl.mllm.registry import NEEDS_TRANSPORT, load_backend
from icl.triton_models import model_config, model_parameters

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TASKS = ("score", "generate", "info")
MAX_IMAGE_SIDE = 4096  # refuse decompression bombs before decoding

log = logging.getLogger("mllm")


class BadRequest(ValueError):
    pass


class Cancelled(Exception):
    pass


def _cancelled(request):
    """Whether the client gave up on this request (Triton propagates a cancelled gRPC stream
    to `request.is_cancelled()` in decoupled python models)."""
    return request.is_cancelled()


def _strings(request, name, required=True):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise BadRequest(f"{name} is missing")
        return None
    return [v if isinstance(v, bytes) else bytes(v) for v in tensor.as_numpy().reshape(-1)]


def _text(raw, name):
    try:
        return [r.decode("utf-8") for r in raw]
    except UnicodeDecodeError as exc:
        raise BadRequest(f"{name} is not valid UTF-8: {exc}") from None


def _image(data, i):
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in ("PNG", "JPEG"):
                raise BadRequest(f"IMAGES[{i}] is {img.format}, expected PNG or JPEG")
            if max(img.size) > MAX_IMAGE_SIDE:
                raise BadRequest(f"IMAGES[{i}] is {img.size}, larger than {MAX_IMAGE_SIDE} px")
            return np.asarray(img.convert("RGB"))
    except BadRequest:
        raise
    except Exception as exc:  # PIL raises several types for corrupt data
        raise BadRequest(f"IMAGES[{i}] is not a decodable PNG/JPEG image: {exc}") from None


class BlsVllmTransport:
    """`icl.mllm.vllm_adapter.VllmTransport` over BLS to Triton's vLLM backend (decoupled).

    `submit` puts every request in flight at once, so the engine sees them together and
    batches them."""

    OUTPUTS = ("text_output", "logprobs")
    MAX_IN_FLIGHT = 64  # the most score pairs a request holds (max_images)

    def __init__(self, model_name):
        self.model_name = model_name

    def _inputs(self, r):
        def one(name, value, dtype):
            return pb_utils.Tensor(name, np.array([value], dtype=dtype))

        tensors = [
            one("text_input", r.text_input.encode("utf-8"), np.object_),
            one("sampling_parameters", r.sampling_json().encode("utf-8"), np.object_),
            one("stream", r.stream, bool),
            one("exclude_input_in_output", r.exclude_input_in_output, bool),
            one("return_logprobs", r.return_logprobs, bool),
        ]
        if r.images:
            tensors.append(pb_utils.Tensor("image", np.array(list(r.images), dtype=np.object_)))
        return tensors

    def _outputs(self, iterator):
        from icl.mllm.vllm_adapter import VllmOutput, parse_logprobs

        done = False
        try:
            for response in iterator:
                if response.has_error():
                    raise RuntimeError(f"{self.model_name}: {response.error().message()}")
                text = pb_utils.get_output_tensor_by_name(response, "text_output")
                if text is None:  # the empty final response of a decoupled model
                    continue
                raw = text.as_numpy().reshape(-1)
                piece = b"".join(bytes(v) for v in raw).decode("utf-8")
                lp = pb_utils.get_output_tensor_by_name(response, "logprobs")
                logprobs = (
                    parse_logprobs(bytes(lp.as_numpy().reshape(-1)[0])) if lp is not None else None
                )
                yield VllmOutput(piece, logprobs)
            done = True
        finally:  # abandoned (the client gave up): stop the engine's work where supported
            cancel = getattr(iterator, "cancel", None)
            if not done and cancel is not None:
                cancel()

    def submit(self, requests):
        bls = [
            pb_utils.InferenceRequest(
                model_name=self.model_name,
                inputs=self._inputs(r),
                requested_output_names=list(self.OUTPUTS),
            )
            for r in requests
        ]
        if len(bls) == 1:
            return [self._outputs(bls[0].exec(decoupled=True))]
        # A decoupled exec() returns once the request's first response has arrived, so one
        # caller would run the requests one after another; threads put them all in flight
        # (what the python backend's async_exec does: exec in an executor).
        with ThreadPoolExecutor(max_workers=min(len(bls), self.MAX_IN_FLIGHT)) as pool:
            iterators = list(pool.map(lambda b: b.exec(decoupled=True), bls))
        return [self._outputs(it) for it in iterators]


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        name = config["name"]
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise ValueError(f"model {name}: needs model_transaction_policy {{ decoupled: true }}")
        params = model_parameters(config)
        threads = int(params.get("threads", "0") or 0)
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        path = params.get("path") or None
        if path and not Path(path).is_absolute():
            path = str(Path(args["model_repository"]) / path)
        options = json.loads(params.get("options") or "{}")
        self.max_images = int(params.get("max_images", "64"))
        self.max_tokens_limit = int(params.get("max_tokens_limit", "1024"))
        backend = params.get("backend", "")
        if backend in NEEDS_TRANSPORT:
            options["transport"] = BlsVllmTransport(options.pop("vllm_model", "mllm_vllm"))
        self.backend = load_backend(backend, path, **options)
        self.model_key = self.backend.model_key
        self.streams = bool(getattr(self.backend, "can_stream", False))
        self.stops = bool(getattr(self.backend, "can_stop", False))
        log.info("model %s: backend %s, model_key %s", name, params.get("backend"), self.model_key)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._handle(request, sender)
            except BadRequest as exc:
                self._error(sender, f"invalid request: {exc}")
            except (Cancelled, MllmCancelled):
                # The client is gone: stop here, so the instance moves on to live requests
                # instead of finishing work nobody waits for.
                sender.send(flags=FINAL)
            except Exception as exc:  # never let one request take the stub down
                log.exception("mllm request failed")
                self._error(sender, f"backend failed: {type(exc).__name__}: {exc}")
        return None

    @staticmethod
    def _error(sender, message):
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)

    def _handle(self, request, sender):
        if _cancelled(request):  # given up while it queued
            raise Cancelled
        task = _text(_strings(request, "TASK"), "TASK")
        if len(task) != 1 or task[0] not in TASKS:
            raise BadRequest(f"TASK must be one of {', '.join(TASKS)}; got {task}")
        if task[0] == "info":
            outputs = [
                pb_utils.Tensor("MODEL_KEY", np.array([self.model_key.encode()], dtype=np.object_)),
                pb_utils.Tensor("CAN_GENERATE", np.array([self.backend.can_generate], dtype=bool)),
            ]
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL)
            return
        raw_images = _strings(request, "IMAGES", required=False) or []
        if len(raw_images) > self.max_images:
            raise BadRequest(f"{len(raw_images)} IMAGES, at most {self.max_images} per request")
        prompts = _text(_strings(request, "PROMPTS", required=False) or [], "PROMPTS")
        if task[0] == "score":
            self._score(request, raw_images, prompts, sender)
        else:
            self._generate(request, raw_images, prompts, sender)

    def _stop_check(self, request):
        """Keyword arguments that let a backend stop between its steps for this request."""
        return {"should_stop": lambda: _cancelled(request)} if self.stops else {}

    def _score(self, request, raw_images, prompts, sender):
        if not raw_images:
            raise BadRequest("score needs at least one image in IMAGES")
        if len(prompts) not in (1, len(raw_images)):
            raise BadRequest(f"score needs 1 or {len(raw_images)} PROMPTS, got {len(prompts)}")
        images = [_image(data, i) for i, data in enumerate(raw_images)]
        if _cancelled(request):
            raise Cancelled
        p_yes = self.backend.score(images, prompts, **self._stop_check(request))
        p_yes = np.asarray(p_yes, dtype=np.float32)
        if p_yes.shape != (len(images),):
            raise RuntimeError(f"backend returned {p_yes.shape} scores for {len(images)} images")
        out = pb_utils.Tensor("P_YES", p_yes)
        sender.send(pb_utils.InferenceResponse(output_tensors=[out]), flags=FINAL)

    def _generate(self, request, raw_images, prompts, sender):
        # `can_generate` False means no free text (THI then merges answers itself); such a
        # backend may still answer the VQA prompt, and refuses other prompts with ValueError.
        if len(prompts) != 1:
            raise BadRequest(f"generate needs exactly one prompt in PROMPTS, got {len(prompts)}")
        max_tokens = self.max_tokens_limit
        tensor = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
        if tensor is not None:
            values = tensor.as_numpy().reshape(-1)
            if values.size != 1 or not 1 <= int(values[0]) <= self.max_tokens_limit:
                raise BadRequest(f"MAX_TOKENS must be one value in 1..{self.max_tokens_limit}")
            max_tokens = int(values[0])
        images = [_image(data, i) for i, data in enumerate(raw_images)]
        if _cancelled(request):
            raise Cancelled

        def text_response(piece):
            out = pb_utils.Tensor("TEXT", np.array([piece.encode("utf-8")], dtype=np.object_))
            return pb_utils.InferenceResponse(output_tensors=[out])

        if not self.streams:
            try:
                text = self.backend.generate(
                    images, prompts[0], max_tokens, **self._stop_check(request)
                )
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            sender.send(text_response(text), flags=FINAL)
            return
        # Hold one piece back so the last piece can carry the final flag (clients cannot ask
        # for an empty final response through tritonclient's aio stream_infer).
        held = []

        def on_text(piece):
            if _cancelled(request):
                raise Cancelled
            if held:
                sender.send(text_response(held.pop()))
            held.append(piece)

        self.backend.generate(
            images, prompts[0], max_tokens, on_text=on_text, **self._stop_check(request)
        )
        sender.send(text_response(held.pop() if held else ""), flags=FINAL)
