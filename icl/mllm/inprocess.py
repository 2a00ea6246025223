"""Run an in-process MLLM backend behind the async `Mllm` contract (offline evaluation)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from icl.mllm.contract import MllmBackend


class InProcessMllm:
    """Adapts a synchronous backend; calls run in a worker thread so the loop stays free."""

    def __init__(self, backend: MllmBackend) -> None:
        self.backend = backend

    @property
    def model_key(self) -> str:
        return self.backend.model_key

    @property
    def can_generate(self) -> bool:
        return self.backend.can_generate

    async def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        return await asyncio.to_thread(self.backend.score, images, prompts)

    async def generate(
        self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256
    ) -> str:
        return await asyncio.to_thread(self.backend.generate, images, prompt, max_tokens)
