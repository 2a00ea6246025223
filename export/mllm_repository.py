"""Write the Triton `mllm` model (python backend, decoupled) into a model repository.

Layout written under `out/`: mllm/config.pbtxt and mllm/1/model.py (the source lives in the
project's model_repository/mllm/1/model.py). The backend (registry name), its model path and
options are config parameters; the tensor contract is in docs/mllm.md.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from icl.mllm.registry import BACKENDS, NEEDS_PATH

MLLM_MODEL = "mllm"
KINDS = ("KIND_CPU", "KIND_GPU")


def mllm_config(
    backend: str,
    path: str | None,
    *,
    name: str = MLLM_MODEL,
    instances: int = 1,
    kind: str = "KIND_CPU",
    threads: int = 0,
    options: dict[str, Any] | None = None,
    max_images: int = 64,
    max_tokens_limit: int = 1024,
) -> mc.ModelConfig:
    """Triton's ModelConfig; raises ValueError on settings the model would refuse at load."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown MLLM backend {backend!r}; known: {sorted(BACKENDS)}")
    if backend in NEEDS_PATH and not path:
        raise ValueError(f"MLLM backend {backend!r} needs a model path")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if instances < 1 or threads < 0 or max_images < 1 or max_tokens_limit < 1:
        raise ValueError("instances, max_images, max_tokens_limit must be >= 1, threads >= 0")
    params = {
        "backend": backend,
        "path": path or "",
        "options": json.dumps(options or {}, sort_keys=True),
        "threads": str(threads),
        "max_images": str(max_images),
        "max_tokens_limit": str(max_tokens_limit),
    }
    # max_batch_size 0: one request is already a batch (all candidates of a query); a
    # decoupled model streams its responses, so Triton's batcher would not help.
    return mc.ModelConfig(
        name=name,
        backend="python",
        max_batch_size=0,
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        input=[
            mc.ModelInput(name="TASK", data_type=mc.TYPE_STRING, dims=[1]),
            mc.ModelInput(name="IMAGES", data_type=mc.TYPE_STRING, dims=[-1], optional=True),
            mc.ModelInput(name="PROMPTS", data_type=mc.TYPE_STRING, dims=[-1], optional=True),
            mc.ModelInput(name="MAX_TOKENS", data_type=mc.TYPE_INT32, dims=[1], optional=True),
        ],
        output=[
            mc.ModelOutput(name="P_YES", data_type=mc.TYPE_FP32, dims=[-1]),
            mc.ModelOutput(name="TEXT", data_type=mc.TYPE_STRING, dims=[1]),
            mc.ModelOutput(name="MODEL_KEY", data_type=mc.TYPE_STRING, dims=[1]),
            mc.ModelOutput(name="CAN_GENERATE", data_type=mc.TYPE_BOOL, dims=[1]),
        ],
        instance_group=[
            mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.Kind.Value(kind), count=instances)
        ],
        parameters={k: mc.ModelParameter(string_value=v) for k, v in params.items()},
    )


def render_mllm_config(backend: str, path: str | None, **settings: Any) -> str:
    """config.pbtxt text (keyword settings as `mllm_config`'s); raises ValueError likewise."""
    return text_format.MessageToString(
        mllm_config(backend, path, **settings), use_short_repeated_primitives=True
    )


def write_mllm_model(
    out: Path,
    backend: str,
    path: str | None,
    *,
    instances: int = 1,
    name: str = MLLM_MODEL,
    kind: str = "KIND_CPU",
    threads: int = 0,
    options: dict[str, Any] | None = None,
    max_images: int = 64,
    max_tokens_limit: int = 1024,
) -> Path:
    """Write `out/<name>/` (replaced if present) and return it. `path` is written as given:
    absolute, or relative to `out/<name>/` (weights shipped inside the model folder)."""
    config = render_mllm_config(
        backend,
        path,
        name=name,
        instances=instances,
        kind=kind,
        threads=threads,
        options=options,
        max_images=max_images,
        max_tokens_limit=max_tokens_limit,
    )
    folder = Path(out) / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "1").mkdir(parents=True)
    source = resources.files("icl.model_repository").joinpath(MLLM_MODEL, "1", "model.py")
    (folder / "1" / "model.py").write_bytes(source.read_bytes())
    (folder / "config.pbtxt").write_text(config)
    return folder
