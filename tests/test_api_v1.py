"""API v1 through the running stack: tritonserver (CPU) with the encoders and the demo MLLM,
`icl serve` over gRPC, Milvus Lite and the crop store. SearchStream against Search, a
cancelled stream, query by example, confirmed anchors, grouping, gallery browsing, bad
input on the wire, the interceptors (metrics, draining) on the server-streaming RPC, and
the reflection-served names the docs' grpcurl examples use."""

from __future__ import annotations

import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from icl.export.mllm_repository import write_mllm_model
from icl.orchestrator.tritonserver import TritonServer, free_port
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl.thi.engine import NO_ANCHOR_RANK1_YES
from icl_api import PersonSearchClient, pb, pb_grpc
from icl_api.client import list_images_request, search_request
from tests.helpers import enroll_all, gallery_images, start_orchestrator, start_triton

N_IMAGES = 40
QUERIES = demo_queries(seed=5, count=6)
SLOW_MLLM = "mllm_slow"
MLLM_DELAY_S = 1.0


@pytest.fixture(scope="module")
def service(triton, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("api_v1")
    running = start_orchestrator(
        triton.grpc_url, work / "gallery.db", work / "serve.log", ICL_MLLM_MODEL="mllm"
    )
    demo = list(demo_gallery(N_IMAGES, seed=5))
    with running.channel() as channel:
        results = enroll_all(pb_grpc.PersonSearchStub(channel), gallery_images(demo))
    assert all(r.status == pb.EnrollResult.ACCEPTED for r in results)
    yield running, demo
    running.stop()


def client(running) -> PersonSearchClient:
    return PersonSearchClient(running.address, timeout_s=60)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code()


def test_search_stream_ends_with_what_search_returns(service) -> None:
    running, _ = service
    with client(running) as c:
        for text in QUERIES:
            request = search_request(text, top_k=10, thi=True)
            request.thi.xi = 1.0
            c.search(request)  # the anchor's answers are cached from here on
            events = list(c.search_stream(request))
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds[0] == "base" and kinds[-1] == "result"
            assert set(kinds[1:-1]) <= {"candidate", "anchor", "vqa", "refined_query"}
            assert events[-1].result == c.search(request)


def test_query_by_example_over_grpc(service) -> None:
    running, demo = service
    with client(running) as c:
        reply = c.search(image=demo[4].png, top_k=3)
        assert reply.hits[0].image_id == demo[4].image_id
        assert reply.hits[0].score == pytest.approx(1.0, abs=1e-4)
        both = c.search(text=QUERIES[0], image=demo[4].png, image_weight=0.9, top_k=3)
        assert both.hits[0].image_id == demo[4].image_id
        assert code_of(lambda: c.search(image=b"GIF89a....")) == grpc.StatusCode.INVALID_ARGUMENT
        thi_alone = search_request(image=demo[4].png, thi=True)
        assert code_of(lambda: c.search(thi_alone)) == grpc.StatusCode.FAILED_PRECONDITION
        assert code_of(lambda: c.search(pb.SearchRequest())) == grpc.StatusCode.INVALID_ARGUMENT


def test_confirmed_anchor_over_grpc(service) -> None:
    running, demo = service
    with client(running) as c:
        reply = c.search(text=QUERIES[1], top_k=5, confirmed_anchor=demo[9].image_id)
        assert reply.thi_trace.anchor_confirmed
        assert reply.thi_trace.anchor_image_id == demo[9].image_id
        assert reply.thi_trace.refined_query
        unknown = search_request(QUERIES[1], confirmed_anchor="never-enrolled")
        assert code_of(lambda: c.search(unknown)) == grpc.StatusCode.NOT_FOUND
        malformed = search_request(QUERIES[1], confirmed_anchor="a b")
        assert code_of(lambda: c.search(malformed)) == grpc.StatusCode.INVALID_ARGUMENT


def test_grouping_over_grpc(service) -> None:
    running, _ = service
    with client(running) as c:
        hits = c.search(text=QUERIES[2], top_k=40, group_by_track=True).hits
    tracks = [h.track_id for h in hits]
    assert len(tracks) == len(set(tracks)) and all(h.track_hits >= 1 for h in hits)


def test_browsing_over_grpc(service) -> None:
    running, demo = service
    with client(running) as c:
        listed = [i.image_id for i in c.iter_images(page_size=7)]
        assert listed == sorted(d.image_id for d in demo)
        image = c.get_image(demo[0].image_id)
        assert image.image == demo[0].png and image.camera_id == demo[0].camera_id
        stats = c.gallery_stats()
        assert stats.images == N_IMAGES
        assert sum(cam.images for cam in stats.cameras) == N_IMAGES
        token = c.list_images(page_size=3).next_page_token
        bad = list_images_request(3, page_token=token[::-1])
        assert code_of(lambda: c.list_images(bad)) == grpc.StatusCode.INVALID_ARGUMENT
        other = list_images_request(3, camera_ids=[demo[0].camera_id], page_token=token)
        assert code_of(lambda: c.list_images(other)) == grpc.StatusCode.INVALID_ARGUMENT
        too_big = list_images_request(1001)
        assert code_of(lambda: c.list_images(too_big)) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: c.get_image("missing")) == grpc.StatusCode.NOT_FOUND


