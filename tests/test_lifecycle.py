"""The service's life around its dependencies and its shutdown, against the real processes:
`icl serve` in its own process, a real tritonserver (CPU) that a test may stop and start
again, Milvus Lite, and gRPC health as a load balancer or Kubernetes would read it."""

from __future__ import annotations

import asyncio
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from icl.export.mllm_repository import write_mllm_model
from icl.orchestrator.server import SERVICE_NAME
from icl.orchestrator.triton.mllm import TritonMllm
from icl.orchestrator.tritonserver import TritonServer
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import enroll_all, gallery_images, start_orchestrator, start_triton

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
QUERY = demo_queries(seed=3, count=1)[0]
SLOW_MLLM = "mllm_slow"
MLLM_DELAY_S = 7.0  # every call of the slow MLLM takes this long (the demo model's test hook)


@pytest.fixture(scope="module")
def own_triton(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """A tritonserver of this module's own, which tests may stop and start again; it also
    serves a slow MLLM: the demo model answering every call after MLLM_DELAY_S."""
    repo = tmp_path_factory.mktemp("lifecycle_repository")
    for model in ("text_encoder", "image_encoder"):
        shutil.copytree(model_repository / model, repo / model)
    write_mllm_model(repo, "demo", None, name=SLOW_MLLM, options={"delay_s": MLLM_DELAY_S})
    server = start_triton(repo, tmp_path_factory.mktemp("lifecycle_triton") / "server.log")
    yield server
    server.stop()


def _status(health: health_pb2_grpc.HealthStub, service: str) -> int | None:
    try:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
    except grpc.RpcError:
        return None


def _wait_for_status(health: health_pb2_grpc.HealthStub, want: int, within_s: float) -> float:
    """Seconds until both the server ("") and PersonSearch report `want`."""
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if all(_status(health, s) == want for s in ("", SERVICE_NAME)):
            return time.monotonic() - start
        time.sleep(0.1)
    got = {s or '""': _status(health, s) for s in ("", SERVICE_NAME)}
    raise AssertionError(f"health not {want} within {within_s} s: {got}")


def test_health_follows_a_triton_outage(own_triton: TritonServer, tmp_path: Path) -> None:
    running = start_orchestrator(own_triton.grpc_url, tmp_path / "gallery.db", tmp_path / "log")
    try:
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            enroll_all(stub, gallery_images(demo_gallery(8, seed=3)))
            assert _status(health, "triton-encoders") == SERVING
            own_triton.stop()  # the outage
            assert _wait_for_status(health, NOT_SERVING, 10) < 5
            # Each dependency under its own name: the operator sees which one is down.
            assert _status(health, "triton-encoders") == NOT_SERVING
            assert _status(health, "milvus") == SERVING
            with pytest.raises(grpc.RpcError) as err:
                stub.Search(search_request(QUERY, top_k=3), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            own_triton.start()  # back on the same address and ports
            assert _wait_for_status(health, SERVING, 10) < 5  # the service was not restarted
            assert _status(health, "triton-encoders") == SERVING
            reply = stub.Search(search_request(QUERY, top_k=3), timeout=30)
            assert len(reply.hits) == 3
        assert running.process.poll() is None
    finally:
        running.stop()
        if own_triton.process is None:  # a failed assertion above: leave it running
            own_triton.start()


def test_sigterm_reports_not_serving_before_the_port_closes(triton, tmp_path: Path) -> None:
    running = start_orchestrator(triton.grpc_url, tmp_path / "gallery.db", tmp_path / "log")
    images = gallery_images(demo_gallery(8, seed=4))
    sent, release = threading.Event(), threading.Event()
    results: list[pb.EnrollResult] = []

    def batches() -> Iterator[pb.EnrollRequest]:
        yield pb.EnrollRequest(images=images[:4])
        sent.set()
        release.wait(20)  # the stream stays open: a call in flight when SIGTERM comes
        yield pb.EnrollRequest(images=images[4:])

    try:
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30
            )
            assert next(watch).status == SERVING
            enroll = threading.Thread(target=lambda: results.extend(enroll_all_of(stub, batches())))
            enroll.start()
            assert sent.wait(10)
            running.process.send_signal(signal.SIGTERM)
            assert next(watch).status == NOT_SERVING
            assert running.process.poll() is None  # still draining the Enroll stream
            release.set()
            enroll.join(30)
        assert [r.status for r in results] == [pb.EnrollResult.ACCEPTED] * len(images)
    finally:
        release.set()
        running.stop()


def enroll_all_of(stub: pb_grpc.PersonSearchStub, requests) -> list[pb.EnrollResult]:
    return [r for response in stub.Enroll(requests, timeout=30) for r in response.results]


def _thi_request(**thi: float) -> pb.SearchRequest:
    request = search_request(QUERY, top_k=5)
    request.thi.enabled = True
    for key, value in thi.items():
        setattr(request.thi, key, value)
    return request


def test_a_thi_search_that_gives_up_cancels_its_mllm_request(
    own_triton: TritonServer, tmp_path: Path
) -> None:
    async def direct_call() -> float:
        # `info` needs no backend work: it waits only for what the instance is still doing.
        client = TritonMllm(own_triton.grpc_url, SLOW_MLLM, timeout_s=30)
        try:
            start = time.monotonic()
            await client.start()
            return time.monotonic() - start
        finally:
            await client.close()

    running = start_orchestrator(
        own_triton.grpc_url,
        tmp_path / "gallery.db",
        tmp_path / "log",
        ICL_MLLM_MODEL=SLOW_MLLM,
        ICL_MLLM_TIMEOUT="1.5",
    )
    try:
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            enroll_all(stub, gallery_images(demo_gallery(12, seed=6)))
            reply = stub.Search(_thi_request(), timeout=30)
        assert "did not answer" in reply.thi_trace.fallback_reason
        # Before: the abandoned score call ran on (about 5.5 s more) in the model's instance.
        assert asyncio.run(direct_call()) < 2.0
    finally:
        running.stop()


def test_sigterm_drains_thi_searches_and_enroll_streams(
    own_triton: TritonServer, tmp_path: Path
) -> None:
    grace_s = 25.0
    running = start_orchestrator(
        own_triton.grpc_url,
        tmp_path / "gallery.db",
        tmp_path / "log",
        ICL_MLLM_MODEL=SLOW_MLLM,
        ICL_MLLM_TIMEOUT="60",
        ICL_GRACE_S=str(grace_s),
    )
    images = gallery_images(demo_gallery(20, seed=7))
    streaming = threading.Event()
    outcome: dict[str, object] = {}

    def batches() -> Iterator[pb.EnrollRequest]:
        for i in range(12, 20, 2):  # 4 batches over about 6 s: still open after 5 s
            yield pb.EnrollRequest(images=images[i : i + 2])
            streaming.set()
            time.sleep(1.5)

    def call(name: str, fn) -> None:
        try:
            outcome[name] = fn()
        except grpc.RpcError as exc:
            outcome[name] = exc

    try:
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            enroll_all(stub, images[:12])
            # xi -1: rank 1 is scored (one 7 s MLLM call), then the VQA if it says Yes.
            thi = threading.Thread(
                target=call, args=("thi", lambda: stub.Search(_thi_request(xi=-1.0), timeout=60))
            )
            enroll = threading.Thread(
                target=call, args=("enroll", lambda: enroll_all_of(stub, batches()))
            )
            thi.start()
            enroll.start()
            assert streaming.wait(10)
            time.sleep(1.0)  # the search is waiting on the MLLM
            sigterm_at = time.monotonic()
            running.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with running.channel() as fresh, pytest.raises(grpc.RpcError) as refused:
                pb_grpc.PersonSearchStub(fresh).Search(search_request(QUERY, top_k=3), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            thi.join(60)
            enroll.join(60)
        running.process.wait(timeout=grace_s + 10)
        took = time.monotonic() - sigterm_at
    finally:
        running.stop()
    reply, results = outcome["thi"], outcome["enroll"]
    assert isinstance(reply, pb.SearchResponse), reply
    assert reply.thi_trace.mllm_calls >= 1
    assert "did not answer" not in reply.thi_trace.fallback_reason
    assert len(reply.hits) == 5
    assert isinstance(results, list), results
    assert [r.status for r in results] == [pb.EnrollResult.ACCEPTED] * 8
    assert running.process.returncode == 0
    assert took < grace_s, took
