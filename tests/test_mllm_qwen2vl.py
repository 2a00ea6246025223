"""Qwen2VLBackend on a tiny, randomly initialised Qwen2-VL built here, offline.

No Qwen2-VL weights can be had on our machines (model hubs are unreachable), so the model is
the real transformers Qwen2VLForConditionalGeneration class with a tiny config and random
weights, a byte-level BPE tokenizer trained here on a few sentences with Qwen2-VL's special
tokens, a Qwen2-VL-style chat template, and the real Qwen2-VL image processor, all saved with
save_pretrained and loaded back through the backend. Its answers are noise; what is checked is
the plumbing: batching and left padding, greedy determinism, the visual-token budget, the
Yes/No token lookup and the model key.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from icl.mllm.contract import anchor_prompt
from icl.mllm.qwen2vl import Qwen2VLBackend, answer_token_ids, budget_size, model_key_for

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL-Instruct's template, reduced to what the backend uses (default system turn, image
# placeholders, text, generation prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Yes",
    "No",
    "Answer: Yes. Answer: No. Yes No Yes No",
    'Can this text accurately describe the image? Text: a woman in a red dress. Answer "Yes"',
    "The person is wearing a black jacket and blue jeans, carrying a backpack.",
    "According to the pedestrian image, answer the following questions one by one.",
    "system user assistant You are a helpful assistant.",
]


def build_tiny_qwen2vl(out: Path, seed: int = 0) -> Path:
    """Save a tiny random Qwen2-VL model directory (config, weights, tokenizer, processor)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 8, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {t: bpe.token_to_id(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": bpe.get_vocab_size(),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            # M-RoPE splits the 16-d head's 8 frequencies over (time, height, width).
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil().save_pretrained(out)
    return out


def crops(seed: int = 0) -> list[np.ndarray]:
    """Three crops of different sizes and aspect ratios (tall, small, large)."""
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        for h, w in [(384, 128), (60, 30), (500, 300)]
    ]


PROMPTS = [
    anchor_prompt("a man in a black jacket"),
    anchor_prompt("a woman with long hair wearing a red dress and white shoes, carrying a bag"),
    anchor_prompt("a person"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("mllm") / "tiny-qwen2vl")


@pytest.fixture(scope="module")
def backend(tiny_dir: Path) -> Qwen2VLBackend:
    torch.set_num_threads(2)
    return Qwen2VLBackend(tiny_dir, max_new_tokens=12)


def test_yes_no_tokens_found_with_and_without_space(backend: Qwen2VLBackend) -> None:
    tok = backend.tokenizer
    assert len(backend.yes_ids) == 2 and len(backend.no_ids) == 2
    assert {tok.decode([i]).strip() for i in backend.yes_ids} == {"Yes"}
    assert {tok.decode([i]).strip() for i in backend.no_ids} == {"No"}
    with pytest.raises(ValueError, match="no single token"):
        answer_token_ids(tok, "Absolutely")


def test_score_batched_equals_one_by_one(backend: Qwen2VLBackend) -> None:
    images = crops()
    batched = backend.score(images, PROMPTS)
    assert len(batched) == 3 and all(0.0 <= p <= 1.0 for p in batched)
    single = [backend.score([im], [p])[0] for im, p in zip(images, PROMPTS, strict=True)]
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # One prompt for all images = that prompt repeated.
    np.testing.assert_allclose(
        backend.score(images, PROMPTS[:1]), backend.score(images, PROMPTS[:1] * 3), atol=1e-6
    )
    assert backend.score([], []) == []
    with pytest.raises(ValueError, match="prompts"):
        backend.score(images, PROMPTS[:2])


def test_score_is_the_yes_no_softmax_of_the_first_answer_token(backend: Qwen2VLBackend) -> None:
    image = crops()[0]
    batch = backend._encode([[image]], [PROMPTS[0]])
    with torch.inference_mode():
        logits = backend.model(**batch).logits[0, -1].double()
    yes = torch.logsumexp(logits[backend.yes_ids], 0)
    no = torch.logsumexp(logits[backend.no_ids], 0)
    expected = float(torch.exp(yes) / (torch.exp(yes) + torch.exp(no)))
    assert backend.score([image], [PROMPTS[0]])[0] == pytest.approx(expected, abs=1e-6)


def test_generate_is_deterministic_and_streams(backend: Qwen2VLBackend) -> None:
    image = crops()[0]
    first = backend.generate([image], "Describe the person.", 12)
    assert isinstance(first, str)
    assert backend.generate([image], "Describe the person.", 12) == first
    pieces: list[str] = []
    assert backend.generate([image], "Describe the person.", 12, on_text=pieces.append) == first
    assert "".join(pieces).strip() == first
    text_only = backend.generate([], "Aggregate: a man. He wears a hat.", 8)
    assert isinstance(text_only, str)
    assert backend.generate([], "Aggregate: a man. He wears a hat.", 8) == text_only


def test_visual_token_budget(backend: Qwen2VLBackend) -> None:
    budget = backend.image_pixels // (28 * 28)
    assert budget == 64
    images = [*crops(), np.zeros((224, 224, 3), np.uint8), np.zeros((20, 900, 3), np.uint8)]
    for image in images:
        batch = backend._encode([[image]], ["x"])
        n = int((batch["input_ids"] == backend.image_token_id).sum())
        assert n == backend.visual_tokens(*image.shape[:2]) <= budget, image.shape
        assert int(batch["image_grid_thw"].prod()) == 4 * n  # 2x2 patches merged per token
    assert backend.visual_tokens(224, 224) == 64
    assert backend.visual_tokens(384, 128) >= 48  # tall crops keep most of the budget
    h, w = budget_size(384, 128, 224 * 224)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 224 * 224 and h / w == pytest.approx(3, 0.2)


def test_model_key_follows_weights_and_settings(backend: Qwen2VLBackend, tiny_dir: Path) -> None:
    name, _, digest = backend.model_key.partition("@")
    assert name == "tiny-qwen2vl" and len(digest) == 12
    assert model_key_for(tiny_dir, image_pixels=224 * 224, dtype="torch.float32") == (
        backend.model_key
    )
    assert model_key_for(tiny_dir, image_pixels=112 * 112, dtype="torch.float32") != (
        backend.model_key
    )
    retrained = tiny_dir.parent / "retrained" / tiny_dir.name
    build_tiny_qwen2vl(retrained, seed=1)
    assert Qwen2VLBackend(retrained).model_key != backend.model_key
    shutil.rmtree(retrained.parent)
