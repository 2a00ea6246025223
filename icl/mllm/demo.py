"""The demo MLLM: a small image-question model behind the same contract as a real VLM.

Two networks, both trained by the project on the synthetic world (`icl train-mllm`):
- `AttributeNet` reads a crop's pixels and gives, for each human attribute, a distribution
  over its values plus "unseen" (e.g. glasses on a person seen from behind);
- `CaptionParser` reads a text and gives, for each attribute, a distribution over its values
  plus "not mentioned".
The anchor question "Can this text accurately describe the image?" is answered by comparing
the two: the log-likelihood ratio that every attribute the text states matches the image
(against the chance that it matches by accident), squashed into P(Yes) by a logistic
calibrated on val pairs. The 15 VQA questions are answered in sentences from the image's
attribute distributions alone (the query is not shown, as in the paper). Neither network
reads the generator's labels at inference; they were only used as training targets.
There is no free-text generation: `can_generate` is False and THI merges the answers into
the refined query deterministically.

A served model keeps what it read from each crop (the attribute distributions, keyed by a
digest of the pixels) and from each text: THI asks about the same gallery crops again and
again, and the yes/no walk asks the same query once per candidate. The image side of a real
VLM has the same property (its vision encoder output depends on the image alone).
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from icl.mllm.contract import VQA_PROMPT, MllmCancelled
from icl.synthetic.schema import ATTRIBUTES
from icl.text.tokenizer import VOCAB_SIZE, ClipTokenizer

FORMAT = "icl-demo-mllm/1"
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
IMAGE_SIZE = (128, 48)
CONTEXT = 77
EXTRA = "unseen/unmentioned"  # the last class of every head
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) * 255
_QUERY = re.compile(r"Text: (?P<query>.*)\. Answer \"Yes\" or \"No\"\.$", re.S)


def head_sizes() -> list[int]:
    return [len(values) + 1 for values in ATTRIBUTES.values()]


class AttributeNet(nn.Module):
    """uint8 crops [B, 128, 48, 3] -> logits [B, sum(values + 1)] (one block per attribute)."""

    def __init__(self, channels: Sequence[int] = (32, 64, 96, 128)) -> None:
        super().__init__()
        self.channels = tuple(channels)
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch in channels:
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
                nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        # Attributes live at different heights (hat, scarf, shoes): keep a coarse vertical
        # layout (8 rows after four stride-2 stages at 128 px) instead of one global pool.
        self.rows = 8
        self.head = nn.Sequential(
            nn.Dropout(0.2), nn.Linear(in_ch * self.rows * 2, sum(head_sizes()))
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.permute(0, 3, 1, 2).float() - MEAN) / STD
        x = self.features(x)
        x = torch.cat(
            [
                F.adaptive_avg_pool2d(x, (self.rows, 1)).flatten(1),
                F.adaptive_max_pool2d(x, (self.rows, 1)).flatten(1),
            ],
            dim=1,
        )
        return self.head(x)


class CaptionParser(nn.Module):
    """CLIP BPE ids [B, L] -> logits [B, sum(values + 1)]: what the text says per attribute."""

    def __init__(self, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB_SIZE, width, padding_idx=0, sparse=True)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, width))
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, padding=1) for _ in range(layers))
        sizes = head_sizes()
        # One learned query per attribute picks the words that talk about it.
        self.queries = nn.Parameter(torch.randn(len(sizes), width) / math.sqrt(width))
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in sizes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        present = ids != 0
        mask = present.unsqueeze(1).float()
        h = ((self.embed(ids) + self.pos[: ids.shape[1]]) * mask.transpose(1, 2)).transpose(1, 2)
        for conv in self.convs:
            h = (h + F.gelu(conv(h))) * mask
        tokens = h.transpose(1, 2)  # [B, L, C]
        logits = torch.einsum("blc,ac->bal", tokens, self.queries) / math.sqrt(tokens.shape[-1])
        weights = logits.masked_fill(~present.unsqueeze(1), float("-inf")).softmax(dim=-1)
        pooled = torch.einsum("bal,blc->bac", weights, tokens)
        return torch.cat([head(pooled[:, i]) for i, head in enumerate(self.heads)], dim=1)


def split_heads(logits: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(logits, head_sizes(), dim=1))


def resize_crop(image: np.ndarray) -> np.ndarray:
    if image.shape[:2] == IMAGE_SIZE:
        return image
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    return np.asarray(pil.resize((IMAGE_SIZE[1], IMAGE_SIZE[0]), Image.Resampling.BILINEAR))


@dataclass
class Calibration:
    """P(Yes) = sigmoid(scale * (LLR - bias)); fitted on val pairs."""

    scale: float = 1.0
    bias: float = 0.0


def _value_phrase(attr: str, value: str) -> str | None:
    """One short sentence per attribute value, in the captions' own vocabulary."""
    colour_of = {
        "upper_colour": "upper-body garment",
        "lower_colour": "lower-body garment",
        "bag_colour": "bag",
        "hat_colour": "hat",
    }
    if value == "none":
        words = {
            "bag": "The person is not carrying a bag.",
            "hat": "The person is not wearing a hat.",
            "glasses": "The person is not wearing glasses.",
            "scarf": "The person is not wearing a scarf.",
            "held_object": "The person is not holding anything.",
        }
        return words.get(attr)
    if attr == "gender":
        return f"The person is a {value}."
    if attr == "hair_length":
        return "The person is bald." if value == "bald" else f"The person has {value} hair."
    if attr == "hair_colour":
        return f"The person has {value} hair."
    if attr == "shoe_colour":
        return f"The shoes are {value}."
    if attr in colour_of:
        return f"The {colour_of[attr]} is {value}."
    if attr == "upper_type":
        return f"The person is wearing a {value}."
    if attr == "sleeve_length":
        return f"The upper garment has {value} sleeves."
    if attr == "upper_pattern":
        return f"The clothes are {value}." if value != "logo" else "The top has a logo."
    if attr == "lower_type":
        return f"The person is wearing {'a skirt' if value == 'skirt' else value}."
    if attr == "lower_length":
        return f"The lower garment is {value}."
    if attr == "shoe_type":
        return f"The person is wearing {value}."
    if attr == "bag":
        return f"The person is carrying a {value}."
    if attr == "hat":
        return f"The person is wearing a {value}."
    if attr == "glasses":
        return f"The person is wearing {value}."
    if attr == "scarf":
        return f"The person is wearing a {value} scarf."
    if attr == "held_object":
        return f"The person is holding {'an' if value[0] in 'aeiou' else 'a'} {value}."
    return None


