"""The MLLM contract THI talks to, whatever runs behind it (a Qwen2-VL-class VLM, vLLM on
Triton, or the project's small demo model).

Two calls:
- `score(images, prompts)`: P(Yes) of the anchor question for each (image, prompt) pair, from
  the Yes vs No next-token logits (never by reading generated text), batched in one request;
- `generate(images, prompt)`: text for a prompt about zero or more images (the 15-question
  VQA of one image; the text-only aggregation).
Prompts are the paper's (docs/method.md section 4), built here so every backend sees the same
words. `model_key` names the model and its version: cached VQA answers are keyed by it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

ANCHOR_PROMPT = 'Can this text accurately describe the image? Text: {query}. Answer "Yes" or "No".'

# The human-centred questions, in the paper's order. Items 7, 8, 10 and 11 also ask colour
# and style when clearly visible.
VQA_QUESTIONS: tuple[str, ...] = (
    "What is the gender of the person?",
    "What is the hairstyle of the person: length and colour?",
    "What is the person wearing on the upper body: colour, type, and sleeve length if clearly "
    "visible?",
    "What is the person wearing on the lower body (trousers or skirt): colour, type, length?",
    "Are there patterns on the clothes?",
    "What shoes is the person wearing: colour and style?",
    "Is the person wearing glasses? If so, their colour and style if clearly visible.",
    "Is the person wearing a scarf? If so, its colour and style if clearly visible.",
    "Is the person holding anything in the hand? If so, what and its colour.",
    "Is the person carrying a backpack? If so, its colour and style if clearly visible.",
    "Is the person wearing a hat? If so, its colour and style if clearly visible.",
    "Is the person wearing a belt?",
    "What is the person doing?",
    "What is in the background?",
    "Are there other people in the background?",
)
VQA_PROMPT = (
    "According to the pedestrian image, answer the following questions one by one, one short "
    "sentence per line:\n" + "\n".join(f"{i}. {q}" for i, q in enumerate(VQA_QUESTIONS, 1))
)
AGGREGATE_PROMPT = (
    "Aggregate the following subtexts into continuous and concise text sentences.\n"
    "{subtexts}\nOutput aggregated sentences without any explanation."
)


def anchor_prompt(query: str) -> str:
    return ANCHOR_PROMPT.format(query=query.strip().rstrip("."))


def aggregate_prompt(query: str, answers: Sequence[str]) -> str:
    items = [query.strip(), *answers]
    return AGGREGATE_PROMPT.format(subtexts="\n".join(f"- {s}" for s in items if s))


_NUMBERING = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s*")


def parse_answers(text: str) -> list[str]:
    """One short sentence per non-empty line, numbering and bullets removed, ending in '.'."""
    out = []
    for line in text.splitlines():
        line = _NUMBERING.sub("", line).strip()
        if not line:
            continue
        out.append(line if line.endswith((".", "!", "?")) else line + ".")
    return out


def merge_answers(query: str, answers: Sequence[str]) -> str:
    """Deterministic aggregation for backends without text generation: the query, then the
    answers that add something (not already in the query, no "cannot tell"), in order."""
    seen = query.strip().lower()
    parts = [query.strip().rstrip(".") + "."]
    for answer in answers:
        a = answer.strip()
        if not a or a.lower().rstrip(".") in seen or a.lower().startswith(("cannot", "unclear")):
            continue
        parts.append(a)
    return " ".join(parts)


class MllmCancelled(Exception):
    """Raised by a backend call whose `should_stop()` turned true: the caller gave up.

    Backends that can stop between steps say so with `can_stop = True` and take a keyword
    `should_stop` (a no-argument callable) in score() and generate(); the Triton `mllm` model
    passes the request's cancellation flag, so an abandoned request frees the instance."""


class MllmBackend(Protocol):
    """An in-process model behind the contract (synchronous; hosted by Triton's `mllm` model
    or wrapped by `icl.mllm.inprocess.InProcessMllm` for offline evaluation)."""

    model_key: str
    can_generate: bool

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]: ...

    def generate(self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256) -> str: ...


class Mllm(Protocol):
    """What THI needs from a multimodal LLM. Images are uint8 RGB arrays [H, W, 3]."""

    @property
    def model_key(self) -> str:
        """`name@version`: cached answers are only reused under the same key."""
        ...

    @property
    def can_generate(self) -> bool:
        """False for backends without free-text generation: THI then aggregates with
        `merge_answers`; they still answer `VQA_PROMPT` through `generate`."""
        ...

    async def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        """P(Yes) per (image, prompt) pair, one request for the whole batch."""
        ...

    async def generate(
        self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256
    ) -> str:
        """Greedy (temperature ~0) text for `prompt` about `images` (may be empty)."""
        ...


__all__ = [
    "AGGREGATE_PROMPT",
    "ANCHOR_PROMPT",
    "VQA_PROMPT",
    "VQA_QUESTIONS",
    "Mllm",
    "MllmBackend",
    "MllmCancelled",
    "aggregate_prompt",
    "anchor_prompt",
    "merge_answers",
    "parse_answers",
]
