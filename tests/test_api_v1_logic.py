"""API v1 in the service's logic, with in-process adapters (the demo encoders on onnxruntime,
the in-memory gallery, a crop store on disk, the demo MLLM in process): SearchStream, query
by example, operator-confirmed anchors, track grouping, gallery browsing and every bad input.
The same logic runs behind gRPC in tests/test_api_v1.py."""

from __future__ import annotations

import asyncio
import io
import math
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from icl.images import MAX_IMAGE_PIXELS, decode_crop
from icl.mllm.demo import load_demo_backend
from icl.mllm.inprocess import InProcessMllm
from icl.onnx_encoders import OnnxEncoders
from icl.orchestrator.crops import CropStore
from icl.orchestrator.memory_gallery import MemoryGallery
from icl.orchestrator.server import PersonSearchService
from icl.orchestrator.validation import MAX_PAGE_SIZE, InvalidRequest, make_cursor
from icl.ports import GalleryFilter
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl.thi.engine import describe, refine_query
from icl_api import pb
from icl_api.client import list_images_request, search_request
from tests.helpers import gallery_images

pytestmark = pytest.mark.unit
QUERIES = demo_queries(seed=5, count=8)


def no_deadline() -> float | None:
    return None


class CountingMllm:
    """The demo MLLM (real weights, in process), each call counted and slowed by `delay_s`:
    the cancellation test needs calls that take long enough to cancel in between."""

    def __init__(self, inner: InProcessMllm, delay_s: float = 0.0) -> None:
        self.inner, self.delay_s, self.calls = inner, delay_s, 0

    @property
    def model_key(self) -> str:
        return self.inner.model_key

    @property
    def can_generate(self) -> bool:
        return self.inner.can_generate

    async def score(self, images, prompts):
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return await self.inner.score(images, prompts)

    async def generate(self, images, prompt, max_tokens=256):
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return await self.inner.generate(images, prompt, max_tokens)


@pytest.fixture(scope="module")
def encoders(model_repository):
    return OnnxEncoders.from_repository(model_repository)


@pytest.fixture(scope="module")
def demo():
    return list(demo_gallery(60, seed=5))


@pytest.fixture
def service(encoders, demo, tmp_path):
    dim = encoders.embed_texts(["x"]).shape[1]
    mllm = CountingMllm(InProcessMllm(load_demo_backend()))
    svc = PersonSearchService(encoders, MemoryGallery(dim), CropStore(tmp_path / "crops"), mllm)
    images = gallery_images(demo)
    for start in range(0, len(images), 16):
        reply = asyncio.run(
            svc.enroll_batch(pb.EnrollRequest(images=images[start : start + 16]), no_deadline)
        )
        assert all(r.status == pb.EnrollResult.ACCEPTED for r in reply.results)
    yield svc, mllm
    svc.close()


def run(coro):
    return asyncio.run(coro)


def stream(svc, request) -> list[pb.SearchEvent]:
    async def collect():
        return [e async for e in svc.search_stream(request, no_deadline)]

    return run(collect())


def thi_request(text: str, top_k: int = 10, **thi) -> pb.SearchRequest:
    request = search_request(text, top_k=top_k, thi=True)
    for key, value in thi.items():
        setattr(request.thi, key, value)
    return request


def refuse(svc, request, code: grpc.StatusCode, fragment: str = "") -> str:
    with pytest.raises(InvalidRequest) as exc:
        run(svc.search(request, no_deadline))
    assert exc.value.code == code, exc.value.message
    assert fragment in exc.value.message
    return exc.value.message


# --- SearchStream ---------------------------------------------------------------------------


def test_stream_ends_with_what_search_returns_and_shows_each_step(service):
    svc, _ = service
    anchored = 0
    for text in QUERIES:
        request = thi_request(text, xi=1.0)
        # Once first: the anchor's VQA answers are cached in the gallery after the first
        # search (one MLLM call fewer), so both compared calls find the cache warm.
        run(svc.search(request, no_deadline))
        events = stream(svc, request)
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "base" and kinds[-1] == "result"
        assert events[-1].result == run(svc.search(request, no_deadline))
        trace = events[-1].result.thi_trace
        # One candidate event per candidate the MLLM was asked about, in the order asked.
        asked = [e.candidate for e in events if e.HasField("candidate")]
        assert {c.image_id: c.p_yes for c in asked} == {
            c.image_id: c.p_yes for c in trace.candidates if c.asked
        }
        assert all(c.asked and c.base_rank >= 1 for c in asked)
        base_ids = [h.image_id for h in events[0].base.hits]
        assert base_ids[: len(trace.candidates)] == [c.image_id for c in trace.candidates]
        if trace.anchor_image_id:
            anchored += 1
            assert kinds[-4:-1] == ["anchor", "vqa", "refined_query"]
            assert events[-4].anchor.image_id == trace.anchor_image_id
            assert not events[-4].anchor.confirmed
            assert list(events[-3].vqa.answers) == list(trace.vqa_answers)
            assert events[-2].refined_query.text == trace.refined_query
        else:
            assert set(kinds[1:-1]) <= {"candidate"}
    assert anchored, "no query found an anchor: the step checks would be vacuous"