# Which attributes answer which of the 15 questions (docs/method.md section 4).
QUESTION_ATTRIBUTES: tuple[tuple[str, ...], ...] = (
    ("gender",),
    ("hair_length", "hair_colour"),
    ("upper_colour", "upper_type", "sleeve_length"),
    ("lower_colour", "lower_type", "lower_length"),
    ("upper_pattern",),
    ("shoe_colour", "shoe_type"),
    ("glasses",),
    ("scarf",),
    ("held_object",),
    ("bag", "bag_colour"),
    ("hat", "hat_colour"),
    (),  # belt: no such attribute in the synthetic world
    (),  # activity
    (),  # background
    (),  # other people
)


class _Lru:
    """A bounded least-recently-used map, safe across the serving threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)


def _pixels_key(image: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    pixels = np.ascontiguousarray(image)
    return pixels.shape, hashlib.blake2b(pixels.data, digest_size=16).digest()


# What a served model remembers (icl.mllm.demo docstring): about 1 kB per crop or text.
SERVED_CACHE_IMAGES = 16384
SERVED_CACHE_TEXTS = 4096


class DemoMllm:
    """`MllmBackend` over the two networks. Thread-compatible (torch no_grad, eval mode).

    `cache(images, texts)` turns on the per-crop and per-text caches (off by default: a model
    still being trained must not answer from what it read before its last step)."""

    can_generate = False
    can_stop = True  # score() and generate() take `should_stop` (icl.mllm.contract)
    # Test hook: seconds every score/generate call waits before answering, in short steps that
    # honour `should_stop`, to stand in for a slow VLM (option `delay_s` of the Triton model).
    delay_s = 0.0

    def __init__(
        self,
        attributes: AttributeNet,
        parser: CaptionParser,
        calibration: Calibration,
        prior: list[np.ndarray],
        key: str,
        min_confidence: float = 0.5,
    ) -> None:
        self.attributes = attributes.eval()
        self.parser = parser.eval()
        self.calibration = calibration
        self.prior = prior  # per attribute: training frequency of each value
        self.model_key = key
        self.min_confidence = min_confidence
        self.tokenizer = ClipTokenizer(CONTEXT)
        self._image_cache: _Lru | None = None
        self._text_cache: _Lru | None = None

    def cache(self, images: int, texts: int) -> None:
        """Remember up to `images` crops' and `texts` texts' distributions (0: no cache)."""
        self._image_cache = _Lru(images) if images > 0 else None
        self._text_cache = _Lru(texts) if texts > 0 else None

    @staticmethod
    def _cached(
        cache: _Lru, keys: list[Any], compute: Callable[[list[int]], list[np.ndarray]]
    ) -> list[np.ndarray]:
        """Per attribute [N, values + 1]: rows from `cache` where known, the rest from
        `compute(indices)` (per attribute, rows in the order of `indices`)."""
        rows = [cache.get(k) for k in keys]
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            fresh = compute(missing)
            for j, i in enumerate(missing):
                rows[i] = [p[j].copy() for p in fresh]
                cache.put(keys[i], rows[i])
        return [np.stack([r[a] for r in rows]) for a in range(len(rows[0]))]

    # -- the two networks ------------------------------------------------------------------
    def image_probs(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Per attribute [N, values + 1] probabilities (last column: unseen)."""
        if self._image_cache is None:
            return self._image_probs(images)
        keys = [_pixels_key(i) for i in images]
        return self._cached(
            self._image_cache, keys, lambda idx: self._image_probs([images[i] for i in idx])
        )

    def text_probs(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per attribute [N, values + 1] probabilities (last column: not mentioned)."""
        if self._text_cache is None:
            return self._text_probs(texts)
        return self._cached(
            self._text_cache, list(texts), lambda idx: self._text_probs([texts[i] for i in idx])
        )

    @torch.no_grad()
    def _image_probs(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        batch = torch.from_numpy(np.stack([resize_crop(i) for i in images]))
        return [p.softmax(dim=1).numpy() for p in split_heads(self.attributes(batch))]

    @torch.no_grad()
    def _text_probs(self, texts: Sequence[str]) -> list[np.ndarray]:
        ids = torch.from_numpy(self.tokenizer(texts))
        return [p.softmax(dim=1).numpy() for p in split_heads(self.parser(ids))]

    def llr(self, image_probs: list[np.ndarray], text_probs: list[np.ndarray]) -> np.ndarray:
        """Sum over attributes of mention-weighted log(P(match) / P(match by chance))."""
        total = np.zeros(image_probs[0].shape[0])
        for img, txt, prior in zip(image_probs, text_probs, self.prior, strict=True):
            n = img.shape[1] - 1
            mentioned = 1.0 - txt[:, n]
            stated = txt[:, :n] / np.clip(mentioned[:, None], 1e-6, None)
            # An unseen attribute cannot be checked: it matches as often as chance would.
            seen = img[:, :n] + img[:, n : n + 1] * prior[None, :]
            match = (stated * seen).sum(axis=1)
            chance = (stated * prior[None, :]).sum(axis=1)
            total += mentioned * (np.log(match + 1e-4) - np.log(chance + 1e-4))
        return total

    # -- the contract ------------------------------------------------------------------------
    def _delay(self, should_stop: Callable[[], bool] | None) -> None:
        end = time.monotonic() + self.delay_s
        while True:
            if should_stop is not None and should_stop():
                raise MllmCancelled("the caller cancelled the request")
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    def score(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        should_stop: Callable[[], bool] | None = None,
    ) -> list[float]:
        self._delay(should_stop)
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        queries = []
        for prompt in prompts:
            match = _QUERY.search(prompt)
            if match is None:
                raise ValueError("the demo model answers only the anchor question of THI")
            queries.append(match["query"])
        llr = self.llr(self.image_probs(images), self.text_probs(queries))
        c = self.calibration
        return [float(0.5 * (1.0 + math.tanh(0.5 * c.scale * (v - c.bias)))) for v in llr]

    def answers(self, image: np.ndarray) -> list[str]:
        """The 15 answers for one crop, one sentence each ("Cannot tell." when unsure)."""
        probs = self.image_probs([image])
        by_attr = dict(zip(ATTRIBUTE_NAMES, probs, strict=True))
        out = []
        for attrs in QUESTION_ATTRIBUTES:
            sentences = []
            for attr in attrs:
                p = by_attr[attr][0]
                best = int(np.argmax(p))
                if best == len(p) - 1 or p[best] < self.min_confidence:
                    continue  # unseen or unsure: say nothing rather than guess
                phrase = _value_phrase(attr, ATTRIBUTES[attr][best])
                if phrase and phrase not in sentences:
                    sentences.append(phrase)
            out.append(" ".join(sentences) if sentences else "Cannot tell.")
        return out

    def generate(
        self,
        images: Sequence[np.ndarray],
        prompt: str,
        max_tokens: int = 256,
        should_stop: Callable[[], bool] | None = None,
    ) -> str:
        self._delay(should_stop)
        if prompt != VQA_PROMPT or len(images) != 1:
            raise ValueError(
                "the demo model answers only THI's VQA prompt about one image "
                "(it has no free-text generation; aggregation is merged deterministically)"
            )
        return "\n".join(f"{i}. {a}" for i, a in enumerate(self.answers(images[0]), 1))


def save_demo_mllm(model: DemoMllm, path: Path, extra: dict[str, Any] | None = None) -> None:
    half = {
        name: {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
        for name, net in (("attributes", model.attributes), ("parser", model.parser))
    }
    blob = {
        "format": FORMAT,
        "attributes": half["attributes"],
        "parser": half["parser"],
        "attribute_channels": list(model.attributes.channels),
        "calibration": [model.calibration.scale, model.calibration.bias],
        "prior": [p.tolist() for p in model.prior],
        "min_confidence": model.min_confidence,
        "extra": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_demo_mllm(path: Path) -> DemoMllm:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path}: not a demo MLLM file (expected format {FORMAT})")
    attributes = AttributeNet(tuple(blob.get("attribute_channels", (32, 64, 96, 128))))
    parser = CaptionParser()
    attributes.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in blob["attributes"].items()}
    )
    parser.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in blob["parser"].items()}
    )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return DemoMllm(
        attributes,
        parser,
        Calibration(*blob["calibration"]),
        [np.asarray(p, dtype=np.float64) for p in blob["prior"]],
        key=f"icl-demo-mllm@{digest}",
        min_confidence=float(blob["min_confidence"]),
    )


def load_demo_backend(path: str | Path | None = None, delay_s: float = 0.0) -> DemoMllm:
    """A demo MLLM weights file (by default the committed one, icl/demo/mllm.pt), ready to
    serve: with its per-crop and per-text caches on.

    `delay_s` > 0 is a test hook: every call then takes at least that long (DemoMllm.delay_s)."""
    from icl.demo import demo_path

    model = load_demo_mllm(Path(path) if path else demo_path("mllm.pt"))
    if delay_s < 0:
        raise ValueError(f"delay_s must be >= 0, not {delay_s}")
    model.delay_s = float(delay_s)
    model.cache(SERVED_CACHE_IMAGES, SERVED_CACHE_TEXTS)
    return model


__all__ = [
    "ATTRIBUTE_NAMES",
    "AttributeNet",
    "Calibration",
    "CaptionParser",
    "DemoMllm",
    "load_demo_backend",
    "load_demo_mllm",
    "save_demo_mllm",
]
