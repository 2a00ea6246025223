"""Faults under load, against the real processes: a tritonserver of this module's own (started
with explicit model control, so that the MLLM model can be reloaded slow or unloaded while
the service runs), the real Milvus 2.3.5 server, and `icl serve` over both.

While a few client threads loop Search with deadlines (and an Enroll stream runs):
- tritonserver is killed (SIGKILL) and started again on the same ports;
- the Milvus server is stopped and started again on the same address;
- the MLLM is reloaded with a delay far above the service's MLLM timeout, then unloaded.
Searches fail fast with UNAVAILABLE (or keep the base ranking with the reason in the THI trace
when only the MLLM is at fault), none ends past its deadline, gRPC health goes NOT_SERVING
and back to SERVING by itself, and the same service process answers again within
RECOVERY_S of the dependency's return. An Enroll stream cut by the fault ends with
UNAVAILABLE; every item it acknowledged is stored and no item it did not acknowledge is.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymilvus import MilvusClient
from pymilvus.client.types import LoadState

from icl.export.mllm_repository import mllm_config
from icl.orchestrator.server import SERVICE_NAME
from icl.orchestrator.tritonserver import TritonServer
from icl.synthetic.demo_gallery import demo_gallery
from icl.thi.engine import MLLM_FAILED, MLLM_TIMEOUT, is_failure
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import (
    LAUNCHED,
    RunningOrchestrator,
    enroll_all,
    gallery_images,
    start_milvus_server,
    start_orchestrator,
)

pytestmark = pytest.mark.timeout(400)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DEADLINE_S = 3.0  # each search of the load
SLACK_S = 0.5  # a call may end this much after its deadline
FAST_S = 1.0  # a failing search must fail within this (fail fast), not wait for its deadline
RECOVERY_S = 10.0  # the service answers again within this of the dependency's return
LOAD_THREADS = 3
MLLM_TIMEOUT_S = 1.5  # the service's wait for the MLLM in one search
SLOW_MLLM_S = 6.0  # the slow MLLM's delay per call
QUERY = "a man in a blue jacket"


@dataclass
class ExplicitTriton(TritonServer):
    """tritonserver with explicit model control: every model loads at start, and a test may
    reload (with another config) or unload one while the server runs."""

    def command(self) -> list[str]:
        return [*super().command(), "--model-control-mode=explicit", "--load-model=*"]


@dataclass
class Call:
    start: float
    end: float
    code: grpc.StatusCode
    details: str = ""
    reply: pb.SearchResponse | None = None


@dataclass
class Load:
    """Threads looping Search (plain or THI) with a deadline, every call recorded."""

    stub: pb_grpc.PersonSearchStub
    request: pb.SearchRequest
    deadline_s: float = DEADLINE_S
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def _loop(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                reply = self.stub.Search(self.request, timeout=self.deadline_s)
                call = Call(start, time.monotonic(), grpc.StatusCode.OK, reply=reply)
            except grpc.RpcError as exc:
                call = Call(start, time.monotonic(), exc.code(), exc.details() or "")
            self.calls.append(call)
            time.sleep(0.05)  # bounded load on a small machine

    @contextmanager
    def running(self, threads: int = LOAD_THREADS) -> Iterator[Load]:
        workers = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for w in workers:
            w.start()
        try:
            yield self
        finally:
            self._stop.set()
            for w in workers:
                w.join(self.deadline_s + 5)

    def between(self, start: float, end: float = float("inf")) -> list[Call]:
        """The calls that started in [start, end)."""
        return [c for c in self.calls if start <= c.start < end]

    def check_deadlines(self) -> None:
        late = [c for c in self.calls if c.end - c.start > self.deadline_s + SLACK_S]
        assert not late, f"{len(late)} calls past their deadline: {late[:3]}"


class HealthLog:
    """Polls gRPC health (the server and PersonSearch) every 0.1 s in a thread."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = health_pb2_grpc.HealthStub(channel)
        self.samples: list[tuple[float, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _status(self) -> int | None:
        statuses = set()
        for service in ("", SERVICE_NAME):
            try:
                reply = self._stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                statuses.add(reply.status)
            except grpc.RpcError:
                statuses.add(None)
        return statuses.pop() if len(statuses) == 1 else None

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._status()))
            time.sleep(0.1)

    def at(self, t: float) -> int | None:
        """What health said last at or before `t`."""
        said = [s for when, s in self.samples if when <= t]
        return said[-1] if said else None

    def first(self, status: int, after: float) -> float | None:
        """When health first said `status` at or after `after`."""
        return next((t for t, s in self.samples if t >= after and s == status), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class EnrollStream:
    """An Enroll stream in a thread: a batch of two crops every `every_s`; acknowledgements
    and the final status are recorded."""

    stub: pb_grpc.PersonSearchStub
    images: list[pb.GalleryImage]
    every_s: float = 0.4
    acked: list[pb.EnrollResult] = field(default_factory=list)
    sent: list[pb.GalleryImage] = field(default_factory=list)
    error: grpc.RpcError | None = None
    ended: float = 0.0
    _thread: threading.Thread | None = None

    def _batches(self) -> Iterator[pb.EnrollRequest]:
        for i in range(0, len(self.images), 2):
            self.sent.extend(self.images[i : i + 2])
            yield pb.EnrollRequest(images=self.images[i : i + 2])
            time.sleep(self.every_s)

    def _run(self) -> None:
        try:
            for response in self.stub.Enroll(self._batches(), timeout=60):
                self.acked.extend(response.results)
        except grpc.RpcError as exc:
            self.error = exc
        self.ended = time.monotonic()

    def start(self) -> EnrollStream:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def wait_acked(self, n: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.acked) < n:
            assert time.monotonic() < deadline, f"only {len(self.acked)} items acknowledged"
            time.sleep(0.05)

    def join(self) -> None:
        assert self._thread is not None
        self._thread.join(70)


@dataclass
class Stack:
    triton: ExplicitTriton
    milvus: object
    service: RunningOrchestrator
    channel: grpc.Channel
    stub: pb_grpc.PersonSearchStub
    health: HealthLog
    model_repository: Path

    def listing(self) -> set[str]:
        reply = self.stub.Search(search_request("a person", top_k=1000), timeout=30)
        return {h.image_id for h in reply.hits}


@pytest.fixture(scope="module")
def stack(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("faults")
    repo = work / "repository"
    for model in ("text_encoder", "image_encoder", "mllm"):
        shutil.copytree(model_repository / model, repo / model)
    triton = ExplicitTriton(repo, work / "triton.log")
    LAUNCHED.append(triton)
    milvus = service = None
    try:
        triton.start()
        milvus = start_milvus_server(work / "milvus")
        service = start_orchestrator(
            triton.grpc_url,
            milvus.uri,  # type: ignore[arg-type]
            work / "serve.log",
            ICL_MILVUS_TOKEN="root:Milvus",  # the server's default user
            ICL_MLLM_MODEL="mllm",
            ICL_MLLM_TIMEOUT=str(MLLM_TIMEOUT_S),
            ICL_CROP_DIR=str(work / "crops"),
        )
        with service.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            base = gallery_images(demo_gallery(12, seed=51))
            assert all(r.status == pb.EnrollResult.ACCEPTED for r in enroll_all(stub, base))
            health = HealthLog(channel)
            try:
                yield Stack(triton, milvus, service, channel, stub, health, repo)
            finally:
                health.close()
    finally:
        if service is not None:
            service.stop()
        if milvus is not None:
            milvus.stop()  # type: ignore[attr-defined]
        triton.stop()


def _brief(calls: list[Call]) -> list[str]:
    """The calls that did not succeed, in a line each (times from the first call)."""
    t0 = calls[0].start if calls else 0.0
    return [
        f"+{c.start - t0:.2f}s {c.end - c.start:.2f}s {c.code.name} {c.details[:160]}"
        for c in calls
        if c.code != grpc.StatusCode.OK
    ][:12]


def _fresh_images(prefix: str, n: int, seed: int) -> list[pb.GalleryImage]:
    images = gallery_images(demo_gallery(n, seed=seed))
    for i, image in enumerate(images):
        image.image_id = f"{prefix}-{i:02d}"
    return images


def _outage(
    stack: Stack,
    name: str,
    fault: Callable[[], None],
    repair: Callable[[], None],
    enroll_seed: int,
) -> None:
    """Load + an Enroll stream; the fault; its repair; then every assertion of the module."""
    pid = stack.service.process.pid
    load = Load(stack.stub, search_request(QUERY, top_k=5))
    stream = EnrollStream(stack.stub, _fresh_images(f"{name}-enroll", 40, enroll_seed))
    with load.running():
        time.sleep(1.0)
        stream.start()
        stream.wait_acked(4)
        fault_at = time.monotonic()
        fault()
        # The stream runs into the fault: it must end, with UNAVAILABLE, and soon.
        stream.join()
        down_at = stack.health.first(NOT_SERVING, fault_at)
        while down_at is None and time.monotonic() < fault_at + 5:
            time.sleep(0.1)
            down_at = stack.health.first(NOT_SERVING, fault_at)
        time.sleep(1.5)  # searches while the dependency is down
        repair()
        back_at = time.monotonic()  # when the dependency can serve again
        health_back = stack.health.first(SERVING, back_at)
        while health_back is None and time.monotonic() < back_at + RECOVERY_S + 5:
            time.sleep(0.1)
            health_back = stack.health.first(SERVING, back_at)
        time.sleep(max(0.0, back_at + RECOVERY_S + 1.0 - time.monotonic()))
    # Before the fault: all served.
    before = [c for c in load.calls if c.end < fault_at]
    assert before and all(c.code == grpc.StatusCode.OK for c in before), _brief(before)
    # During it: nothing but OK or UNAVAILABLE, and the failures fail fast.
    during = [c for c in load.calls if c.end >= fault_at and c.start < back_at]
    failed = [c for c in during if c.code != grpc.StatusCode.OK]
    assert failed, f"no search failed while {name} was down"
    odd = [c for c in failed if c.code != grpc.StatusCode.UNAVAILABLE]
    assert not odd, _brief(odd)
    load.check_deadlines()
    # Health followed the dependency, and the same process serves again within RECOVERY_S.
    assert down_at is not None and down_at - fault_at < 5, "health never said NOT_SERVING"
    # While the service knows (health NOT_SERVING), every search fails fast; otherwise a call
    # waiting on a dependency that does not answer ends (UNAVAILABLE) within its deadline.
    # ("Knows": health said NOT_SERVING for this fault when the call started and still FAST_S
    # later. Health is sampled every 0.1 s, so a call just after the switch back to SERVING
    # can see a stale sample; a sample left from an earlier outage does not count either.)
    slow = [
        c
        for c in failed
        if c.start >= down_at
        and stack.health.at(c.start) == NOT_SERVING
        and stack.health.at(c.start + FAST_S) == NOT_SERVING
        and c.end - c.start > FAST_S
    ]
    assert not slow, _brief(slow)
    assert health_back is not None and health_back - back_at < RECOVERY_S, (
        f"health not SERVING within {RECOVERY_S} s of {name}'s return"
    )
    after = load.between(back_at + RECOVERY_S)
    assert after, (
        f"no search after the recovery: the last began {load.calls[-1].start - back_at:.1f} s "
        "after the return"
    )
    assert all(c.code == grpc.StatusCode.OK for c in after), _brief(after)
    first_ok = min(c.end for c in load.between(back_at) if c.code == grpc.StatusCode.OK)
    assert first_ok - back_at < RECOVERY_S
    assert stack.service.process.poll() is None and stack.service.process.pid == pid
    # The Enroll stream: UNAVAILABLE, acknowledged items stored, the others not.
    assert stream.error is not None, "the Enroll stream did not learn of the fault"
    assert stream.error.code() == grpc.StatusCode.UNAVAILABLE, stream.error
    assert all(r.status == pb.EnrollResult.ACCEPTED for r in stream.acked)
    acked = {r.image_id for r in stream.acked}
    unacked = {i.image_id for i in stream.sent} - acked
    stored = stack.listing()
    assert acked <= stored, f"acknowledged but lost: {sorted(acked - stored)}"
    assert not unacked & stored, f"not acknowledged, yet stored: {sorted(unacked & stored)}"
    print(
        f"\n{name}: {len(load.calls)} searches, {len(failed)} failed (max "
        f"{max(c.end - c.start for c in failed):.2f} s), health NOT_SERVING after "
        f"{down_at - fault_at:.1f} s, SERVING {health_back - back_at:.1f} s and first answer "
        f"{first_ok - back_at:.1f} s after the return; Enroll: {len(acked)} acknowledged, "
        f"{len(unacked)} refused with {stream.error.code().name}"
    )


def test_tritonserver_killed_and_started_again(stack: Stack) -> None:
    def kill() -> None:
        assert stack.triton.process is not None
        os.kill(stack.triton.process.pid, signal.SIGKILL)
        stack.triton.wait(15)

    _outage(stack, "tritonserver", kill, stack.triton.start, enroll_seed=61)


def test_milvus_server_stopped_and_started_again(stack: Stack) -> None:
    milvus = stack.milvus

    def restart() -> None:
        """Milvus on the same address, back once it can search: a restarted 2.3 server
        answers before its collections are loaded again (the service asks it to load)."""
        milvus._auto_port = False  # type: ignore[attr-defined]  # the address the service dials
        milvus.start()  # type: ignore[attr-defined]
        started = time.monotonic()
        client = MilvusClient(uri=milvus.uri, token="root:Milvus")  # type: ignore[attr-defined]
        try:
            while client.get_load_state("gallery")["state"] != LoadState.Loaded:
                assert time.monotonic() - started < 90, "Milvus did not load the collection"
                time.sleep(0.2)
            loaded = time.monotonic() - started
            # Then a strongly consistent search (the service reads its own writes: Session
            # with its last write's timestamp): it waits until Milvus has caught up with the
            # time before the restart, seconds after the load on this machine.
            fields = client.describe_collection("gallery")["fields"]
            dim = next(f["params"]["dim"] for f in fields if f["name"] == "embedding")
            unit = [1.0] + [0.0] * (int(dim) - 1)
            while True:
                try:
                    client.search(
                        "gallery", data=[unit], limit=1, timeout=2, consistency_level="Strong"
                    )
                    break
                except Exception:
                    assert time.monotonic() - started < 90, "Milvus did not serve again"
                    time.sleep(0.2)
        finally:
            client.close()
        print(
            f"\nmilvus: loaded {loaded:.1f} s and a Strong search answered "
            f"{time.monotonic() - started:.1f} s after start"
        )

    _outage(stack, "milvus", milvus.stop, restart, enroll_seed=62)  # type: ignore[attr-defined]


def _thi_request() -> pb.SearchRequest:
    request = search_request(QUERY, top_k=5)
    request.thi.enabled = True
    request.thi.candidates = 2
    return request


def test_slow_and_failing_mllm_keep_the_base_ranking(stack: Stack) -> None:
    admin = triton_grpc.InferenceServerClient(stack.triton.grpc_url)
    slow = mllm_config("demo", None, options={"delay_s": SLOW_MLLM_S})
    plain = Load(stack.stub, search_request(QUERY, top_k=5))
    thi = Load(stack.stub, _thi_request(), deadline_s=6.0)
    base = [h.image_id for h in stack.stub.Search(search_request(QUERY, top_k=5), timeout=30).hits]
    try:
        with plain.running(threads=2), thi.running(threads=1):
            time.sleep(1.0)
            slow_at = time.monotonic()
            admin.load_model(
                "mllm", config=json_format.MessageToJson(slow, preserving_proto_field_name=True)
            )
            time.sleep(2 * MLLM_TIMEOUT_S + 1)
            fail_at = time.monotonic()
            admin.unload_model("mllm")
            time.sleep(2 * MLLM_TIMEOUT_S + 1)
            back_at = time.monotonic()
            admin.load_model("mllm")  # the repository's config: the normal demo MLLM
            time.sleep(RECOVERY_S + 1)
    finally:
        if not admin.is_model_ready("mllm"):
            admin.load_model("mllm")
        admin.close()
    # Plain searches never noticed; no call went past its deadline.
    assert all(c.code == grpc.StatusCode.OK for c in plain.calls), {c.code for c in plain.calls}
    plain.check_deadlines()
    thi.check_deadlines()
    assert all(c.code == grpc.StatusCode.OK for c in thi.calls), [c.details for c in thi.calls]

    def reasons(start: float, end: float) -> list[str]:
        return [c.reply.thi_trace.fallback_reason for c in thi.between(start, end)]

    # Slow: the MLLM's time runs out, the base ranking is kept with the reason.
    slowed = reasons(slow_at + 1, fail_at)
    assert any(r.startswith(MLLM_TIMEOUT) for r in slowed), slowed
    # Gone: the MLLM fails, the base ranking is kept with the reason.
    failed = reasons(fail_at + 0.5, back_at)
    assert failed and all(r.startswith((MLLM_FAILED, MLLM_TIMEOUT)) for r in failed), failed
    assert any(r.startswith(MLLM_FAILED) for r in failed), failed
    for c in thi.between(slow_at + 1, back_at):
        assert c.reply is not None and [h.image_id for h in c.reply.hits] == base
    # Back: THI works again within RECOVERY_S (no failure reason).
    recovered = reasons(back_at + RECOVERY_S, float("inf"))
    assert recovered and not any(is_failure(r) for r in recovered), recovered
    # Health followed the MLLM model too.
    assert stack.health.first(NOT_SERVING, fail_at) is not None
    serving_again = stack.health.first(SERVING, back_at)
    assert serving_again is not None and serving_again - back_at < RECOVERY_S
