"""The service over a Milvus server that goes away and comes back (real tritonserver, real
`icl serve`, the real Milvus 2.3.5 server): every gallery call answers UNAVAILABLE while
Milvus is down, and the same service serves again once it is back on the same address."""

from __future__ import annotations

import time

import grpc
import pytest

from icl.synthetic.demo_gallery import demo_gallery
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import enroll_all, gallery_images, start_milvus_server, start_orchestrator

RECOVERY_S = 60


def _calls(stub, images):
    """Search (plain, and on a camera with no image: the camera check queries Milvus),
    Enroll and Delete, each a callable."""
    return {
        "search": lambda: stub.Search(search_request("a woman", top_k=5), timeout=30),
        "search-camera": lambda: stub.Search(
            search_request("a woman", top_k=5, camera_ids=["cam-none"]), timeout=30
        ),
        "enroll": lambda: enroll_all(stub, images[:2]),
        "delete": lambda: stub.Delete(pb.DeleteRequest(image_ids=["no-such-image"]), timeout=30),
    }


def test_milvus_outage_is_unavailable_and_the_service_recovers(triton, tmp_path, monkeypatch):
    monkeypatch.setenv("ICL_MILVUS_TOKEN", "root:Milvus")  # the server's default user
    milvus = start_milvus_server(tmp_path / "milvus")
    service = None
    try:
        service = start_orchestrator(triton.grpc_url, milvus.uri, tmp_path / "serve.log")
        images = gallery_images(demo_gallery(8))
        with service.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            assert all(r.status == pb.EnrollResult.ACCEPTED for r in enroll_all(stub, images))
            calls = _calls(stub, images)
            milvus.stop()
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (name, info.value)
                assert "gallery unavailable" in info.value.details(), name
            milvus._auto_port = False  # the same address the service dials
            milvus.start()
            deadline = time.monotonic() + RECOVERY_S
            for name, call in calls.items():
                while True:
                    try:
                        call()
                        break
                    except grpc.RpcError as exc:
                        if name == "search-camera" and exc.code() == grpc.StatusCode.NOT_FOUND:
                            break
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE, (name, exc)
                        assert time.monotonic() < deadline, f"{name} not back: {exc.details()}"
                        time.sleep(0.5)
            hits = calls["search"]().hits
            assert len(hits) == 5
        log = service.log.read_text()
        # The outage is logged (a failed call, or health turning NOT_SERVING, after which
        # calls fail at once without reaching Milvus), the token never.
        assert "Milvus search failed" in log or "NOT_SERVING: not ready: Milvus" in log
        assert "root:Milvus" not in log
    finally:
        if service is not None:
            service.stop()
        milvus.stop()