def test_new_rpcs_refuse_bytes_that_do_not_parse(service) -> None:
    """Invalid UTF-8 in a string field: INVALID_ARGUMENT from the service's own parser."""
    running, _ = service
    garbage = b"\x0a\x02\xff\xfe"  # field 1 (a string in every request here), invalid UTF-8
    with running.channel() as channel:
        for method in ("SearchStream", "ListImages", "GetImage"):
            call = (channel.unary_stream if method == "SearchStream" else channel.unary_unary)(
                f"/icl.reid.v1.PersonSearch/{method}"
            )

            def invoke(call=call, method=method):
                reply = call(garbage, timeout=10)
                return list(reply) if method == "SearchStream" else reply

            assert code_of(invoke) == grpc.StatusCode.INVALID_ARGUMENT, method


def test_reflection_serves_the_new_methods(service) -> None:
    """The names the grpcurl examples in docs/api.md use, as reflection serves them."""
    running, _ = service
    with running.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="icl.reid.v1.PersonSearch"
        )
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    from google.protobuf import descriptor_pb2

    methods = set()
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        for svc in fd.service:
            methods |= {(m.name, m.server_streaming) for m in svc.method}
    assert {
        ("SearchStream", True),
        ("ListImages", False),
        ("GetImage", False),
        ("GetGalleryStats", False),
    } <= methods


# --- a slow MLLM: cancellation, metrics and draining of SearchStream -------------------------


@pytest.fixture(scope="module")
def slow(model_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    """Its own tritonserver with an MLLM answering every call after MLLM_DELAY_S, and a
    service using it with metrics on."""
    repo = tmp_path_factory.mktemp("api_v1_slow_repository")
    for model in ("text_encoder", "image_encoder"):
        shutil.copytree(model_repository / model, repo / model)
    write_mllm_model(repo, "demo", None, name=SLOW_MLLM, options={"delay_s": MLLM_DELAY_S})
    work = tmp_path_factory.mktemp("api_v1_slow")
    server: TritonServer = start_triton(repo, work / "triton.log")
    metrics_port = free_port()
    running = None
    try:
        running = start_orchestrator(
            server.grpc_url,
            work / "gallery.db",
            work / "serve.log",
            ICL_MLLM_MODEL=SLOW_MLLM,
            ICL_MLLM_TIMEOUT="120",
            # The paper's schedule: with rank 1 saying Yes and s1 <= xi it asks all K.
            ICL_THI_SCHEDULE="reference",
            ICL_METRICS_PORT=str(metrics_port),
        )
        with running.channel() as channel:
            images = gallery_images(demo_gallery(N_IMAGES, seed=5))  # the `service` gallery
            enroll_all(pb_grpc.PersonSearchStub(channel), images)
        yield running, metrics_port
    finally:
        if running is not None:
            running.stop()
        server.stop()


def _metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _walk_request(text: str) -> pb.SearchRequest:
    # xi 1, 20 candidates: the lazy walk asks candidate after candidate until one says Yes.
    request = search_request(text, top_k=5, thi=True)
    request.thi.xi = 1.0
    request.thi.candidates = 20
    return request


def test_cancelling_a_stream_stops_its_mllm_calls_and_is_counted(service, slow) -> None:
    running, port = slow
    # A query whose rank 1 says Yes with s1 <= xi (found on the fast MLLM: same weights,
    # same gallery): the reference schedule then asks all 20 candidates, one call each.
    with client(service[0]) as fast:
        reasons = {t: fast.search(_walk_request(t)).thi_trace.fallback_reason for t in QUERIES}
    text = next((t for t, r in reasons.items() if r == NO_ANCHOR_RANK1_YES), None)
    assert text is not None, reasons
    full = 20

    def asked() -> float:
        return _metric(port, "icl_stage_duration_seconds_count", stage="thi_yes_no")

    before = asked()
    with client(running) as c:
        events = c.search_stream(_walk_request(text))
        kinds = []
        for event in events:
            kinds.append(event.WhichOneof("event"))
            if kinds[-1] == "candidate":
                break
        events.close()  # cancels the call
    assert kinds[0] == "base" and kinds[-1] == "candidate"
    time.sleep(0.5)
    at_cancel = asked() - before
    time.sleep(4 * MLLM_DELAY_S)  # several more calls' time, were the walk still going
    assert asked() - before == at_cancel <= 2 < full
    assert _metric(port, "icl_requests_total", rpc="SearchStream", code="CANCELLED") == 1
    assert _metric(port, "icl_requests_in_flight", rpc="SearchStream") == 0


def test_sigterm_lets_a_search_stream_finish(slow) -> None:
    running, _ = slow
    outcome: dict[str, object] = {}
    first = threading.Event()

    def consume() -> None:
        try:
            with client(running) as c:
                request = search_request(QUERIES[1], top_k=5, thi=True)
                request.thi.xi = -1.0  # s1 > xi: rank 1 decides (then up to K in reference)
                events = []
                for event in c.search_stream(request):
                    events.append(event)
                    first.set()
                outcome["events"] = events
        except grpc.RpcError as exc:
            outcome["events"] = exc

    thread = threading.Thread(target=consume)
    thread.start()
    assert first.wait(30)  # the base ranking is out; the MLLM is working
    running.process.send_signal(signal.SIGTERM)
    thread.join(60)
    running.process.wait(timeout=40)
    events = outcome["events"]
    assert isinstance(events, list), events
    assert events[-1].HasField("result") and events[-1].result.thi_trace.mllm_calls >= 1
    assert running.process.returncode == 0
