"""The `mllm` model with the vLLM adapter backend, calling `mllm_vllm` through BLS.

Real: the tritonserver (CPU build from nvidia-pytriton), the `mllm` model.py with
`VllmAdapterBackend` and its BLS transport, TritonMllm as the client. Stand-in: `mllm_vllm`
is tests/vllm_standin/model.py, a python-backend model that speaks the vLLM backend's tensor
contract (vLLM needs a GPU) and answers from the tiny random Qwen2-VL of test_mllm_qwen2vl;
only its config's backend and instance kind are swapped (vllm/KIND_MODEL -> python/KIND_CPU),
its model.json is the one export writes. The adapter's P(Yes), generated text and model key
must equal the in-process Qwen2VLBackend's on the same pairs.

Tolerance: 1e-5 on P(Yes). In-process scores all pairs in one left-padded batch; the stand-in
runs one request at a time (as separate vLLM requests), so only float32 noise may differ.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

from icl.export.mllm_repository import (
    VLLM_INPUTS,
    VLLM_OUTPUTS,
    write_vllm_adapter,
)
from icl.mllm.qwen2vl import Qwen2VLBackend, budget_size
from icl.mllm.vllm_adapter import VllmAdapterBackend, p_yes, parse_logprobs, pooled
from icl.orchestrator.tritonserver import TritonServer
from tests.helpers import start_triton
from tests.test_mllm_qwen2vl import PROMPTS, build_tiny_qwen2vl, crops
from tests.test_mllm_triton import run

STANDIN = Path(__file__).parent / "vllm_standin" / "model.py"
VOCAB = 320  # the tiny tokenizer's size: asking for all of them makes P(Yes) exact


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("vllm") / "tiny-qwen2vl")


def standin_repository(out: Path, tiny_dir: Path, text_encoder: Path, logprobs: int) -> Path:
    """What `icl export --mllm vllm` writes, with the vLLM model's backend swapped."""
    shutil.copytree(text_encoder, out / "text_encoder")  # the launcher insists on one
    write_vllm_adapter(out, str(tiny_dir), dtype="float32", logprobs=logprobs)
    config = out / "mllm_vllm" / "config.pbtxt"
    text = config.read_text().replace('backend: "vllm"', 'backend: "python"')
    config.write_text(text.replace("KIND_MODEL", "KIND_CPU"))
    shutil.copyfile(STANDIN, out / "mllm_vllm" / "1" / "model.py")
    return out


