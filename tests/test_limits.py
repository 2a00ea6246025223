"""Limits of the service (orchestrator/limits.py, docs/operations.md): bounded concurrency with
RESOURCE_EXHAUSTED beyond a short queue, and the size limit of every message, each tried
against the real service (`icl serve` with a real tritonserver and Milvus Lite) at the limit
and just past it."""

from __future__ import annotations

import asyncio
import io
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from icl.export.mllm_repository import write_mllm_model
from icl.orchestrator import limits as L
from icl.orchestrator.limits import AdmissionControl, Lane, Overloaded
from icl.orchestrator.settings import ConcurrencyLimits
from icl.orchestrator.tritonserver import TritonServer, free_port
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import (
    RunningOrchestrator,
    enroll_all,
    gallery_images,
    start_orchestrator,
    start_triton,
)

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
QUERY = demo_queries(seed=3, count=1)[0]
SLOW_MLLM = "mllm_slow"
MLLM_DELAY_S = 2.0


# --- the lane, in one event loop (no server) -----------------------------------------------
@pytest.mark.unit
def test_lane_admits_queues_in_order_and_refuses_beyond_the_queue() -> None:
    async def scenario() -> None:
        lane = Lane("test", limit=2, queue=2, max_wait_s=5.0)
        await lane.acquire(None)
        await lane.acquire(None)
        order: list[int] = []

        async def waiter(i: int) -> None:
            await lane.acquire(None)
            order.append(i)

        waiters = [asyncio.create_task(waiter(i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        assert lane.waiting == 2
        start = time.monotonic()
        with pytest.raises(Overloaded, match="limit of 2 test calls in flight with 2 waiting"):
            await lane.acquire(None)
        assert time.monotonic() - start < 0.05  # refused at once, not after a wait
        lane.release()
        lane.release()
        await asyncio.gather(*waiters)
        assert order == [1, 2] and lane.active == 2  # first come, first served
        lane.release()
        lane.release()
        assert lane.active == 0

    asyncio.run(scenario())


@pytest.mark.unit
def test_lane_wait_is_bounded_and_a_cancelled_waiter_frees_its_place() -> None:
    async def scenario() -> None:
        lane = Lane("test", limit=1, queue=4, max_wait_s=0.2)
        await lane.acquire(None)
        start = time.monotonic()
        with pytest.raises(Overloaded) as info:
            await lane.acquire(None)
        assert 0.15 < time.monotonic() - start < 1.0 and not info.value.deadline
        with pytest.raises(Overloaded) as info:
            await lane.acquire(0.05)  # the caller's deadline is nearer than the queue's wait
        assert info.value.deadline
        leaving = asyncio.create_task(lane.acquire(None))
        await asyncio.sleep(0.01)
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert lane.waiting == 0
        lane.release()
        assert lane.active == 0  # the slot was not handed to the waiter that left
        await lane.acquire(None)  # and is free again
        assert lane.active == 1

    asyncio.run(scenario())


# --- every RPC shape, through a real grpc.aio server ---------------------------------------
@pytest.mark.unit
def test_admission_covers_server_streaming_and_unary_calls() -> None:
    """A real grpc.aio server on loopback serving a test service with a unary and a
    server-streaming method (PersonSearch has no server-streaming method of its own yet)."""
    service = "test.Limited"

    async def scenario() -> None:
        release = asyncio.Event()

        async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            yield b"first"
            await release.wait()
            yield b"last"

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return b"ok"

        handlers = {
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
        }
        server = grpc.aio.server(
            interceptors=[AdmissionControl(ConcurrencyLimits(1, 0, 1, 0, 0.0), service)]
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                open_stream = channel.unary_stream(f"/{service}/Stream")(b"", timeout=10)
                assert await open_stream.read() == b"first"  # holds the only slot
                for method in ("Stream", "Unary"):
                    call = (channel.unary_stream if method == "Stream" else channel.unary_unary)(
                        f"/{service}/{method}"
                    )
                    start = time.monotonic()
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        reply = call(b"", timeout=10)
                        if method == "Stream":
                            async for _ in reply:
                                pass
                        else:
                            await reply
                    assert info.value.code() == EXHAUSTED, method
                    assert "limit of 1" in (info.value.details() or "")
                    assert time.monotonic() - start < 1.0
                release.set()
                assert await open_stream.read() == b"last"
                assert await open_stream.code() == grpc.StatusCode.OK
                # The slot is back once the stream has ended.
                assert await channel.unary_unary(f"/{service}/Unary")(b"", timeout=10) == b"ok"
        finally:
            await server.stop(None)

    asyncio.run(scenario())


# --- the real service -------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_triton(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """A tritonserver of this module with the demo MLLM slowed to MLLM_DELAY_S per call (its
    test hook), so THI searches stay in flight long enough to pile up."""
    repo = tmp_path_factory.mktemp("limits_repository")
    for model in ("text_encoder", "image_encoder"):
        shutil.copytree(model_repository / model, repo / model)
    write_mllm_model(repo, "demo", None, name=SLOW_MLLM, options={"delay_s": MLLM_DELAY_S})
    server = start_triton(repo, tmp_path_factory.mktemp("limits_triton") / "server.log")
    yield server
    server.stop()


def _thi_request() -> pb.SearchRequest:
    request = search_request(QUERY, top_k=5)
    request.thi.enabled = True
    request.thi.xi = -1.0  # rank 1 is always asked: at least one slow MLLM call
    return request


def _metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


def test_more_thi_callers_than_the_limit(slow_triton: TritonServer, tmp_path: Path) -> None:
    metrics_port = free_port()
    running = start_orchestrator(
        slow_triton.grpc_url,
        tmp_path / "gallery.db",
        tmp_path / "log",
        args=["--max-thi-in-flight", "1", "--thi-queue", "1", "--max-in-flight", "1"],
        ICL_QUEUE="0",  # the environment and the command line together
        ICL_QUEUE_WAIT_S="30",
        ICL_MLLM_MODEL=SLOW_MLLM,
        ICL_MLLM_TIMEOUT="30",
        ICL_METRICS_PORT=str(metrics_port),
    )
    callers = 6
    try:
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            enroll_all(stub, gallery_images(demo_gallery(12, seed=8)))
            barrier = threading.Barrier(callers)

            def thi_call(_: int) -> tuple[grpc.StatusCode, float, str]:
                barrier.wait()
                start = time.monotonic()
                try:
                    reply = stub.Search(_thi_request(), timeout=60)
                    assert len(reply.hits) == 5
                    return grpc.StatusCode.OK, time.monotonic() - start, ""
                except grpc.RpcError as exc:
                    return exc.code(), time.monotonic() - start, exc.details() or ""

            with ThreadPoolExecutor(callers) as pool:
                futures = [pool.submit(thi_call, i) for i in range(callers)]
                time.sleep(0.5)
                # Plain searches have a lane of their own: served while THI is saturated.
                start = time.monotonic()
                assert len(stub.Search(search_request(QUERY, top_k=3), timeout=10).hits) == 3
                plain_s = time.monotonic() - start
                outcomes = [f.result(timeout=90) for f in futures]
        codes = sorted(code.name for code, _, _ in outcomes)
        # One served at once, one waiting and then served; the other four refused.
        assert codes == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 4, outcomes
        for code, took, details in outcomes:
            if code == EXHAUSTED:
                assert took < 1.0, outcomes  # at once, not after the admitted ones
                assert "limit of 1 THI search calls in flight with 1 waiting" in details
        assert plain_s < 5.0, plain_s
        # Refused calls are counted as such.
        assert (
            _metric(metrics_port, "icl_requests_total", rpc="Search", code="RESOURCE_EXHAUSTED")
            == 4
        )
        assert _metric(metrics_port, "icl_admission_rejected_total", lane="thi") == 4
    finally:
        running.stop()


def test_a_held_enroll_stream_takes_the_only_slot(
    slow_triton: TritonServer, tmp_path: Path
) -> None:
    running = start_orchestrator(
        slow_triton.grpc_url,
        tmp_path / "gallery.db",
        tmp_path / "log",
        ICL_MAX_IN_FLIGHT="1",
        ICL_QUEUE="0",
    )
    images = gallery_images(demo_gallery(4, seed=9))
    sent, release = threading.Event(), threading.Event()
    results: list[Any] = []

    def batches() -> Iterator[pb.EnrollRequest]:
        yield pb.EnrollRequest(images=images[:2])
        sent.set()
        release.wait(20)
        yield pb.EnrollRequest(images=images[2:])

    try:
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            enroll = threading.Thread(target=lambda: results.extend(enroll_all_of(stub, batches())))
            enroll.start()
            assert sent.wait(10)
            time.sleep(0.3)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Search(search_request(QUERY, top_k=3), timeout=10)
            assert info.value.code() == EXHAUSTED and time.monotonic() - start < 1.0
            with pytest.raises(grpc.RpcError) as info:
                stub.Delete(pb.DeleteRequest(image_ids=["x"]), timeout=10)
            assert info.value.code() == EXHAUSTED
            release.set()
            enroll.join(30)
            assert [r.status for r in results] == [pb.EnrollResult.ACCEPTED] * 4
            assert len(stub.Search(search_request(QUERY, top_k=3), timeout=10).hits) == 3
    finally:
        release.set()
        running.stop()


def test_sigterm_drains_the_calls_waiting_for_a_slot_too(
    slow_triton: TritonServer, tmp_path: Path
) -> None:
    """A call admitted to the queue was accepted: on SIGTERM it is served within the grace
    period like the one in flight, not cut when the last one in flight ends."""
    running = start_orchestrator(
        slow_triton.grpc_url,
        tmp_path / "gallery.db",
        tmp_path / "log",
        args=["--max-thi-in-flight", "1", "--thi-queue", "1", "--queue-wait-s", "60"],
        ICL_MLLM_MODEL=SLOW_MLLM,
        ICL_MLLM_TIMEOUT="30",
        ICL_GRACE_S="40",
    )
    try:
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            enroll_all(stub, gallery_images(demo_gallery(12, seed=12)))

            def thi_call(_: int) -> str:
                try:
                    return "OK" if len(stub.Search(_thi_request(), timeout=60).hits) == 5 else "?"
                except grpc.RpcError as exc:
                    return exc.code().name

            with ThreadPoolExecutor(2) as pool:
                first = pool.submit(thi_call, 0)
                time.sleep(0.5)  # the first holds the slot, the second waits for it
                second = pool.submit(thi_call, 1)
                time.sleep(0.5)
                running.process.send_signal(signal.SIGTERM)
                assert (first.result(timeout=60), second.result(timeout=60)) == ("OK", "OK")
        assert running.process.wait(timeout=30) == 0
    finally:
        running.stop()


def enroll_all_of(stub: pb_grpc.PersonSearchStub, requests: Any) -> list[pb.EnrollResult]:
    return [r for response in stub.Enroll(requests, timeout=30) for r in response.results]


# --- size limits, at the limit and past it ---------------------------------------------------
@pytest.fixture(scope="module")
def service(orchestrator: RunningOrchestrator) -> Iterator[pb_grpc.PersonSearchStub]:
    with orchestrator.channel() as channel:
        stub = pb_grpc.PersonSearchStub(channel)
        enroll_all(stub, gallery_images(demo_gallery(6, seed=10)))
        yield stub


def _code(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _search(**fields: Any) -> pb.SearchRequest:
    return pb.SearchRequest(**{"text": "a man in a red jacket", "top_k": 5, **fields})


@pytest.mark.parametrize(
    ("name", "at_limit", "past_limit", "words"),
    [
        (
            "text",
            _search(text="a" * L.MAX_TEXT_BYTES),
            _search(text="a" * (L.MAX_TEXT_BYTES + 1)),
            f"limit is {L.MAX_TEXT_BYTES}",
        ),
        (
            "text-utf8",
            _search(text="é" * (L.MAX_TEXT_BYTES // 2)),
            _search(text="é" * (L.MAX_TEXT_BYTES // 2) + "a"),
            "bytes",
        ),
        ("top_k", _search(top_k=L.MAX_TOP_K), _search(top_k=L.MAX_TOP_K + 1), "top_k"),
        (
            "camera_ids",
            None,
            _search(camera_ids=[f"c{i}" for i in range(L.MAX_CAMERA_IDS + 1)]),
            f"at most {L.MAX_CAMERA_IDS}",
        ),
        (
            "thi.candidates",
            None,
            _search(thi=pb.ThiOptions(enabled=True, candidates=L.MAX_THI_CANDIDATES + 1)),
            "candidates",
        ),
    ],
)
def test_search_size_limits(service, name, at_limit, past_limit, words) -> None:
    if at_limit is not None:
        assert _code(service.Search, at_limit)[0] == grpc.StatusCode.OK, name
    code, details = _code(service.Search, past_limit)
    assert code == INVALID and words in details, (name, code, details)


def test_delete_id_limit(service) -> None:
    ids = [f"gone-{i}" for i in range(L.MAX_IDS_PER_DELETE)]
    assert _code(service.Delete, pb.DeleteRequest(image_ids=ids))[0] == grpc.StatusCode.OK
    code, details = _code(service.Delete, pb.DeleteRequest(image_ids=[*ids, "one-more"]))
    assert code == INVALID and f"at most {L.MAX_IDS_PER_DELETE}" in details


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


def test_enroll_limits_per_batch_and_per_crop(service) -> None:
    base = gallery_images(demo_gallery(1, seed=11))[0]

    def item(image_id: str, **changes: Any) -> pb.GalleryImage:
        out = pb.GalleryImage()
        out.CopyFrom(base)
        out.image_id = image_id
        for key, value in changes.items():
            setattr(out, key, value)
        return out

    side = int(np.sqrt(L.MAX_IMAGE_PIXELS))
    batch = [
        item("lim-uri-ok", image_uri="u" * L.MAX_URI_CHARS),
        item("lim-uri-long", image_uri="u" * (L.MAX_URI_CHARS + 1)),
        item("lim-bytes", image=base.image + b"\0" * (L.MAX_IMAGE_BYTES + 1 - len(base.image))),
        item("lim-pixels", image=_png((side + 1, side))),
    ]
    replies = {
        r.image_id: r for r in enroll_all_of(service, iter([pb.EnrollRequest(images=batch)]))
    }
    assert replies["lim-uri-ok"].status == pb.EnrollResult.ACCEPTED
    for image_id, words in {
        "lim-uri-long": f"longer than {L.MAX_URI_CHARS}",
        "lim-bytes": f"the limit is {L.MAX_IMAGE_BYTES}",
        "lim-pixels": f"at most {L.MAX_IMAGE_PIXELS}",
    }.items():
        assert replies[image_id].status == pb.EnrollResult.REJECTED, image_id
        assert words in replies[image_id].reason, replies[image_id].reason
    too_many = [item(f"lim-n{i}") for i in range(L.MAX_IMAGES_PER_BATCH + 1)]
    with pytest.raises(grpc.RpcError) as info:
        enroll_all_of(service, iter([pb.EnrollRequest(images=too_many)]))
    assert (
        info.value.code() == INVALID and f"at most {L.MAX_IMAGES_PER_BATCH}" in info.value.details()
    )


def test_a_message_over_the_channel_limit_is_resource_exhausted(
    orchestrator: RunningOrchestrator,
) -> None:
    """gRPC's own answer to a message over the server's max receive size, sent through a raw
    channel that would send it (the client library stops at the same size)."""
    big = _search(text="a" * (L.MAX_MESSAGE_BYTES + 1))
    with grpc.insecure_channel(
        orchestrator.address, options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        stub = pb_grpc.PersonSearchStub(channel)
        code, details = _code(stub.Search, big)
        assert code == EXHAUSTED, (code, details)
        # The service is unharmed.
        assert len(stub.Search(search_request(QUERY, top_k=3), timeout=10).hits) == 3
