"""Test stand-in for Triton's vLLM backend (`mllm_vllm`): its tensors, answered by transformers.

vLLM needs a GPU and cannot be installed on the project's machines. This python-backend model
speaks the vLLM backend's request/response contract as triton-inference-server/vllm_backend
defines it in src/model.py (auto-completed tensors) and src/utils/request.py (how they are
read and answered); see docs/mllm.md for the release followed:

  in   text_input BYTES [1]            the prompt, already rendered with the chat template
       image BYTES [-1] (optional)     base64 PNG/JPEG, decoded with PIL .convert("RGB")
       stream BOOL [1] (optional)      one response per new piece of text
       sampling_parameters BYTES [1]   JSON of vLLM SamplingParams (max_tokens, temperature,
                                       logprobs)
       exclude_input_in_output BOOL [1]  unset and not streaming: the prompt is prepended;
                                       False with stream is refused (as the backend does)
       return_logprobs BOOL [1]        adds `logprobs`
  out  text_output BYTES [-1]          the new text since the last response
       logprobs BYTES [-1]             JSON [{token_id: {"logprob", "rank", "decoded_token"}}]
                                       per new token: the top `logprobs` plus the sampled one

The engine is the tiny random Qwen2-VL the tests build, loaded through Qwen2VLBackend (the
model, tokenizer and image processor; its chat rendering is NOT used: the prompt arrives
rendered). Each placeholder image token is expanded to the image's merged-patch count, as
vLLM's Qwen2-VL processor does. One request runs at a time (no batching: a real engine
batches, which changes nothing in the numbers beyond float noise). Supported: greedy
(temperature 0) only, and logprobs only with max_tokens 1: what the adapter sends.
"""

import base64
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from PIL import Image

from icl.mllm.qwen2vl import Qwen2VLBackend, _Collector

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def _bytes_out(name, values):
    return pb_utils.Tensor(name, np.array([v.encode("utf-8") for v in values], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(2)
        folder = Path(args["model_repository"]) / args["model_version"]
        engine = json.loads((folder / "model.json").read_text())  # vLLM engine args
        pixels = engine.get("mm_processor_kwargs", {}).get("max_pixels", 224 * 224)
        self.max_logprobs = int(engine.get("max_logprobs", 20))
        self.llm = Qwen2VLBackend(engine["model"], image_pixels=int(pixels))
        self.tokenizer = self.llm.tokenizer
        # Test hook: when the config names a file, each request's start and end times are
        # appended to it (to see whether requests overlap).
        config = json.loads(args["model_config"])
        self.timeline = config.get("parameters", {}).get("timeline", {}).get("string_value")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            start = time.monotonic()
            try:
                self._run(request, sender)
            except Exception as exc:  # an error response, as the vLLM backend sends
                sender.send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=FINAL
                )
            if self.timeline:
                with open(self.timeline, "a") as f:
                    f.write(json.dumps([start, time.monotonic()]) + "\n")
        return None

    def _run(self, request, sender):
        prompt = _input(request, "text_input")[0].decode("utf-8")
        images = []
        raw_images = _input(request, "image")
        for item in raw_images if raw_images is not None else []:
            data = base64.b64decode(bytes(item).decode("utf-8"))
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        stream = _input(request, "stream")
        stream = bool(stream[0]) if stream is not None else False
        exclude = _input(request, "exclude_input_in_output")
        prepend = (not bool(exclude[0])) if exclude is not None else not stream
        if prepend and stream:
            raise ValueError("When streaming, `exclude_input_in_output` = False is not allowed.")
        raw = _input(request, "sampling_parameters")
        params = json.loads(raw[0].decode("utf-8")) if raw is not None else {}
        want_logprobs = _input(request, "return_logprobs")
        want_logprobs = bool(want_logprobs[0]) if want_logprobs is not None else False
        max_tokens = int(params.get("max_tokens", 16))
        if float(params.get("temperature", 1.0)) != 0.0:
            raise ValueError("stand-in: only greedy decoding (temperature 0) is implemented")
        batch = self._encode(prompt, images)
        if want_logprobs or params.get("logprobs") is not None:
            if max_tokens != 1:
                raise ValueError("stand-in: logprobs only with max_tokens 1")
            self._first_token(batch, int(params.get("logprobs") or 0), prompt, prepend, sender)
            return
        pieces = []

        def on_text(piece):
            if stream:
                sender.send(
                    pb_utils.InferenceResponse(output_tensors=[_bytes_out("text_output", [piece])])
                )
            pieces.append(piece)

        collector = _Collector(self.tokenizer, on_text)
        with torch.inference_mode():
            self.llm.model.generate(
                **batch,
                max_new_tokens=max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.llm.pad_token_id,
                streamer=collector,
            )
        if stream:
            sender.send(flags=FINAL)
        else:
            text = (prompt if prepend else "") + "".join(pieces)
            out = [_bytes_out("text_output", [text])]
            sender.send(pb_utils.InferenceResponse(output_tensors=out), flags=FINAL)

    def _encode(self, prompt, images):
        """Token ids of the rendered prompt, each image token expanded, plus pixel inputs."""
        llm = self.llm
        batch = {}
        if images:
            vision = llm.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = vision["pixel_values"]
            batch["image_grid_thw"] = vision["image_grid_thw"]
            counts = (vision["image_grid_thw"].prod(-1) // llm.merge_length).tolist()
            prompt = llm._expand_image_tokens([prompt], counts)[0]
        tokens = self.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
        batch["input_ids"] = tokens["input_ids"]
        batch["attention_mask"] = tokens["attention_mask"]
        if images:
            batch["mm_token_type_ids"] = (tokens["input_ids"] == llm.image_token_id).int()
        return batch

    def _first_token(self, batch, k, prompt, prepend, sender):
        if k > self.max_logprobs:  # vLLM refuses more than the engine's max_logprobs
            raise ValueError(
                f"Requested sample logprobs of {k}, which is greater than max allowed: "
                f"{self.max_logprobs}"
            )
        with torch.inference_mode():
            logits = self.llm.model(**batch, logits_to_keep=1).logits[0, -1, :].float()
        logprobs = torch.log_softmax(logits, dim=-1)  # raw model log-probabilities
        order = torch.argsort(logprobs, descending=True, stable=True).tolist()
        sampled = order[0]  # greedy
        step = {}
        for token_id in [*order[:k], sampled]:
            step[str(token_id)] = {
                "logprob": float(logprobs[token_id])
                if math.isfinite(float(logprobs[token_id]))
                else -9999.0,
                "rank": order.index(token_id) + 1,
                "decoded_token": self.tokenizer.decode([token_id]),
            }
        text = self.tokenizer.decode([sampled], skip_special_tokens=True)
        outputs = [
            _bytes_out("text_output", [(prompt if prepend else "") + text]),
            _bytes_out("logprobs", [json.dumps([step])]),
        ]
        sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL)
