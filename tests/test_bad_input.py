"""Bad requests get precise gRPC status codes from the running service, never a crash."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from icl.synthetic.demo_gallery import demo_gallery
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import enroll_all, gallery_images

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stub(orchestrator):
    with orchestrator.channel() as channel:
        stub = pb_grpc.PersonSearchStub(channel)
        results = enroll_all(stub, gallery_images(demo_gallery(12, seed=5)))
        assert all(r.status == pb.EnrollResult.ACCEPTED for r in results)
        yield stub


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=30, **kwargs)
    return info.value.code(), info.value.details()


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.SearchRequest(text="", top_k=5), INVALID, "text is empty"),
        (pb.SearchRequest(text=" \n\t ", top_k=5), INVALID, "text is empty"),
        (pb.SearchRequest(text="a man", top_k=0), INVALID, "top_k"),
        (pb.SearchRequest(text="a man", top_k=10_000), INVALID, "top_k"),
        (pb.SearchRequest(text="x" * 1_048_576, top_k=5), INVALID, "1048576 bytes"),
        (
            pb.SearchRequest(text="a man", top_k=5, camera_ids=["cam-99"]),
            grpc.StatusCode.NOT_FOUND,
            "cam-99",
        ),
        (
            pb.SearchRequest(text="a man", top_k=5, camera_ids=["cam-01", 'x" or 1==1 or "']),
            INVALID,
            "camera id",
        ),
        (pb.SearchRequest(text="a man", top_k=5, camera_ids=["cam\\01"]), INVALID, "camera id"),
        (
            pb.SearchRequest(text="a man", top_k=5, camera_ids=[f"c{i}" for i in range(300)]),
            INVALID,
            "300 camera ids",
        ),
        (search_request("a man", 5, start=2_000, end=1_000), INVALID, "start is after"),
        (
            pb.SearchRequest(text="a man", top_k=5, thi=pb.ThiOptions(enabled=True)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "mllm",
        ),
    ],
    ids=[
        "empty",
        "blank",
        "top_k-0",
        "top_k-10000",
        "text-1MB",
        "unknown-camera",
        "injected-camera",
        "backslash-camera",
        "too-many-cameras",
        "reversed-time",
        "thi-without-mllm",
    ],
)
def test_search_rejects(stub, request_, code, words):
    got, details = _code(stub.Search, request_)
    assert got == code, details
    assert words in details


def test_invalid_utf8_through_the_raw_channel(orchestrator):
    # field 1 (text), length 2, bytes ff fe; field 2 (top_k) = 5
    raw = bytes([0x0A, 0x02, 0xFF, 0xFE, 0x10, 0x05])
    with orchestrator.channel() as channel:
        call = channel.unary_unary("/icl.reid.v1.PersonSearch/Search")
        got, details = _code(call, raw)
    assert got == INVALID
    assert "UTF-8" in details


def test_unparseable_enroll_batch(orchestrator):
    raw = bytes([0x0A, 0x03, 0x0A, 0x01, 0xFF])  # GalleryImage.image_id = b"\xff"
    with orchestrator.channel() as channel:
        call = channel.stream_stream("/icl.reid.v1.PersonSearch/Enroll")
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([raw]), timeout=30))
    assert info.value.code() == INVALID


def test_service_keeps_serving_after_bad_requests(stub):
    reply = stub.Search(search_request("a woman", top_k=3), timeout=30)
    assert len(reply.hits) == 3


def _png(mode: str, size=(20, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_enroll_rejects_bad_items_and_keeps_good_ones(stub):
    good = gallery_images(demo_gallery(2, seed=11))
    for g in good:
        g.image_id = "good-" + g.image_id
    png = good[0].image
    bad = {
        "empty": b"",
        "not-an-image": b"hello, this is text",
        "truncated": png[: len(png) // 2],
        "gif": _gif(),
    }
    items = list(good)
    for name, data in bad.items():
        item = pb.GalleryImage()
        item.CopyFrom(good[0])
        item.image_id, item.image = f"bad-{name}", data
        items.append(item)
    odd = pb.GalleryImage()
    odd.CopyFrom(good[0])
    odd.image_id, odd.image = "odd-mode-rgba", _png("RGBA")
    items.append(odd)
    hostile = pb.GalleryImage()
    hostile.CopyFrom(good[0])
    hostile.image_id = 'x" or image_id != "'
    items.append(hostile)
    dup = pb.GalleryImage()
    dup.CopyFrom(good[0])
    items.append(dup)

    replies = enroll_all(stub, items, batch_size=len(items))
    assert [r.image_id for r in replies] == [i.image_id for i in items]
    assert "duplicate image_id" in replies[-1].reason
    results = {r.image_id: r for r in replies[:-1]}
    accepted = {i for i, r in results.items() if r.status == pb.EnrollResult.ACCEPTED}
    assert accepted == {good[0].image_id, good[1].image_id, "odd-mode-rgba"}
    assert "empty" in results["bad-empty"].reason
    assert "not a decodable image" in results["bad-not-an-image"].reason
    assert "corrupt" in results["bad-truncated"].reason
    assert "unsupported image format GIF" in results["bad-gif"].reason
    assert "must match" in results[hostile.image_id].reason


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="GIF")
    return buf.getvalue()


def test_enroll_rejects_oversized_batches(stub):
    items = gallery_images(demo_gallery(1, seed=1)) * 257
    with pytest.raises(grpc.RpcError) as info:
        enroll_all(stub, items, batch_size=257)
    assert info.value.code() == INVALID


def test_delete_needs_a_selector(stub):
    got, details = _code(stub.Delete, pb.DeleteRequest())
    assert got == INVALID and "deletes nothing" in details
    got, _ = _code(stub.Delete, pb.DeleteRequest(image_ids=["ok", 'bad"id']))
    assert got == INVALID


def test_deadline_is_enforced(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(search_request("a woman", top_k=3), timeout=0.0001)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
