"""Test stand-in for a TensorRT plan model: the same config, served by onnxruntime on CPU.

TensorRT cannot run on the project's machines, so the GPU-flavour tests swap each
`*_trt` model's `platform: "tensorrt_plan"` for this python-backend model, which runs the
very ONNX graph the plan would be built from (fp16 weights and activations), with the
plan's tensor names. Everything else in the GPU repository (ensembles, tokenizer) is real.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from icl.triton_models import load_onnx_session


class TritonPythonModel:
    def initialize(self, args):
        self.input = json.loads(args["model_config"])["input"][0]["name"]
        self.session = load_onnx_session(args, {self.input: self.input, "embedding": "embedding"})

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        embeddings = self.session.run(["embedding"], {self.input: np.concatenate(arrays)})[0]
        responses, start = [], 0
        for array in arrays:
            out = pb_utils.Tensor("embedding", embeddings[start : start + len(array)])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += len(array)
        return responses
