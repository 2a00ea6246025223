"""Triton python-backend model `image_encoder` (CPU flavour): uint8 pixels -> embedding.

Input PIXELS is uint8 [H, W, 3] per item (resized by the caller to the size in config.pbtxt);
normalisation is inside the ONNX graph. Requests gathered by Triton's dynamic batcher are run
as one onnxruntime batch.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params["onnx_file"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "PIXELS").as_numpy() for r in requests]
        embeddings = self.session.run(["embedding"], {"pixels": np.concatenate(arrays)})[0]
        responses, start = [], 0
        for array in arrays:
            out = pb_utils.Tensor("EMBEDDING", embeddings[start : start + len(array)].astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += len(array)
        return responses
