"""Triton python-backend model `text_encoder` (CPU flavour): raw text -> embedding.

Tokenisation happens here, so clients send plain UTF-8 text (TEXT, BYTES [1]) and never need
the tokenizer (one stub hop per batch; the GPU flavour needs a separate `tokenizer` model in
an ensemble because TensorRT cannot tokenise). The ONNX graph next to this file runs on
onnxruntime. Requests gathered by Triton's dynamic batcher are run as one onnxruntime batch.
"""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from icl.text.hf_tokenizer import serving_tokenizer
from icl.triton_models import decode_texts, load_onnx_session


class TritonPythonModel:
    def initialize(self, args):
        self.session = load_onnx_session(args, {"EMBEDDING": "embedding"})
        # A tokenizer.json shipped next to the ONNX graph (transformers text towers) wins;
        # otherwise CLIP BPE, the tokenizer of CLIP-style towers.
        folder = Path(args["model_repository"]) / args["model_version"]
        self.tokenizer = serving_tokenizer(folder, self.session.get_inputs()[0].shape[1])

    def execute(self, requests):
        texts, owners, responses = [], [], [None] * len(requests)
        for i, request in enumerate(requests):
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            decoded, error = decode_texts(raw)
            if error:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
                continue
            texts.extend(decoded)
            owners.append((i, len(decoded)))
        if texts:
            ids = self.tokenizer(texts)
            embeddings = self.session.run(["embedding"], {"input_ids": ids})[0]
            start = 0
            for i, count in owners:
                out = pb_utils.Tensor(
                    "EMBEDDING", embeddings[start : start + count].astype(np.float32)
                )
                responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
                start += count
        return responses