def test_stream_without_thi_is_base_then_result(service):
    svc, _ = service
    request = search_request(QUERIES[0], top_k=5)
    events = stream(svc, request)
    assert [e.WhichOneof("event") for e in events] == ["base", "result"]
    assert events[0].base == events[1].result == run(svc.search(request, no_deadline))


def test_closing_the_stream_stops_the_mllm_calls(service):
    svc, mllm = service
    mllm.delay_s = 0.05
    # xi 1 with 50 candidates: the lazy walk asks one candidate per call until a Yes; find a
    # query whose full walk needs many calls.
    request = None
    for text in QUERIES:
        before = mllm.calls
        reply = run(svc.search(thi_request(text, candidates=50, xi=1.0), no_deadline))
        if mllm.calls - before >= 4:
            request, full = thi_request(text, candidates=50, xi=1.0), mllm.calls - before
            assert reply.thi_trace.mllm_calls == full
            break
    assert request is not None, "every walk ended within 3 calls: nothing to cancel"

    async def first_steps_then_close() -> int:
        events = svc.search_stream(request, no_deadline)
        start = mllm.calls
        async for event in events:
            if event.HasField("candidate"):
                break  # the first answer is in; the walk goes on in the service
        await events.aclose()
        at_close = mllm.calls - start
        await asyncio.sleep(10 * mllm.delay_s)  # time for several more calls, were any made
        assert mllm.calls - start == at_close
        return at_close

    made = run(first_steps_then_close())
    assert made < full, (made, full)


# --- query by example ------------------------------------------------------------------------


def _embed(encoders, png: bytes) -> np.ndarray:
    return encoders.embed_images(decode_crop(png, encoders.image_size)[None])[0]


def _ranking(encoders, demo, query: np.ndarray, k: int) -> list[str]:
    emb = encoders.embed_images(np.stack([decode_crop(d.png, encoders.image_size) for d in demo]))
    scores = emb @ query
    return [demo[i].image_id for i in np.argsort(-scores, kind="stable")[:k]]


def test_a_crop_finds_itself_and_its_ranking_is_image_to_image(service, encoders, demo):
    svc, _ = service
    target = demo[7]
    reply = run(svc.search(search_request(image=target.png, top_k=10), no_deadline))
    assert reply.hits[0].image_id == target.image_id
    assert reply.hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.image_id for h in reply.hits] == _ranking(
        encoders, demo, _embed(encoders, target.png), 10
    )


@pytest.mark.parametrize("weight", [None, 0.0, 0.3, 1.0])
def test_text_and_crop_rank_by_the_weighted_mix(service, encoders, demo, weight):
    svc, _ = service
    text, crop = QUERIES[1], demo[20].png
    reply = run(
        svc.search(search_request(text, top_k=10, image=crop, image_weight=weight), no_deadline)
    )
    w = 0.5 if weight is None else weight  # the documented default
    mixed = w * _embed(encoders, crop) + (1 - w) * encoders.embed_texts([text])[0]
    mixed /= np.linalg.norm(mixed)
    assert [h.image_id for h in reply.hits] == _ranking(encoders, demo, mixed, 10)


def test_thi_with_text_and_crop_works_and_crop_alone_is_refused(service, demo):
    svc, _ = service
    request = thi_request(QUERIES[0], xi=1.0)
    request.image = demo[3].png
    reply = run(svc.search(request, no_deadline))
    assert reply.thi_trace.mllm_calls >= 1 and len(reply.hits) == 10
    alone = search_request(image=demo[3].png, thi=True)
    refuse(svc, alone, grpc.StatusCode.FAILED_PRECONDITION, "text")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's few bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\0" * 64)
    idat_chunk = b"IDAT" + idat
    tail = struct.pack(">I", len(idat)) + idat_chunk + struct.pack(">I", zlib.crc32(idat_chunk))
    return b"\x89PNG\r\n\x1a\n" + body + tail


