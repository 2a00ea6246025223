"""A Qwen2-VL-class chat VLM behind the `MllmBackend` contract, run with transformers.

Any local model directory that transformers loads with `AutoModelForImageTextToText` and whose
image processor is Qwen2-VL's (Qwen2-VL, Qwen2.5-VL and their fine-tunes; a LoRA must be
merged into the base weights first) works. Nothing is ever downloaded (`local_files_only`).

How the contract is met:
- prompts go through the model's own chat template, one user turn holding the images and then
  the text (the same turn vLLM's chat API builds);
- each crop becomes at most `image_pixels` pixels worth of visual tokens: `fit_to_budget`
  resizes it (aspect ratio kept) to the largest grid of 28x28 cells (14 px patches, 2x2
  merge) within the budget, and the image processor's max_pixels is the budget too; so a
  crop costs at most image_pixels / 28**2 tokens whatever its size (64 at 224x224). The
  processor's own smart_resize rounds small crops UP past max_pixels (a 100x60 crop would
  cost 77 tokens), hence the resize here;
- `score` runs all (image, prompt) pairs in ONE forward pass, left-padded, and reads the
  logits of the first answer token: P(Yes) = softmax over the "Yes" and "No" logits (see
  `answer_token_ids` for how those ids are found);
- `generate` is greedy (do_sample=False, what temperature 0.01 amounts to) and returns the
  concatenated streamed text, stripped, so a streamed copy joined by a client is identical.

Why no `Qwen2VLProcessor`: in transformers 5.24 constructing it needs torchvision (its video
processor base class), which does not work beside torch 2.13+cpu (its operators fail to
register). The processor's only job for images is to repeat the image token once per merged
patch; that is done in `_expand_image_tokens`, with the PIL image processor.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_TOKEN = "<|image_pad|>"
# Files that change what the model answers; hashed whole into model_key.
_KEY_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 64 * 1024
_SAMPLES = 16


def _file_digest(path: Path, h: Any) -> None:
    """Feed `path` into `h`: whole if small, else 16 evenly spaced 64 KiB chunks (a 15 GB
    checkpoint is keyed in milliseconds; any re-trained or re-merged weights differ there)."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}\n".encode())
    with open(path, "rb") as f:
        if size <= _CHUNK * _SAMPLES:
            h.update(f.read())
            return
        for i in range(_SAMPLES):
            f.seek((size - _CHUNK) * i // (_SAMPLES - 1))
            h.update(f.read(_CHUNK))


def model_key_for(path: str | Path, **settings: object) -> str:
    """`<directory name>@<12 hex>`: the hash covers the config, tokenizer, chat template,
    weights index and (sampled) weights, plus the serving `settings` that change answers."""
    root = Path(path)
    h = hashlib.sha256()
    names = {*_KEY_FILES, *(p.name for p in root.glob("*.index.json"))}
    for name in sorted(names):
        if (root / name).is_file():
            _file_digest(root / name, h)
    for p in sorted(root.iterdir()):
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES):
            _file_digest(p, h)
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return f"{root.name}@{h.hexdigest()[:12]}"


