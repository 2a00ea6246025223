"""Which `MllmBackend` the Triton `mllm` model (or any host) loads, by name.

Entries are import paths, so naming a backend imports only what it needs (the demo model
never imports the VLM code and vice versa). A factory is called as `factory(path, **options)`
when a path is given and `factory(**options)` otherwise.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from icl.mllm.contract import MllmBackend

BACKENDS: dict[str, str] = {
    # A local Qwen2-VL-class model directory; options: device, dtype, image_pixels,
    # max_new_tokens (icl.mllm.qwen2vl.Qwen2VLBackend).
    "qwen2vl": "icl.mllm.qwen2vl:Qwen2VLBackend",
    # The project's trained demo model (default: the committed icl/demo/mllm.pt).
    "demo": "icl.mllm.demo:load_demo_backend",
    # A Qwen2-VL-class directory served by Triton's vLLM backend (model `mllm_vllm`), reached
    # through BLS; options: image_pixels, dtype (the engine's), logprobs, max_new_tokens,
    # vllm_model. Only the Triton `mllm` model hosts it: it injects the BLS transport
    # (icl.mllm.vllm_adapter.VllmAdapterBackend).
    "vllm": "icl.mllm.vllm_adapter:VllmAdapterBackend",
}
NEEDS_PATH = frozenset({"qwen2vl", "vllm"})
# Backends that call back into Triton (BLS): the host passes `transport=`.
NEEDS_TRANSPORT = frozenset({"vllm"})


class BackendConfigError(ValueError):
    """Unknown backend name, missing path, or options the backend does not take."""


def load_backend(name: str, path: str | Path | None = None, **options: Any) -> MllmBackend:
    if name not in BACKENDS:
        raise BackendConfigError(f"unknown MLLM backend {name!r}; known: {sorted(BACKENDS)}")
    if name in NEEDS_PATH and not path:
        raise BackendConfigError(f"MLLM backend {name!r} needs a model path")
    module_name, _, attr = BACKENDS[name].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    try:
        return factory(path, **options) if path else factory(**options)
    except TypeError as exc:  # wrong option names: say which backend refused them
        raise BackendConfigError(f"MLLM backend {name!r}: {exc}") from None