def test_bad_crops_are_invalid_arguments_with_the_reason(service):
    svc, _ = service
    msg = refuse(
        svc, search_request(image=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "image"
    )
    assert "decodable" in msg
    side = math.isqrt(MAX_IMAGE_PIXELS) + 1
    msg = refuse(
        svc, search_request(image=_png_header(side, side)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert f"at most {MAX_IMAGE_PIXELS}" in msg
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    msg = refuse(svc, search_request(image=gif.getvalue()), grpc.StatusCode.INVALID_ARGUMENT)
    assert "GIF" in msg


# --- operator-confirmed anchor ---------------------------------------------------------------


def test_a_confirmed_anchor_skips_the_walk_and_refines_from_it(service, demo, tmp_path):
    svc, mllm = service
    anchor = demo[40]
    text = QUERIES[2]
    request = search_request(text, top_k=60, confirmed_anchor=anchor.image_id)
    events = stream(svc, request)
    assert [e.WhichOneof("event") for e in events] == [
        "base",
        "anchor",
        "vqa",
        "refined_query",
        "result",
    ]
    assert events[1].anchor.confirmed and events[1].anchor.image_id == anchor.image_id
    trace = events[-1].result.thi_trace
    assert trace.anchor_confirmed and trace.anchor_image_id == anchor.image_id
    assert not any(c.asked for c in trace.candidates)  # no yes/no question
    # VQA and refinement through the engine's own functions, on the anchor's crop.
    crop = CropStore(tmp_path / "check")
    crop.put(anchor.image_id, anchor.png)
    (pixels,) = crop.load([anchor.image_id])
    answers = run(describe(pixels, mllm.inner))
    refined, _ = run(refine_query(text, answers, mllm.inner))
    assert list(trace.vqa_answers) == answers and trace.refined_query == refined
    # Fusion pins the anchor's refined score to 1: lambda * base + (1 - lambda) * 1.
    base = {h.image_id: h.score for h in events[0].base.hits}
    fused = {h.image_id: h.score for h in events[-1].result.hits}
    assert fused[anchor.image_id] == pytest.approx(0.8 * base[anchor.image_id] + 0.2, abs=1e-5)
    again = run(svc.search(request, no_deadline))  # answers now cached: no VQA call
    assert again.hits == events[-1].result.hits
    assert again.thi_trace.mllm_calls == trace.mllm_calls - 1


def test_a_confirmed_anchor_outside_the_filter_guides_but_is_not_returned(service, demo):
    svc, _ = service
    anchor = demo[40]
    other = next(d.camera_id for d in demo if d.camera_id != anchor.camera_id)
    request = search_request(
        QUERIES[2], top_k=50, camera_ids=[other], confirmed_anchor=anchor.image_id
    )
    reply = run(svc.search(request, no_deadline))
    assert reply.thi_trace.anchor_confirmed and reply.thi_trace.refined_query
    assert {h.camera_id for h in reply.hits} == {other}


def test_confirmed_anchor_ids_are_checked(service):
    svc, _ = service
    refuse(
        svc,
        search_request(QUERIES[0], confirmed_anchor="no-such-image"),
        grpc.StatusCode.NOT_FOUND,
        "no-such-image",
    )
    refuse(
        svc,
        search_request(QUERIES[0], confirmed_anchor="bad id'"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "confirmed_anchor_image_id",
    )
    request = search_request(QUERIES[0], confirmed_anchor="x")
    request.thi.enabled = False
    refuse(svc, request, grpc.StatusCode.INVALID_ARGUMENT, "thi.enabled")


# --- grouping --------------------------------------------------------------------------------


def test_grouping_keeps_the_best_hit_per_track_with_its_count(service, demo):
    svc, _ = service
    text = QUERIES[3]
    # The demo gallery has one image per track: add a second and third frame (the same
    # crop, another id) to three tracks.
    extra = []
    for n, d in enumerate(demo[:3]):
        for copy in range(n + 1):
            item = gallery_images([d])[0]
            item.image_id = f"{d.image_id}-f{copy}"
            extra.append(item)
    reply = run(svc.enroll_batch(pb.EnrollRequest(images=extra), no_deadline))
    assert all(r.status == pb.EnrollResult.ACCEPTED for r in reply.results)
    pool = run(svc.search(search_request(text, top_k=100), no_deadline)).hits
    grouped = run(svc.search(search_request(text, top_k=60, group_by_track=True), no_deadline)).hits
    expected, seen = [], set()
    for h in pool:
        if h.track_id not in seen:
            seen.add(h.track_id)
            expected.append((h.image_id, sum(p.track_id == h.track_id for p in pool)))
    assert [(h.image_id, h.track_hits) for h in grouped] == expected
    assert len({h.track_id for h in grouped}) == len(grouped) == len({h.track_id for h in pool})
    counts = {h.track_id: h.track_hits for h in grouped}
    for n, d in enumerate(demo[:3]):
        original = sum(o.track_id == d.track_id for o in demo)
        assert counts[d.track_id] == original + n + 1
    thi = thi_request(text, top_k=20, xi=1.0)
    thi.group_by_track = True
    tracks = [h.track_id for h in run(svc.search(thi, no_deadline)).hits]
    assert len(tracks) == len(set(tracks)) == 20


# --- gallery browsing ------------------------------------------------------------------------


def test_list_pages_get_and_stats(service, demo):
    svc, _ = service
    camera = demo[0].camera_id
    mine = sorted(d.image_id for d in demo if d.camera_id == camera)
    listed, token, pages = [], "", 0
    while True:
        page = run(svc.list_images(list_images_request(7, camera_ids=[camera], page_token=token)))
        listed += [i.image_id for i in page.images]
        pages += 1
        assert all(i.camera_id == camera and not i.image for i in page.images)
        if not (token := page.next_page_token):
            break
    assert listed == mine and pages == math.ceil(len(mine) / 7)
    got = run(svc.get_image(pb.GetImageRequest(image_id=demo[5].image_id)))
    assert got.image == demo[5].png and got.track_id == demo[5].track_id
    assert got.captured_at.ToMilliseconds() == demo[5].captured_at_ms
    stats = run(svc.gallery_stats())
    assert stats.images == len(demo)
    assert {c.camera_id: c.images for c in stats.cameras} == {
        c: sum(d.camera_id == c for d in demo) for c in {d.camera_id for d in demo}
    }
    assert stats.oldest_captured_at.ToMilliseconds() == min(d.captured_at_ms for d in demo)
    assert stats.newest_captured_at.ToMilliseconds() == max(d.captured_at_ms for d in demo)


def test_browsing_bad_input(service, demo):
    svc, _ = service

    def refused(coro, code: grpc.StatusCode, fragment: str) -> None:
        with pytest.raises(InvalidRequest) as exc:
            run(coro)
        assert exc.value.code == code and fragment in exc.value.message, exc.value.message

    refused(svc.list_images(list_images_request(0)), grpc.StatusCode.INVALID_ARGUMENT, "page_size")
    refused(
        svc.list_images(list_images_request(MAX_PAGE_SIZE + 1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_size",
    )
    first = run(svc.list_images(list_images_request(5)))
    token = first.next_page_token
    forged = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    refused(
        svc.list_images(list_images_request(5, page_token=forged)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )
    refused(
        svc.list_images(list_images_request(5, page_token="garbage!")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "page_token",
    )
    # A token of another listing (here: no filter -> a camera filter) is stale for this one.
    refused(
        svc.list_images(list_images_request(5, camera_ids=[demo[0].camera_id], page_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "other cameras",
    )
    # A well-formed token made for the same filter only moves the page: it is honoured.
    moved = run(
        svc.list_images(list_images_request(5, page_token=make_cursor(GalleryFilter(), "p")))
    )
    assert all(i.image_id > "p" for i in moved.images)
    refused(svc.get_image(pb.GetImageRequest(image_id="nope")), grpc.StatusCode.NOT_FOUND, "nope")
    refused(
        svc.get_image(pb.GetImageRequest(image_id="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image_id",
    )


# --- bad search input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "code", "fragment"),
    [
        (lambda: pb.SearchRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no image"),
        (lambda: pb.SearchRequest(top_k=5), grpc.StatusCode.INVALID_ARGUMENT, "no image"),
        (
            lambda: search_request("a man", image_weight=-0.1, image=b"x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image_weight",
        ),
        (
            lambda: search_request("a man", image_weight=1.5),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image_weight",
        ),
        (
            lambda: search_request("a man", image_weight=float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image_weight",
        ),
        (lambda: thi_request("a man", xi=float("nan")), grpc.StatusCode.INVALID_ARGUMENT, "xi"),
        (lambda: thi_request("a man", xi=float("inf")), grpc.StatusCode.INVALID_ARGUMENT, "xi"),
        (
            lambda: thi_request("a man", **{"lambda": float("nan")}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lambda",
        ),
        (
            lambda: thi_request("a man", **{"lambda": float("-inf")}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lambda",
        ),
        (
            lambda: thi_request("a man", **{"lambda": 1.5}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lambda",
        ),
        (
            lambda: thi_request("a man", candidates=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "between 1 and 50",
        ),
        (
            lambda: thi_request("a man", candidates=51),
            grpc.StatusCode.INVALID_ARGUMENT,
            "between 1 and 50",
        ),
    ],
)
def test_bad_search_input(service, build, code, fragment):
    svc, _ = service
    refuse(svc, build(), code, fragment)
    # SearchStream refuses the same request with the same status, before any event.
    with pytest.raises(InvalidRequest) as exc:
        stream(svc, build())
    assert exc.value.code == code
