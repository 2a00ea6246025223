"""The `mllm` Triton model hosting Qwen2VLBackend, reached through TritonMllm.

The real tritonserver (CPU, python backend) serves the real `mllm` model.py; the backend is the
tiny randomly initialised Qwen2-VL of test_mllm_qwen2vl (no real VLM weights can be had here).
Numbers and text must equal the in-process backend's; malformed requests must get an error
response and leave the server serving.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from icl.export.mllm_repository import render_mllm_config, write_mllm_model
from icl.mllm.qwen2vl import Qwen2VLBackend
from icl.orchestrator.triton.mllm import MllmRequestError, MllmUnavailable, TritonMllm, encode_png
from icl.orchestrator.tritonserver import TritonServer, free_port
from tests.helpers import start_triton
from tests.test_mllm_qwen2vl import PROMPTS, build_tiny_qwen2vl, crops

MAX_NEW_TOKENS = 12
VLLM_DIR = Path(__file__).resolve().parents[1] / "docker" / "mllm-vllm"


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """config.pbtxt through Triton's own ModelConfig proto (a typo fails here, not on a GPU)."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2vl(tmp_path_factory.mktemp("mllm") / "tiny-qwen2vl")


@pytest.fixture(scope="module")
def mllm_server(
    tiny_dir: Path, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("mllm_repository")
    # The launcher insists on a text_encoder (the service's own repository always has one).
    shutil.copytree(model_repository / "text_encoder", repo / "text_encoder")
    write_mllm_model(
        repo, "qwen2vl", str(tiny_dir), threads=2, options={"max_new_tokens": MAX_NEW_TOKENS}
    )
    server = start_triton(repo, tmp_path_factory.mktemp("mllm_triton") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local(tiny_dir: Path) -> Qwen2VLBackend:
    torch.set_num_threads(2)
    return Qwen2VLBackend(tiny_dir, max_new_tokens=MAX_NEW_TOKENS)


def run(coro_fn, url: str, **kwargs):
    """Run `coro_fn(client)` against a started TritonMllm, closing it afterwards."""

    async def main():
        client = TritonMllm(url, **kwargs)
        try:
            await client.start(ready_timeout_s=10)
            return await coro_fn(client)
        finally:
            await client.close()

    return asyncio.run(main())


def test_info_reports_the_backend_model_key(mllm_server, local) -> None:
    async def info(client):
        return client.model_key, client.can_generate

    assert run(info, mllm_server.grpc_url) == (local.model_key, True)


def test_score_matches_in_process(mllm_server, local) -> None:
    images = crops()
    served = run(lambda c: c.score(images, PROMPTS), mllm_server.grpc_url)
    np.testing.assert_allclose(served, local.score(images, PROMPTS), atol=1e-5)
    one_prompt = run(lambda c: c.score(images, PROMPTS[:1]), mllm_server.grpc_url)
    np.testing.assert_allclose(one_prompt, local.score(images, PROMPTS[:1]), atol=1e-5)


def test_stored_crops_travel_as_they_were_enrolled(mllm_server, local, monkeypatch) -> None:
    """A crop from the crop store (an EncodedImage) goes to Triton as its stored bytes, here
    JPEG: nothing is encoded again, and P(Yes) is the in-process one on the same pixels."""
    import io

    from PIL import Image

    import icl.orchestrator.triton.mllm as client_module
    from icl.images import EncodedImage

    stored = []
    for image in crops():
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=85)
        stored.append(EncodedImage.decode(buf.getvalue()))

    def no_encoding(image):
        raise AssertionError("a stored crop was encoded again")

    monkeypatch.setattr(client_module, "encode_png", no_encoding)
    served = run(lambda c: c.score(stored, PROMPTS), mllm_server.grpc_url)
    np.testing.assert_allclose(
        served, local.score([np.asarray(s) for s in stored], PROMPTS), atol=1e-5
    )


def test_generate_matches_in_process_and_streams(mllm_server, local) -> None:
    image = crops()[2]

    async def both(client):
        text = await client.generate([image], "Describe the person.", MAX_NEW_TOKENS)
        pieces = [p async for p in client.stream_generate([image], "Describe the person.", 8)]
        aggregated = await client.generate([], "Aggregate: a man. He wears a hat.", 6)
        return text, pieces, aggregated

    text, pieces, aggregated = run(both, mllm_server.grpc_url)
    assert text == local.generate([image], "Describe the person.", MAX_NEW_TOKENS)
    assert "".join(pieces).strip() == local.generate([image], "Describe the person.", 8)
    assert aggregated == local.generate([], "Aggregate: a man. He wears a hat.", 6)


def test_bad_requests_get_errors_and_the_server_keeps_serving(mllm_server, local) -> None:
    image = crops()[1]

    async def bad(client, task, **kwargs):
        with pytest.raises(MllmRequestError) as info:
            await client._request(task, timeout_s=20, **kwargs)
        return str(info.value)

    async def scenario(client):
        messages = [
            await bad(client, "caption", prompts=["x"]),
            await bad(client, "score", prompts=["x"]),  # IMAGES absent
            await bad(client, "score", images=[image] * 2, prompts=["a", "b", "c"]),
            await bad(client, "generate", images=[image], prompts=["a", "b"]),
            await bad(client, "generate", prompts=["a"], max_tokens=0),
        ]
        messages.append(await bad(client, "score", encoded_images=[], prompts=["x"]))
        messages.append(await bad(client, "score", encoded_images=[b"not a png"], prompts=["x"]))
        after = await client.score([image], PROMPTS[:1])
        return messages, after

    messages, after = run(scenario, mllm_server.grpc_url)
    assert "TASK must be one of" in messages[0]
    assert "at least one image" in messages[1]
    assert "1 or 2 PROMPTS" in messages[2]
    assert "exactly one prompt" in messages[3]
    assert "MAX_TOKENS" in messages[4]
    assert "at least one image" in messages[5]  # an empty IMAGES tensor
    assert "IMAGES[0] is not a decodable PNG/JPEG" in messages[6]
    np.testing.assert_allclose(after, local.score([image], PROMPTS[:1]), atol=1e-5)
    assert encode_png(image)[:4] == b"\x89PNG"


def test_missing_model_or_server_is_unavailable(mllm_server) -> None:
    with pytest.raises(MllmUnavailable, match="does not serve"):
        run(lambda c: c.score(crops()[:1], ["x"]), mllm_server.grpc_url, model="no_such_model")

    async def unstarted(url):
        client = TritonMllm(url, timeout_s=3)
        try:
            return await client.score(crops()[:1], ["x"])
        finally:
            await client.close()

    with pytest.raises(MllmUnavailable):  # nothing listens there
        asyncio.run(unstarted(f"127.0.0.1:{free_port()}"))
    with pytest.raises(MllmUnavailable, match="no_such_model"):  # served, but not that model
        asyncio.run(_score_unknown_model(mllm_server.grpc_url))


async def _score_unknown_model(url: str) -> list[float]:
    client = TritonMllm(url, model="no_such_model", timeout_s=5)
    try:
        return await client.score(crops()[:1], ["x"])
    finally:
        await client.close()


def test_config_refuses_what_the_model_would() -> None:
    with pytest.raises(ValueError, match="unknown MLLM backend"):
        render_mllm_config("llava", "/m")
    with pytest.raises(ValueError, match="needs a model path"):
        render_mllm_config("qwen2vl", None)
    config = parse_config(render_mllm_config("demo", None, instances=2, options={"a": 1}))
    assert config.name == "mllm" and config.backend == "python"
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert config.instance_group[0].count == 2
    assert [i.name for i in config.input] == ["TASK", "IMAGES", "PROMPTS", "MAX_TOKENS"]
    assert [o.name for o in config.output] == ["P_YES", "TEXT", "MODEL_KEY", "CAN_GENERATE"]
    assert config.parameters["backend"].string_value == "demo"
    assert json.loads(config.parameters["options"].string_value) == {"a": 1}


def test_vllm_deployment_files_name_the_right_fields() -> None:
    """Static checks only: the vLLM deployment needs a GPU and NGC's image (docs/mllm.md)."""
    config = parse_config((VLLM_DIR / "model_repository/mllm_vllm/config.pbtxt").read_text())
    assert config.name == "mllm_vllm" and config.backend == "vllm"
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    engine = json.loads((VLLM_DIR / "model_repository/mllm_vllm/1/model.json").read_text())
    assert engine["model"].endswith("Qwen2-VL-7B-Instruct")
    assert engine["mm_processor_kwargs"]["max_pixels"] == 224 * 224  # the paper's budget
    assert engine["limit_mm_per_prompt"] == {"image": 1}
    assert engine["max_logprobs"] >= 20  # P(Yes) is read from the top-20 logprobs
    compose = yaml.safe_load((VLLM_DIR / "compose.yaml").read_text())
    service = compose["services"]["triton-mllm"]
    assert "vllm-python-py3" in service["image"]
    assert "./model_repository:/model_repository:ro" in service["volumes"]