@pytest.fixture(scope="module")
def server(
    tiny_dir: Path, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """Our own tritonserver and repository (the session's is left alone)."""
    repo = standin_repository(
        tmp_path_factory.mktemp("vllm_repository"),
        tiny_dir,
        model_repository / "text_encoder",
        VOCAB,
    )
    running = start_triton(repo, tmp_path_factory.mktemp("vllm_triton") / "server.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local(tiny_dir: Path) -> Qwen2VLBackend:
    torch.set_num_threads(2)
    return Qwen2VLBackend(tiny_dir)


def test_model_key_is_the_cpu_paths(server, local) -> None:
    async def info(client):
        return client.model_key, client.can_generate

    assert run(info, server.grpc_url) == (local.model_key, True)


def test_score_equals_in_process(server, local) -> None:
    images = crops()
    served = run(lambda c: c.score(images, PROMPTS), server.grpc_url)
    want = local.score(images, PROMPTS)
    np.testing.assert_allclose(served, want, atol=1e-5)
    assert len(set(np.round(want, 4))) == 3  # three different pairs, not one value repeated
    one_prompt = run(lambda c: c.score(images, PROMPTS[:1]), server.grpc_url)
    np.testing.assert_allclose(one_prompt, local.score(images, PROMPTS[:1]), atol=1e-5)


def test_generate_equals_in_process_and_streams(server, local) -> None:
    image = crops()[2]

    async def both(client):
        text = await client.generate([image], "Describe the person.", 12)
        pieces = [p async for p in client.stream_generate([image], "Describe the person.", 8)]
        aggregated = await client.generate([], "Aggregate: a man. He wears a hat.", 6)
        return text, pieces, aggregated

    text, pieces, aggregated = run(both, server.grpc_url)
    assert text == local.generate([image], "Describe the person.", 12)
    assert text  # the random model says something
    assert len(pieces) > 1  # streamed through BLS piece by piece, not in one response
    assert "".join(pieces).strip() == local.generate([image], "Describe the person.", 8)
    assert aggregated == local.generate([], "Aggregate: a man. He wears a hat.", 6)


def test_few_logprobs_follow_the_bound_when_an_answer_word_is_not_listed(
    tiny_dir: Path, model_repository: Path, tmp_path: Path, local
) -> None:
    """With few top log-probabilities (the deployment asks 20 of a 150k vocabulary) an answer
    word may be missing: the served P(Yes) is the bound rule (`p_yes`) applied to exactly the
    top K the model gives, K chosen here so that some pair lists one word and not the other."""
    images = crops()
    batch = local._encode([[im] for im in images], PROMPTS)
    with torch.inference_mode():
        logits = local.model(**batch, logits_to_keep=1).logits[:, -1, :].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    order = torch.argsort(logprobs, dim=-1, descending=True, stable=True).tolist()
    ids = [*local.yes_ids, *local.no_ids]
    k = max(2, 1 + min(row.index(i) for row in order for i in ids))  # best answer id listed
    tops = [{t: float(logprobs[r, t]) for t in row[:k]} for r, row in enumerate(order)]
    want = [p_yes(top, local.yes_ids, local.no_ids) for top in tops]
    one_word = [
        (pooled(top, local.yes_ids) is None) != (pooled(top, local.no_ids) is None) for top in tops
    ]
    assert any(one_word), "K lists both words for every pair: nothing bounded to check"
    repo = standin_repository(tmp_path / "repo", tiny_dir, model_repository / "text_encoder", k)
    running = start_triton(repo, tmp_path / "server.log")
    try:
        served = run(lambda c: c.score(images, PROMPTS), running.grpc_url)
    finally:
        running.stop()
    np.testing.assert_allclose(served, want, atol=1e-5)
    exact = local.score(images, PROMPTS)
    assert any(abs(s - e) > 1e-3 for s, e, o in zip(served, exact, one_word, strict=True) if o)


def test_score_pairs_are_in_flight_together(
    tiny_dir: Path, model_repository: Path, tmp_path: Path
) -> None:
    """vLLM batches what it has in flight: the adapter must not send the pairs one after
    another. Three stand-in instances log when each request runs; with the pairs all in
    flight, three start before the first one ends."""
    repo = standin_repository(tmp_path / "repo", tiny_dir, model_repository / "text_encoder", 20)
    timeline = tmp_path / "timeline.jsonl"
    config = repo / "mllm_vllm" / "config.pbtxt"
    config.write_text(
        config.read_text().replace("count: 1", "count: 3")
        + f'parameters {{ key: "timeline" value {{ string_value: "{timeline}" }} }}\n'
    )
    running = start_triton(repo, tmp_path / "server.log")
    try:
        run(lambda c: c.score(crops() * 2, PROMPTS[:1]), running.grpc_url)
    finally:
        running.stop()
    spans = sorted(json.loads(line) for line in timeline.read_text().splitlines())
    assert len(spans) == 6
    first_end = min(end for _, end in spans)
    assert sum(start < first_end for start, _ in spans) == 3, spans


def test_config_names_the_vllm_backends_tensors(tmp_path: Path, tiny_dir: Path) -> None:
    """Static: the written mllm_vllm config is the vLLM backend's (parsed with Triton's proto)."""
    write_vllm_adapter(tmp_path, "/models/Qwen2-VL-7B-Instruct")
    config = text_format.Parse((tmp_path / "mllm_vllm/config.pbtxt").read_text(), mc.ModelConfig())
    assert config.backend == "vllm" and config.model_transaction_policy.decoupled
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_MODEL
    assert [i.name for i in config.input] == [n for n, *_ in VLLM_INPUTS]
    assert [o.name for o in config.output] == [n for n, *_ in VLLM_OUTPUTS]
    engine = json.loads((tmp_path / "mllm_vllm/1/model.json").read_text())
    assert engine["mm_processor_kwargs"]["max_pixels"] == 224 * 224
    assert engine["max_logprobs"] >= 20 and engine["dtype"] == "bfloat16"
    front = text_format.Parse((tmp_path / "mllm/config.pbtxt").read_text(), mc.ModelConfig())
    assert front.parameters["backend"].string_value == "vllm"
    options = json.loads(front.parameters["options"].string_value)
    assert options == {
        "dtype": "bfloat16",
        "image_pixels": 224 * 224,
        "logprobs": 20,
        "vllm_model": "mllm_vllm",
    }


class _NoTransport:
    def submit(self, requests):
        raise AssertionError("not called")


@pytest.mark.unit
def test_requests_carry_fitted_crops_and_one_placeholder(tiny_dir: Path) -> None:
    import base64
    import io

    adapter = VllmAdapterBackend(tiny_dir, transport=_NoTransport(), logprobs=20)
    requests = adapter.requests_for_score(crops(), PROMPTS[:1])
    assert len(requests) == 3
    for request, crop in zip(requests, crops(), strict=True):
        assert request.text_input.count("<|image_pad|>") == 1
        assert request.text_input.endswith("<|im_start|>assistant\n")
        assert request.return_logprobs and request.exclude_input_in_output
        assert not request.stream
        assert dict(request.sampling_parameters) == {
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 20,
        }
        (b64,) = request.images
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert image.format == "PNG"
        h, w = budget_size(crop.shape[0], crop.shape[1], 224 * 224)
        assert image.size == (w, h)  # vLLM's resize within [784, 50176] px is then a no-op
    generate = adapter.request_for_generate([], "Aggregate.", 7)
    assert generate.stream and generate.images == () and "<|image_pad|>" not in generate.text_input
    assert dict(generate.sampling_parameters) == {"max_tokens": 7, "temperature": 0.0}


@pytest.mark.unit
def test_p_yes_from_logprobs() -> None:
    # The format of vllm_backend's `logprobs` output: token ids as JSON object keys.
    raw = json.dumps(
        [
            {
                "5": {"logprob": -0.1, "rank": 1, "decoded_token": "Yes"},
                "7": {"logprob": -2.5, "rank": 2, "decoded_token": "No"},
            }
        ]
    )
    (step,) = parse_logprobs(raw) or []
    assert step == {5: -0.1, 7: -2.5}
    assert p_yes(step, [5], [7]) == pytest.approx(1 / (1 + math.exp(-2.4)))
    # Two spellings of Yes pool with logsumexp.
    pooled = {1: math.log(0.3), 2: math.log(0.2), 3: math.log(0.25)}
    assert p_yes(pooled, [1, 2], [3]) == pytest.approx(0.5 / 0.75)
    # No missing: bounded by the smallest listed probability and the mass not listed.
    assert p_yes({1: math.log(0.6), 9: math.log(0.3)}, [1], [3]) == pytest.approx(0.6 / 0.7)
    assert p_yes({1: math.log(0.95), 9: math.log(0.04)}, [1], [3]) == pytest.approx(0.95 / 0.96)
    assert p_yes({9: -0.01}, [1], [3]) == 0.0  # neither: not an answer
    assert parse_logprobs("null") is None
