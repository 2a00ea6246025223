"""A transformers directory's `tokenizer.json` as fixed-length id arrays, without torch.

Serving processes (the Triton text model) import this module, so it needs only `tokenizers`
and numpy. `serving_tokenizer(folder, L)` is the one rule every runtime follows: a
`tokenizer.json` shipped next to the text encoder's ONNX means that tokenizer, none means
CLIP BPE.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Tokenizer

from icl.text.tokenizer import ClipTokenizer

TOKENIZER_FILE = "tokenizer.json"


class TokenizerFileError(ValueError):
    """A tokenizer file that is missing or unusable; the message names it."""


class TextTokenizer(Protocol):
    """What the rest of the system calls to turn captions into a text tower's input ids."""

    context_length: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


def tokenizer_json(path: str | Path) -> Path:
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


class HfTokenizer:
    """A directory's `tokenizer.json` (e.g. BERT WordPiece) as fixed-length int64 id arrays.

    Same call signature as `ClipTokenizer`. Rows are [CLS] text [SEP] then padding, cut to
    `context_length` (the tokenizer's own truncation keeps [SEP] last); padding uses the
    tokenizer's pad id (0 for BERT), which is how the tower rebuilds the attention mask.
    Only `tokenizers` is needed, so a serving process ships just the one file.
    """

    def __init__(self, path: str | Path, context_length: int) -> None:
        file = tokenizer_json(path)
        if not file.is_file():
            raise TokenizerFileError(
                f"{file}: no tokenizer.json; write one with "
                "`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`"
            )
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        self.context_length = context_length
        self.path = file
        tok = Tokenizer.from_file(str(file))
        pad_id = tok.padding["pad_id"] if tok.padding else tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else int(pad_id)
        tok.no_padding()  # the file may pin its own length (MiniLM's pins 128)
        tok.enable_truncation(max_length=context_length)
        self._tok = tok
        empty = tok.encode("")
        # The ids the post-processor adds ([CLS], [SEP]); TSE never selects them.
        self.special_ids = tuple(
            sorted({i for i, s in zip(empty.ids, empty.special_tokens_mask, strict=True) if s})
        )

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        out = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        for row, enc in enumerate(self._tok.encode_batch(list(texts))):
            out[row, : len(enc.ids)] = enc.ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        keep = [int(i) for i in ids if i != self.pad_id and i not in self.special_ids]
        return self._tok.decode(keep)


def serving_tokenizer(folder: Path, context_length: int) -> TextTokenizer:
    """The tokenizer shipped in `folder` (next to a text encoder's ONNX), else CLIP BPE."""
    if (folder / TOKENIZER_FILE).is_file():
        return HfTokenizer(folder / TOKENIZER_FILE, context_length)
    return ClipTokenizer(context_length)


__all__ = [
    "TOKENIZER_FILE",
    "HfTokenizer",
    "TextTokenizer",
    "TokenizerFileError",
    "serving_tokenizer",
    "tokenizer_json",
]
