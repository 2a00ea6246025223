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
# Torch intra-op threads per instance when none are given (0: torch's default, all cores).
# The demo model is a small CNN on one 128x48 crop at a time: a second thread gains little
# and, under load, fights the encoders, the service and Milvus for the same cores (a yes/no
# call took 95 ms with 2 threads against 10 ms with 1 on a busy 2-core machine).
DEFAULT_THREADS = {"demo": 1}


def mllm_config(
    backend: str,
    path: str | None,
    *,
    name: str = MLLM_MODEL,
    instances: int = 1,
    kind: str = "KIND_CPU",
    threads: int | None = None,
    options: dict[str, Any] | None = None,
    max_images: int = 64,
    max_tokens_limit: int = 1024,
) -> mc.ModelConfig:
    """Triton's ModelConfig; raises ValueError on settings the model would refuse at load.
    `threads` None: the backend's default (DEFAULT_THREADS)."""
    if threads is None:
        threads = DEFAULT_THREADS.get(backend, 0)
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
    threads: int | None = None,
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


# Triton's vLLM backend (triton-inference-server/vllm_backend src/model.py auto-completes
# these; they are written out so the contract is checked here rather than discovered on a GPU).
VLLM_MODEL = "mllm_vllm"
VLLM_INPUTS: tuple[tuple[str, int, list[int], bool], ...] = (
    ("text_input", mc.TYPE_STRING, [1], False),
    ("image", mc.TYPE_STRING, [-1], True),
    ("stream", mc.TYPE_BOOL, [1], True),
    ("sampling_parameters", mc.TYPE_STRING, [1], True),
    ("exclude_input_in_output", mc.TYPE_BOOL, [1], True),
    ("return_logprobs", mc.TYPE_BOOL, [1], True),
)
VLLM_OUTPUTS: tuple[tuple[str, int, list[int]], ...] = (
    ("text_output", mc.TYPE_STRING, [-1]),
    ("logprobs", mc.TYPE_STRING, [-1]),
)


def vllm_engine_args(
    model_dir: str, *, image_pixels: int = 224 * 224, dtype: str = "bfloat16", **overrides: Any
) -> dict[str, Any]:
    """model.json: vLLM engine arguments for a Qwen2-VL directory (as mounted in the server).

    The processor's pixel range is the adapter's budget, so the crops the adapter has already
    fitted pass through vLLM's resize unchanged; `max_logprobs` covers the 20 the adapter asks.
    """
    args: dict[str, Any] = {
        "model": model_dir,
        "dtype": dtype,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 4096,
        "max_num_seqs": 64,
        "limit_mm_per_prompt": {"image": 1},
        "mm_processor_kwargs": {"min_pixels": 28 * 28, "max_pixels": image_pixels},
        "max_logprobs": 20,
        "enable_prefix_caching": True,
    }
    args.update(overrides)
    return args


def vllm_config(name: str = VLLM_MODEL, instances: int = 1) -> mc.ModelConfig:
    return mc.ModelConfig(
        name=name,
        backend="vllm",
        max_batch_size=0,  # the engine batches
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        input=[
            mc.ModelInput(name=n, data_type=t, dims=d, optional=o) for n, t, d, o in VLLM_INPUTS
        ],
        output=[mc.ModelOutput(name=n, data_type=t, dims=d) for n, t, d in VLLM_OUTPUTS],
        instance_group=[
            mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.Kind.KIND_MODEL, count=instances)
        ],
    )


def write_vllm_model(out: Path, model_dir: str, *, name: str = VLLM_MODEL, **engine: Any) -> Path:
    """Write `out/<name>/` (config.pbtxt, 1/model.json) for Triton's vLLM backend."""
    folder = Path(out) / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "1").mkdir(parents=True)
    config = text_format.MessageToString(vllm_config(name), use_short_repeated_primitives=True)
    (folder / "config.pbtxt").write_text(config)
    args = vllm_engine_args(model_dir, **engine)
    (folder / "1" / "model.json").write_text(json.dumps(args, indent=2) + "\n")
    return folder


def write_vllm_adapter(
    out: Path,
    model_dir: str,
    *,
    image_pixels: int = 224 * 224,
    dtype: str = "bfloat16",
    instances: int = 1,
    logprobs: int = 20,
    engine: dict[str, Any] | None = None,
) -> list[Path]:
    """The GPU MLLM pair: `mllm` (python backend, the contract, backend "vllm") in front of
    `mllm_vllm` (Triton's vLLM backend), both reading the same model directory. `logprobs`:
    how many top log-probabilities a yes/no answer returns (the engine's max_logprobs
    follows)."""
    options = {
        "image_pixels": image_pixels,
        "dtype": dtype,
        "logprobs": logprobs,
        "vllm_model": VLLM_MODEL,
    }
    front = write_mllm_model(out, "vllm", model_dir, instances=instances, options=options)
    engine = {"max_logprobs": max(20, logprobs), **(engine or {})}
    back = write_vllm_model(out, model_dir, image_pixels=image_pixels, dtype=dtype, **engine)
    return [front, back]