def answer_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Token ids that start an answer `word`, e.g. "Yes".

    The first answer token follows "assistant\\n", so it is normally `word` without a leading
    space; some tokenizers (or fine-tunes) emit " Yes" instead, so both spellings are taken
    when each is a single token, and their probabilities are pooled (logsumexp). A spelling
    that needs several tokens is skipped: its first piece ("Y", "Ġ") is not an answer.
    Qwen2's tokenizer gives "Yes" 9454 and " Yes" 7414; "No" 2753 and " No" 2308.
    """
    ids: set[int] = set()
    for variant in (word, " " + word):
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    if not ids:
        raise ValueError(f"the tokenizer has no single token for {word!r} or {' ' + word!r}")
    return sorted(ids)


def budget_size(height: int, width: int, image_pixels: int, factor: int = 28) -> tuple[int, int]:
    """(h, w), multiples of `factor`, aspect ratio of (height, width) kept as far as the grid
    allows, h * w <= image_pixels (never below one cell per side)."""
    scale = math.sqrt(image_pixels / (height * width))
    h = max(factor, math.floor(height * scale / factor) * factor)
    w = max(factor, math.floor(width * scale / factor) * factor)
    while h * w > image_pixels and max(h, w) > factor:  # only when one side hit the minimum
        if h >= w:
            h -= factor
        else:
            w -= factor
    return h, w


def fit_to_budget(image: np.ndarray, image_pixels: int, factor: int = 28) -> Image.Image:
    """A uint8 RGB crop [H, W, 3] resized (bicubic, as Qwen2-VL's processor) to `budget_size`."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
        raise ValueError(f"images must be uint8 RGB [H, W, 3], got {array.dtype} {array.shape}")
    h, w = budget_size(array.shape[0], array.shape[1], image_pixels, factor)
    pil = Image.fromarray(array, "RGB")
    return pil if (w, h) == pil.size else pil.resize((w, h), Image.Resampling.BICUBIC)


def chat_template_of(tokenizer: Any, path: str | Path) -> str:
    """The model directory's chat template: the tokenizer's, else (older Qwen2-VL releases)
    the processor's chat_template.json."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return template
    file = Path(path) / "chat_template.json"
    if file.is_file():
        return json.loads(file.read_text())["chat_template"]
    raise ValueError(f"{path} has no chat template")


def render_chat(tokenizer: Any, chat_template: str, n_images: int, prompt: str) -> str:
    """One user turn holding `n_images` image placeholders then `prompt`, rendered with the
    model's own template and the generation prompt (the text vLLM's chat API would build)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": prompt})
    messages: Any = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str)  # tokenize=False renders text
    return text


def _dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:  # float32 on CPU (bf16 matmuls are slow there), bf16 on a GPU
        return torch.float32 if device == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


