"""Triton python-backend model `image_encoder` (CPU flavour): uint8 pixels -> embedding.

Input PIXELS is uint8 [H, W, 3] per item (resized by the caller to the size in config.pbtxt);
normalisation is inside the ONNX graph. Requests gathered by Triton's dynamic batcher are run
as one onnxruntime batch.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from icl.triton_models import load_onnx_session


class TritonPythonModel:
    def initialize(self, args):
        self.session = load_onnx_session(args, {"PIXELS": "pixels", "EMBEDDING": "embedding"})

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "PIXELS").as_numpy() for r in requests]
        embeddings = self.session.run(["embedding"], {"pixels": np.concatenate(arrays)})[0]
        responses, start = [], 0
        for array in arrays:
            out = pb_utils.Tensor(
                "EMBEDDING", embeddings[start : start + len(array)].astype(np.float32)
            )
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            start += len(array)
        return responses
