"""THI through the running stack: tritonserver hosting the encoders and the demo MLLM
(python backend), `icl serve --mllm-model mllm` over gRPC, Milvus Lite and the crop store.

The expected result is computed in this process with the same engine, the same ONNX graphs
and the same demo MLLM weights over the same crops: online and offline must agree.
"""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
from PIL import Image

from icl.images import decode_crop
from icl.mllm.demo import load_demo_backend
from icl.mllm.inprocess import InProcessMllm
from icl.onnx_encoders import OnnxEncoders
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl.thi.engine import (
    NO_ANCHOR_NO_CANDIDATES,
    NO_ANCHOR_NO_YES,
    NO_ANCHOR_RANK1_NO,
    NO_ANCHOR_RANK1_YES,
    ThiParams,
    fuse,
    run_thi,
)
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import enroll_all, gallery_images, start_orchestrator

N_IMAGES = 60
QUERIES = demo_queries(seed=5, count=8)


@pytest.fixture(scope="module")
def thi_service(triton, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("thi")
    running = start_orchestrator(
        triton.grpc_url, work / "gallery.db", work / "serve.log", ICL_MLLM_MODEL="mllm"
    )
    demo = list(demo_gallery(N_IMAGES, seed=5))
    with running.channel() as channel:
        results = enroll_all(pb_grpc.PersonSearchStub(channel), gallery_images(demo))
    assert all(r.status == pb.EnrollResult.ACCEPTED for r in results)
    yield running, demo
    running.stop()


def _search(running, text: str, **thi) -> pb.SearchResponse:
    request = search_request(text, top_k=10)
    request.thi.enabled = True
    for key, value in thi.items():
        setattr(request.thi, key, value)
    with running.channel() as channel:
        return pb_grpc.PersonSearchStub(channel).Search(request, timeout=60)


def _offline(model_repository, demo, text: str, params: ThiParams):
    local = OnnxEncoders.from_repository(model_repository)
    gallery = local.embed_images(np.stack([decode_crop(d.png, local.image_size) for d in demo]))
    query = local.embed_texts([text])[0]
    base = gallery @ query
    order = np.argsort(-base, kind="stable")[: params.candidates]
    crops = {d.image_id: np.asarray(Image.open(io.BytesIO(d.png)).convert("RGB")) for d in demo}

    async def load(ids):
        return [crops[i] for i in ids]

    ids = [demo[i].image_id for i in order]
    outcome = asyncio.run(
        run_thi(text, ids, base[order].tolist(), load, InProcessMllm(load_demo_backend()), params)
    )
    if outcome.anchor is None:
        scores = base
    else:
        refined = gallery @ local.embed_texts([outcome.refined_query])[0]
        anchor = [d.image_id for d in demo].index(ids[outcome.anchor])
        scores = fuse(base, refined, anchor, params.lam)
    top = np.argsort(-scores, kind="stable")[:10]
    return outcome, [demo[i].image_id for i in top], scores[top]


def test_online_thi_equals_offline_engine(thi_service, model_repository) -> None:
    running, demo = thi_service
    anchored = 0
    for text in QUERIES:
        reply = _search(running, text, xi=1.0)  # xi 1: every query walks the candidates
        outcome, ids, scores = _offline(model_repository, demo, text, ThiParams(xi=1.0))
        trace = reply.thi_trace
        assert trace.fallback_reason == outcome.fallback_reason
        assert [c.base_rank for c in trace.candidates] == [1, 2, 3, 4, 5]
        asked = {c.base_rank - 1: c.p_yes for c in trace.candidates if c.asked}
        assert asked.keys() == outcome.p_yes.keys()
        for pos, p in asked.items():
            assert p == pytest.approx(outcome.p_yes[pos], abs=1e-4)
        assert trace.mllm_calls == outcome.evaluations
        assert list(trace.vqa_answers) == outcome.answers
        assert trace.refined_query == outcome.refined_query
        assert [h.image_id for h in reply.hits] == ids
        np.testing.assert_allclose([h.score for h in reply.hits], scores, atol=1e-4)
        anchored += outcome.anchor is not None
        if outcome.anchor is not None:
            assert trace.anchor_image_id == reply.hits[0].image_id or trace.anchor_image_id in {
                h.image_id for h in reply.hits
            }
    assert anchored > 0, "no query found an anchor: the comparison would be vacuous"


def test_the_trace_says_why_no_anchor_was_found(thi_service, model_repository) -> None:
    """Every search that keeps the base ranking says why, as the engine does in-process:
    xi 1 walks the candidates (rank 1 Yes, or nobody Yes), xi -1 asks rank 1 only."""
    running, _ = thi_service
    seen = set()
    for xi, possible in (
        (1.0, {NO_ANCHOR_RANK1_YES, NO_ANCHOR_NO_YES}),
        (-1.0, {NO_ANCHOR_RANK1_NO}),
    ):
        for text in QUERIES:
            trace = _search(running, text, xi=xi).thi_trace
            if trace.anchor_image_id:
                assert trace.fallback_reason == ""
                continue
            assert trace.fallback_reason in possible, (xi, trace.fallback_reason)
            assert trace.refined_query == "" and list(trace.vqa_answers) == []
            seen.add(trace.fallback_reason)
    assert NO_ANCHOR_RANK1_NO in seen, "no query's rank 1 said No: the check would be vacuous"
    assert seen & {NO_ANCHOR_RANK1_YES, NO_ANCHOR_NO_YES}, "every walk found an anchor"
    # A time window no image falls in: no candidates at all.
    request = search_request(QUERIES[0], top_k=5, start=1, end=2)
    request.thi.enabled = True
    with running.channel() as channel:
        reply = pb_grpc.PersonSearchStub(channel).Search(request, timeout=60)
    assert list(reply.hits) == [] and reply.thi_trace.fallback_reason == NO_ANCHOR_NO_CANDIDATES


def test_vqa_answers_are_cached_in_the_gallery(thi_service) -> None:
    running, _ = thi_service
    for text in QUERIES:
        first = _search(running, text, xi=1.0).thi_trace
        if first.anchor_image_id:
            second = _search(running, text, xi=1.0).thi_trace
            assert list(second.vqa_answers) == list(first.vqa_answers)
            # Same anchor, answers from the gallery's cache: one VQA call fewer.
            assert second.mllm_calls == first.mllm_calls - (
                first.mllm_calls > len([c for c in first.candidates if c.asked])
            )
            return
    pytest.fail("no query found an anchor")


def test_thi_parameters_are_checked(thi_service) -> None:
    running, _ = thi_service
    with pytest.raises(grpc.RpcError) as err:
        _search(running, QUERIES[0], candidates=0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        _search(running, QUERIES[0], **{"lambda": 1.5})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_slow_mllm_degrades_to_the_base_ranking(triton, tmp_path) -> None:
    running = start_orchestrator(
        triton.grpc_url,
        tmp_path / "gallery.db",
        tmp_path / "serve.log",
        ICL_MLLM_MODEL="mllm",
        # The engine's first step awaits a thread (crop loading): it cannot finish in 1 us.
        ICL_MLLM_TIMEOUT="0.000001",
    )
    try:
        demo = list(demo_gallery(12, seed=9))
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            enroll_all(stub, gallery_images(demo))
            base = stub.Search(search_request(QUERIES[0], top_k=5), timeout=30)
        reply = _search(running, QUERIES[0])
        reason = reply.thi_trace.fallback_reason
        assert "did not answer" in reason, reason
        got, want = [h.image_id for h in reply.hits][:5], [h.image_id for h in base.hits]
        assert got == want, (got, want)
    finally:
        running.stop()
