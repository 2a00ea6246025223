"""Metrics and logs of the running service: one `icl serve --metrics-port ... --log-format json`
with THI (the demo `mllm` on the session's real tritonserver) over Milvus Lite; demo crops
enrolled, plain and THI searches and a bad request made over gRPC, then /metrics scraped over
HTTP and the service's log file read back."""

from __future__ import annotations

import json
import logging
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from icl.orchestrator.logs import JsonFormatter, RequestIdFilter, request_id_from
from icl.orchestrator.metrics import STAGES
from icl.orchestrator.tritonserver import free_port
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import enroll_all, gallery_images, start_orchestrator, wait_until

N_IMAGES = 60  # as tests/test_thi_online.py: with these queries some THI walks anchor
BATCH = 12
QUERIES = demo_queries(seed=5, count=8)


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _calls_counted(port: int) -> float:
    """Calls of every RPC and code counted so far."""
    return sum(v for (name, _), v in _scrape(port).items() if name == "icl_requests_total")


@pytest.fixture(scope="module")
def observed(triton, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("observed")
    metrics_port = free_port()
    log = work / "serve.log"
    running = start_orchestrator(
        triton.grpc_url,
        work / "gallery.db",
        log,
        ICL_MLLM_MODEL="mllm",
        ICL_METRICS_PORT=str(metrics_port),
        ICL_LOG_FORMAT="json",
        ICL_HEALTH_POLL_S="0.2",
    )
    try:
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            results = enroll_all(
                stub, gallery_images(demo_gallery(N_IMAGES, seed=5)), batch_size=BATCH
            )
            assert all(r.status == pb.EnrollResult.ACCEPTED for r in results)
            plain, plain_call = stub.Search.with_call(
                search_request(QUERIES[0], top_k=5),
                metadata=(("x-request-id", "obs-plain-1"),),
                timeout=30,
            )
            assert len(plain.hits) == 5
            thi_replies = []
            for i, text in enumerate(QUERIES):
                request = search_request(text, top_k=5)
                request.thi.enabled = True
                request.thi.xi = 1.0  # every query walks the candidates: anchors are likely
                reply, call = stub.Search.with_call(
                    request, metadata=(("x-request-id", f"obs-thi-{i}"),), timeout=60
                )
                thi_replies.append((reply, call))
            with pytest.raises(grpc.RpcError) as bad:
                stub.Search(
                    search_request("", top_k=5),
                    metadata=(("x-request-id", "obs-bad-1"),),
                    timeout=30,
                )
        # A call's counters are written when its handler returns, which may be just after the
        # caller has its status (an abort sends the status first): wait until all 11 calls
        # (1 Enroll, 9 good searches, 1 bad) are counted before the tests read them.
        expected_calls = 1 + 1 + len(thi_replies) + 1
        assert wait_until(lambda: _calls_counted(metrics_port) == expected_calls, 10)
        yield {
            "running": running,
            "metrics_port": metrics_port,
            "log": log,
            "plain_call": plain_call,
            "thi": thi_replies,
            "bad": bad.value,
        }
    finally:
        running.stop()


def test_request_counters_by_rpc_and_code(observed) -> None:
    samples = _scrape(observed["metrics_port"])
    assert observed["bad"].code() == grpc.StatusCode.INVALID_ARGUMENT
    searches_ok = 1 + len(observed["thi"])
    assert _value(samples, "icl_requests_total", rpc="Search", code="OK") == searches_ok
    assert _value(samples, "icl_requests_total", rpc="Search", code="INVALID_ARGUMENT") == 1
    assert _value(samples, "icl_requests_total", rpc="Enroll", code="OK") == 1
    assert _value(samples, "icl_requests_total", rpc="Delete", code="OK") == 0
    count = _value(samples, "icl_request_duration_seconds_count", rpc="Search", code="OK")
    assert count == searches_ok
    assert _value(samples, "icl_request_duration_seconds_sum", rpc="Search", code="OK") > 0
    # Nothing in flight once every call returned.
    assert _value(samples, "icl_requests_in_flight", rpc="Search") == 0
    assert _value(samples, "icl_requests_in_flight", rpc="Enroll") == 0


def test_stage_histograms_count_the_stages_that_ran(observed) -> None:
    samples = _scrape(observed["metrics_port"])
    count = {s: _value(samples, "icl_stage_duration_seconds_count", stage=s) for s in STAGES}
    for stage in STAGES:  # every stage is exposed, ran or not
        assert ("icl_stage_duration_seconds_count", (("stage", stage),)) in samples
    thi = [reply for reply, _ in observed["thi"]]
    anchored = sum(bool(r.thi_trace.anchor_image_id) for r in thi)
    assert anchored > 0, "no THI query found an anchor: the VQA and fusion checks are vacuous"
    searches = 1 + len(thi)
    # Each search encodes its query and searches the gallery; an anchored THI search also
    # encodes the refined query and fuses (one search with the fused vector, timed as fusion).
    # The bad request reached neither.
    assert count["text_encode"] == searches + anchored
    assert count["gallery_search"] == searches
    assert count["fusion"] == anchored
    assert count["gallery_upsert"] == N_IMAGES // BATCH
    assert count["image_encode"] == N_IMAGES // BATCH
    assert count["thi_yes_no"] >= len(thi)
    assert count["thi_vqa"] >= 1  # one per anchor whose answers were not cached yet
    assert count["thi_refine"] == 0  # the demo MLLM does not generate: answers are merged
    for stage in ("text_encode", "gallery_search", "thi_yes_no", "fusion"):
        assert _value(samples, "icl_stage_duration_seconds_sum", stage=stage) > 0


def test_mllm_calls_per_thi_search(observed) -> None:
    samples = _scrape(observed["metrics_port"])
    thi = [reply for reply, _ in observed["thi"]]
    assert _value(samples, "icl_thi_mllm_calls_count") == len(thi)
    calls = _value(samples, "icl_thi_mllm_calls_sum")
    # Every THI search asked at least rank 1 (one score request); no more requests than
    # image-prompt evaluations, which the traces report.
    assert len(thi) <= calls <= sum(r.thi_trace.mllm_calls for r in thi)


def test_gallery_size_gauge(observed) -> None:
    port = observed["metrics_port"]
    assert wait_until(lambda: _value(_scrape(port), "icl_gallery_images") == N_IMAGES, 10)
    with observed["running"].channel() as channel:
        stub = pb_grpc.PersonSearchStub(channel)
        first = gallery_images(demo_gallery(1, seed=5))[0].image_id
        assert stub.Delete(pb.DeleteRequest(image_ids=[first]), timeout=30).deleted == 1
    assert wait_until(lambda: _value(_scrape(port), "icl_gallery_images") == N_IMAGES - 1, 10)
    assert wait_until(
        lambda: _value(_scrape(port), "icl_requests_total", rpc="Delete", code="OK") == 1, 10
    )


def test_request_id_comes_back_and_is_in_the_json_logs(observed) -> None:
    assert ("x-request-id", "obs-plain-1") in observed["plain_call"].initial_metadata()
    for i, (_, call) in enumerate(observed["thi"]):
        assert ("x-request-id", f"obs-thi-{i}") in call.initial_metadata()
    # On an error too.
    assert ("x-request-id", "obs-bad-1") in observed["bad"].initial_metadata()
    lines = [line for line in observed["log"].read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    by_id: dict[str, list[dict]] = {}
    for record in records:
        by_id.setdefault(record.get("request_id", ""), []).append(record)
    for request_id, code in (("obs-plain-1", "OK"), ("obs-thi-0", "OK"), ("obs-bad-1", "INVALID")):
        messages = [r["message"] for r in by_id.get(request_id, [])]
        assert any(m.startswith(f"Search {code}") for m in messages), (request_id, messages)


def test_an_uncalled_for_id_is_generated(observed) -> None:
    """No x-request-id from the caller (or one that could forge a log line): a uuid4 hex."""
    with observed["running"].channel() as channel:
        stub = pb_grpc.PersonSearchStub(channel)
        for metadata in ((), (("x-request-id", "two words"),)):
            _, call = stub.Search.with_call(
                search_request(QUERIES[0], top_k=1), metadata=metadata, timeout=30
            )
            sent = dict(call.initial_metadata())["x-request-id"]
            assert len(sent) == 32 and int(sent, 16) >= 0


@pytest.mark.unit
def test_request_id_from_metadata() -> None:
    assert request_id_from((("x-request-id", "abc-123"),)) == "abc-123"
    for bad in ("", "a b", "x\ny", "é", "a" * 129):
        generated = request_id_from((("x-request-id", bad),))
        assert generated != bad and len(generated) == 32
    assert request_id_from(None) != request_id_from(None)


@pytest.mark.unit
def test_json_formatter_one_object_per_line() -> None:
    record = logging.LogRecord("icl.x", logging.INFO, __file__, 1, 'say "%s"\nnext', ("hi",), None)
    RequestIdFilter().filter(record)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == 'say "hi"\nnext' and entry["logger"] == "icl.x"
    assert entry["level"] == "INFO" and "request_id" not in entry