class _Collector:
    """A transformers streamer (put/end) that hands finished text pieces to `on_text`."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None) -> None:
        from transformers import TextStreamer

        self.pieces: list[str] = []

        def emit(text: str, stream_end: bool = False) -> None:
            if text:
                self.pieces.append(text)
                if on_text is not None:
                    on_text(text)

        self._streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._streamer.on_finalized_text = emit  # type: ignore[method-assign]  # the hook

    def put(self, value: torch.Tensor) -> None:
        self._streamer.put(value)

    def end(self) -> None:
        self._streamer.end()


class Qwen2VLBackend:
    """`MllmBackend` for a local Qwen2-VL-class model directory (see the module docstring)."""

    can_generate = True
    # Optional extension of the contract: generate() takes `on_text` and calls it with each
    # finished piece of text, so the Triton `mllm` model can stream.
    can_stream = True

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        image_pixels: int = 224 * 224,
        max_new_tokens: int = 256,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a model directory (no config.json)")
        if image_pixels < 28 * 28:
            raise ValueError("image_pixels must be at least 28*28 (one visual token)")
        self.device = device
        self.image_pixels = int(image_pixels)
        self.max_new_tokens = int(max_new_tokens)
        self.tokenizer = AutoTokenizer.from_pretrained(
            self.path, local_files_only=True, padding_side="left"
        )
        self.image_processor = AutoImageProcessor.from_pretrained(
            self.path,
            local_files_only=True,
            # Crops arrive already fitted (fit_to_budget): the processor must not resize them.
            size={"shortest_edge": 28 * 28, "longest_edge": self.image_pixels},
        )
        torch_dtype = _dtype(dtype, device)
        self.model = AutoModelForImageTextToText.from_pretrained(
            self.path, local_files_only=True, dtype=torch_dtype
        ).to(device)  # type: ignore[arg-type]  # transformers types .to() oddly
        self.model.eval()
        self.chat_template = chat_template_of(self.tokenizer, self.path)
        self.image_token = getattr(self.tokenizer, "image_token", None) or IMAGE_TOKEN
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id != self.model.config.image_token_id:
            raise ValueError(
                f"{self.path}: tokenizer maps {self.image_token} to {self.image_token_id}, "
                f"the model expects {self.model.config.image_token_id}"
            )
        self.merge_length = int(self.image_processor.merge_size) ** 2
        self.factor = int(self.image_processor.patch_size) * int(self.image_processor.merge_size)
        if self.factor != 28:
            raise ValueError(f"{self.path}: expected 14 px patches merged 2x2, got {self.factor}")
        self.yes_ids = answer_token_ids(self.tokenizer, "Yes")
        self.no_ids = answer_token_ids(self.tokenizer, "No")
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"Yes and No share token ids {self.yes_ids} / {self.no_ids}")
        self.pad_token_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        self.model_key = model_key_for(
            self.path, image_pixels=self.image_pixels, dtype=str(torch_dtype)
        )

    def visual_tokens(self, height: int, width: int) -> int:
        """Visual tokens one crop of this size costs (after the 2x2 patch merge)."""
        h, w = budget_size(height, width, self.image_pixels, self.factor)
        return (h // self.factor) * (w // self.factor)

    def _chat_text(self, n_images: int, prompt: str) -> str:
        return render_chat(self.tokenizer, self.chat_template, n_images, prompt)

    def _encode(
        self, rows: Sequence[Sequence[np.ndarray]], prompts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Tokenised, left-padded batch: row i holds images rows[i] then prompts[i]."""
        texts = [self._chat_text(len(imgs), p) for imgs, p in zip(rows, prompts, strict=True)]
        images = [fit_to_budget(im, self.image_pixels) for imgs in rows for im in imgs]
        batch: dict[str, torch.Tensor] = {}
        if images:
            vision = self.image_processor(images=images, return_tensors="pt")
            batch["pixel_values"] = vision["pixel_values"]
            batch["image_grid_thw"] = vision["image_grid_thw"]
            counts = (vision["image_grid_thw"].prod(-1) // self.merge_length).tolist()
            texts = self._expand_image_tokens(texts, counts)
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        batch["input_ids"] = tokens["input_ids"]
        batch["attention_mask"] = tokens["attention_mask"]
        if images:
            # Modality per token (0 text, 1 image), which M-RoPE needs; the processor's output.
            batch["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).int()
        return {k: v.to(self.device) for k, v in batch.items()}

    def _expand_image_tokens(self, texts: list[str], counts: list[int]) -> list[str]:
        # What Qwen2VLProcessor does: the i-th image token becomes counts[i] copies of itself.
        marker = "\x00IMG\x00"
        it = iter(counts)
        out = []
        for text in texts:
            while self.image_token in text:
                text = text.replace(self.image_token, marker * next(it), 1)
            out.append(text.replace(marker, self.image_token))
        if next(it, None) is not None:
            raise ValueError("more images than image placeholders in the chat template")
        return out

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        """P(Yes) per pair; one prompt is used for every image. One forward pass."""
        if not images:
            return []
        if len(prompts) == 1:
            prompts = [prompts[0]] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        batch = self._encode([[im] for im in images], prompts)
        logits = self.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
        yes = torch.logsumexp(logits[:, self.yes_ids], dim=-1)
        no = torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return torch.sigmoid(yes - no).cpu().tolist()  # = softmax([yes, no])[0]

    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[np.ndarray],
        prompt: str,
        max_tokens: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """Greedy answer to `prompt` about `images` (none: a text-only chat turn)."""
        limit = self.max_new_tokens if max_tokens is None else int(max_tokens)
        if limit < 1:
            raise ValueError("max_tokens must be >= 1")
        batch = self._encode([list(images)], [prompt])
        collector = _Collector(self.tokenizer, on_text)
        self.model.generate(
            **batch,
            max_new_tokens=limit,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.pad_token_id,
            streamer=collector,
        )
        return "".join(collector.pieces).strip()


__all__ = [
    "IMAGE_TOKEN",
    "Qwen2VLBackend",
    "answer_token_ids",
    "budget_size",
    "chat_template_of",
    "fit_to_budget",
    "model_key_for",
    "render_chat",
]
