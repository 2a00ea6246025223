"""What Enroll acknowledged survives a restart of the service, graceful or not (Milvus Lite)."""

from __future__ import annotations

import pytest

from icl.synthetic.demo_gallery import demo_gallery
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import enroll_all, gallery_images, start_orchestrator


def _ranking(running) -> list[tuple[str, float]]:
    with running.channel() as channel:
        reply = pb_grpc.PersonSearchStub(channel).Search(
            search_request("a woman with long hair", top_k=100), timeout=30
        )
    return [(h.image_id, round(h.score, 5)) for h in reply.hits]


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_enrolled_images_survive_a_restart(triton, tmp_path, how):
    db = tmp_path / "gallery.db"
    first = start_orchestrator(triton.grpc_url, db, tmp_path / "a.log")
    try:
        with first.channel() as channel:
            results = enroll_all(
                pb_grpc.PersonSearchStub(channel), gallery_images(demo_gallery(24))
            )
        assert all(r.status == pb.EnrollResult.ACCEPTED for r in results)
        before = _ranking(first)
        assert len(before) == 24
    finally:
        if how == "sigkill":
            first.process.kill()
            first.process.wait()
        first.stop()
    second = start_orchestrator(triton.grpc_url, db, tmp_path / "b.log")
    try:
        assert _ranking(second) == before
    finally:
        second.stop()
