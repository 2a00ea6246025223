"""Triton python-backend model `tokenizer` (GPU flavour): raw text -> token ids.

The first step of the GPU flavour's `text_encoder` ensemble (TensorRT cannot tokenise), so
clients send plain UTF-8 text (TEXT, BYTES [1]) in both flavours. Output INPUT_IDS is int64
[L], L from config.pbtxt; a tokenizer.json next to this file means that tokenizer, none
means CLIP BPE (the same rule as the CPU flavour's text_encoder).
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from icl.text.hf_tokenizer import serving_tokenizer
from icl.triton_models import decode_texts, output_dims


class TritonPythonModel:
    def initialize(self, args):
        (length,) = output_dims(args, "INPUT_IDS")
        folder = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = serving_tokenizer(folder, length)

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts, error = decode_texts(raw)
            if error:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(error)))
                continue
            ids = pb_utils.Tensor("INPUT_IDS", self.tokenizer(texts).astype(np.int64))
            responses.append(pb_utils.InferenceResponse(output_tensors=[ids]))
        return responses
