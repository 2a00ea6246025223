"""CLIP byte-pair tokeniser built with the `tokenizers` library from CLIP's own merge list.

The merge list (bpe_simple_vocab_16e6.txt.gz, MIT, see BPE-VOCAB-NOTICE.txt) is the one OpenAI
CLIP and open_clip use, so token ids match every CLIP checkpoint: 49,406 is start-of-text,
49,407 end-of-text, 0 padding. Sequences are cut to `context_length` with the last slot forced
to end-of-text, as IRRA/RDE do.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
SOT_ID = 49406
EOT_ID = 49407
# CLIP's pre-tokenisation pattern: contractions, letter runs, single digits, other symbols.
_CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def _build_tokenizer() -> Tokenizer:
    raw = resources.files("icl.text").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Same slice as CLIP: skip the header line, keep 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    symbols = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    symbols += [SOT_TOKEN, EOT_TOKEN]
    vocab = {s: i for i, s in enumerate(symbols)}
    assert len(vocab) == VOCAB_SIZE and vocab[EOT_TOKEN] == EOT_ID

    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOT_TOKEN,
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class ClipTokenizer:
    """Turns captions into fixed-length CLIP token id arrays."""

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        self.context_length = context_length
        self._tok = _build_tokenizer()

    def ids(self, text: str) -> list[int]:
        """Token ids of one text without start/end markers and without truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts into an int64 array [len(texts), context_length], zero-padded."""
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, enc in enumerate(self._tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [SOT_ID, *enc.ids][: self.context_length - 1]
            ids.append(EOT_ID)
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Sequence[int]) -> str:
        keep = [i for i in ids if i not in (0, SOT_ID, EOT_ID)]
        return self._tok.decode(keep).replace("</w>", " ").strip()
