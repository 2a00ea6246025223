"""The service's search, enrolment, delete and THI logic with in-process adapters: the
demo encoders on onnxruntime (the same ONNX graphs Triton serves), the in-memory gallery,
a crop store on disk and the demo MLLM in process. No server is started; the same logic runs
behind gRPC in the service (tests/test_search_e2e.py, tests/test_thi_online.py)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from icl.images import decode_crop
from icl.mllm.demo import load_demo_backend
from icl.mllm.inprocess import InProcessMllm
from icl.onnx_encoders import OnnxEncoders
from icl.orchestrator.crops import CropMissing, CropStore
from icl.orchestrator.memory_gallery import MemoryGallery
from icl.orchestrator.server import PersonSearchService
from icl.orchestrator.validation import InvalidRequest
from icl.ports import GalleryFilter
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl_api import pb
from icl_api.client import delete_request, search_request
from tests.helpers import gallery_images

pytestmark = pytest.mark.unit


def no_deadline() -> float | None:
    return None


@pytest.fixture(scope="module")
def encoders(model_repository):
    return OnnxEncoders.from_repository(model_repository)


@pytest.fixture
def service(encoders, tmp_path):
    dim = encoders.embed_texts(["x"]).shape[1]
    svc = PersonSearchService(
        encoders,
        MemoryGallery(dim),
        CropStore(tmp_path / "crops"),
        InProcessMllm(load_demo_backend()),
    )
    demo = list(demo_gallery(60, seed=5))
    images = gallery_images(demo)
    for start in range(0, len(images), 16):
        reply = asyncio.run(
            svc.enroll_batch(pb.EnrollRequest(images=images[start : start + 16]), no_deadline)
        )
        assert all(r.status == pb.EnrollResult.ACCEPTED for r in reply.results)
    yield svc, demo
    svc.close()


def test_search_ranks_like_exact_search_over_the_encoders(service, encoders):
    svc, demo = service
    text = demo_queries(seed=5)[0]
    reply = asyncio.run(svc.search(search_request(text, top_k=10), no_deadline))
    emb = encoders.embed_images(np.stack([decode_crop(d.png, encoders.image_size) for d in demo]))
    scores = emb @ encoders.embed_texts([text])[0]
    expected = [demo[i].image_id for i in np.argsort(-scores, kind="stable")[:10]]
    assert [h.image_id for h in reply.hits] == expected
    np.testing.assert_allclose([h.score for h in reply.hits], np.sort(scores)[::-1][:10], atol=1e-5)


def test_filters_and_unknown_cameras(service):
    svc, demo = service
    camera = demo[0].camera_id
    reply = asyncio.run(
        svc.search(search_request("a person", top_k=100, camera_ids=[camera]), no_deadline)
    )
    assert reply.hits and {h.camera_id for h in reply.hits} == {camera}
    assert len(reply.hits) == sum(d.camera_id == camera for d in demo)
    with pytest.raises(InvalidRequest) as exc:
        asyncio.run(svc.search(search_request("a person", camera_ids=["cam-99"]), no_deadline))
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InvalidRequest) as exc:
        asyncio.run(svc.search(search_request("   "), no_deadline))
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_enroll_rejects_bad_items_one_by_one_and_delete_removes_rows_and_crops(service):
    svc, demo = service
    good = gallery_images([demo[0]])[0]
    good.image_id = "fresh-1"
    bad = pb.GalleryImage(image_id="broken", camera_id="cam-01", image=b"not an image")
    bad.captured_at.FromMilliseconds(demo[0].captured_at_ms)
    reply = asyncio.run(svc.enroll_batch(pb.EnrollRequest(images=[bad, good]), no_deadline))
    assert [r.status for r in reply.results] == [pb.EnrollResult.REJECTED, pb.EnrollResult.ACCEPTED]
    assert reply.results[0].reason
    assert svc.gallery.count() == len(demo) + 1
    deleted = asyncio.run(svc.delete(delete_request(image_ids=["fresh-1", "never-there"])))
    assert deleted.deleted == 1
    assert svc.gallery.count() == len(demo)
    assert svc.gallery.fetch(["fresh-1"]) == []
    with pytest.raises(CropMissing):
        svc.crops.load(["fresh-1"])
    on_camera = asyncio.run(svc.delete(delete_request(camera_ids=[demo[0].camera_id])))
    assert on_camera.deleted == sum(d.camera_id == demo[0].camera_id for d in demo)
    assert svc.gallery.unknown_cameras([demo[0].camera_id]) == [demo[0].camera_id]
    everything = np.ones(svc.gallery.dim, np.float32)
    assert not svc.gallery.search(everything, 5, GalleryFilter(camera_ids=(demo[0].camera_id,)))


def test_thi_search_returns_a_trace_and_keeps_base_scores_without_an_anchor(service):
    svc, _ = service
    for text in demo_queries(seed=5, count=3):
        request = search_request(text, top_k=5)
        base = asyncio.run(svc.search(request, no_deadline))
        request.thi.enabled = True
        reply = asyncio.run(svc.search(request, no_deadline))
        trace = reply.thi_trace
        assert [c.image_id for c in trace.candidates] == [h.image_id for h in base.hits]
        assert any(c.asked for c in trace.candidates) and trace.mllm_calls >= 1
        if trace.anchor_image_id:
            assert trace.refined_query and trace.vqa_answers and not trace.fallback_reason
            assert reply.hits[0].image_id == trace.anchor_image_id  # S_ref[anchor] = 1
        else:
            assert trace.fallback_reason.startswith("no anchor")
            assert [h.image_id for h in reply.hits] == [h.image_id for h in base.hits]


def test_thi_without_an_mllm_is_a_failed_precondition(encoders, tmp_path):
    svc = PersonSearchService(encoders, MemoryGallery(8), CropStore(tmp_path))
    request = search_request("a man", top_k=5)
    request.thi.enabled = True
    with pytest.raises(InvalidRequest) as exc:
        asyncio.run(svc.search(request, no_deadline))
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    svc.close()
