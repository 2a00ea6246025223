"""End to end: Enroll and Search through the real tritonserver, `icl serve` and Milvus Lite.

The expected ranking comes from the same ONNX graphs run in this process, so the test checks
that the whole path (decode, resize, Triton batching, Milvus HNSW inner product) reproduces it.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from icl.images import decode_crop
from icl.onnx_encoders import OnnxEncoders
from icl.orchestrator.crops import CropMissing, CropStore
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import enroll_all, gallery_images

N_IMAGES = 60


@pytest.fixture(scope="module")
def enrolled(orchestrator):
    demo = list(demo_gallery(N_IMAGES, seed=3))
    with orchestrator.channel() as channel:
        results = enroll_all(pb_grpc.PersonSearchStub(channel), gallery_images(demo))
    assert [r.status for r in results] == [pb.EnrollResult.ACCEPTED] * N_IMAGES
    return demo


@pytest.fixture(scope="module")
def local(model_repository) -> OnnxEncoders:
    return OnnxEncoders.from_repository(model_repository)


def _expected(local: OnnxEncoders, demo, text: str) -> tuple[list[str], np.ndarray]:
    pixels = np.stack([decode_crop(d.png, local.image_size) for d in demo])
    scores = local.embed_images(pixels) @ local.embed_texts([text])[0]
    order = np.argsort(-scores, kind="stable")
    return [demo[i].image_id for i in order], scores[order]


@pytest.mark.parametrize("text", demo_queries(seed=3, count=4))
def test_search_returns_the_in_process_ranking(orchestrator, enrolled, local, text):
    ids, scores = _expected(local, enrolled, text)
    # The nearest neighbour must be well defined for the check to mean anything.
    assert scores[0] - scores[1] > 1e-4
    with orchestrator.channel() as channel:
        reply = pb_grpc.PersonSearchStub(channel).Search(search_request(text, top_k=10), timeout=30)
    got_ids = [h.image_id for h in reply.hits]
    got_scores = np.array([h.score for h in reply.hits])
    assert got_ids[0] == ids[0]
    assert len(got_ids) == 10
    np.testing.assert_allclose(got_scores, scores[:10], atol=1e-4)
    expected_by_id = dict(zip(ids, scores, strict=True))
    np.testing.assert_allclose(got_scores, [expected_by_id[i] for i in got_ids], atol=1e-4)


def test_hits_carry_the_enrolled_metadata(orchestrator, enrolled):
    by_id = {d.image_id: d for d in enrolled}
    with orchestrator.channel() as channel:
        reply = pb_grpc.PersonSearchStub(channel).Search(
            search_request("a man", top_k=5), timeout=30
        )
    for hit in reply.hits:
        d = by_id[hit.image_id]
        assert hit.camera_id == d.camera_id
        assert hit.captured_at.ToMilliseconds() == d.captured_at_ms
        assert hit.track_id == d.track_id
        assert hit.image_uri == f"demo://{d.image_id}.png"


def test_camera_and_time_filters_restrict_hits(orchestrator, enrolled, local):
    camera = enrolled[0].camera_id
    times = sorted(d.captured_at_ms for d in enrolled)
    start, end = times[10], times[40]
    text = "a woman in a red top"
    with orchestrator.channel() as channel:
        stub = pb_grpc.PersonSearchStub(channel)
        by_cam = stub.Search(search_request(text, top_k=50, camera_ids=[camera]), timeout=30)
        by_time = stub.Search(search_request(text, top_k=50, start=start, end=end), timeout=30)
    assert {h.camera_id for h in by_cam.hits} == {camera}
    assert len(by_cam.hits) == sum(d.camera_id == camera for d in enrolled)
    assert all(start <= h.captured_at.ToMilliseconds() <= end for h in by_time.hits)
    assert len(by_time.hits) == sum(start <= d.captured_at_ms <= end for d in enrolled)
    ids, _ = _expected(local, [d for d in enrolled if d.camera_id == camera], text)
    assert by_cam.hits[0].image_id == ids[0]


def test_enroll_is_idempotent_and_delete_removes(orchestrator, enrolled):
    with orchestrator.channel() as channel:
        stub = pb_grpc.PersonSearchStub(channel)
        again = enroll_all(stub, gallery_images(enrolled[:5]))
        assert all(r.status == pb.EnrollResult.ACCEPTED for r in again)
        every = stub.Search(search_request("a person", top_k=1000), timeout=30)
        assert sorted(h.image_id for h in every.hits) == sorted(d.image_id for d in enrolled)

        # The crop store (next to the Lite data dir) loses a deleted image's pixels too.
        crops = CropStore(orchestrator.log.parent / "crops")
        victim = enrolled[-1].image_id
        assert len(crops.load([victim])) == 1
        crops.put("never-enrolled", enrolled[0].png)  # as if a crash followed a delete
        gone = stub.Delete(pb.DeleteRequest(image_ids=[victim, "never-enrolled"]), timeout=30)
        assert gone.deleted == 1
        for image_id in (victim, "never-enrolled"):
            with pytest.raises(CropMissing):
                crops.load([image_id])
        left = stub.Search(search_request("a person", top_k=1000), timeout=30)
        assert victim not in {h.image_id for h in left.hits}
        assert len(left.hits) == N_IMAGES - 1

        camera = enrolled[0].camera_id
        on_camera = [d for d in enrolled[:-1] if d.camera_id == camera]
        request = pb.DeleteRequest(camera_ids=[camera])
        assert stub.Delete(request, timeout=30).deleted == len(on_camera)
        for d in on_camera:
            with pytest.raises(CropMissing):
                crops.load([d.image_id])
        kept = next(d for d in enrolled if d.camera_id != camera)
        assert len(crops.load([kept.image_id])) == 1
        with pytest.raises(grpc.RpcError) as err:  # the camera has no rows left
            stub.Search(search_request("a person", top_k=5, camera_ids=[camera]), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        enroll_all(stub, gallery_images([*on_camera, enrolled[-1]]))  # restore for other tests
        assert len(crops.load([victim])) == 1
