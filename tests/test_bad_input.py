"""Bad requests get precise gRPC status codes from the running service, never a crash."""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from icl.images import MAX_IMAGE_PIXELS
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


# Timestamps protobuf's converters refuse: the wire carries any int64 seconds / int32 nanos.
BAD_TIMESTAMPS = {"nanos--1": (0, -1), "nanos-1e9": (0, 1_000_000_000), "seconds-2^40": (2**40, 0)}


@pytest.mark.parametrize(
    ("rpc", "raw"),
    [
        # SearchRequest(text="a", top_k=5, time_range.start.nanos=-1)
        ("Search", "0a01611005220d0a0b10ffffffffffffffffff01"),
        # DeleteRequest(time_range.start.seconds=2**40)
        ("Delete", "1a090a0708808080808020"),
    ],
)
def test_invalid_timestamp_through_the_raw_channel(orchestrator, rpc, raw):
    with orchestrator.channel() as channel:
        call = channel.unary_unary(f"/icl.reid.v1.PersonSearch/{rpc}")
        got, details = _code(call, bytes.fromhex(raw))
    assert got == INVALID, details
    assert "not a valid Timestamp" in details


@pytest.mark.parametrize(("seconds", "nanos"), BAD_TIMESTAMPS.values(), ids=BAD_TIMESTAMPS.keys())
@pytest.mark.parametrize("end", [False, True], ids=["start", "end"])
def test_search_and_delete_reject_invalid_timestamps(stub, seconds, nanos, end):
    search = pb.SearchRequest(text="a man", top_k=5)
    delete = pb.DeleteRequest()
    for req in (search, delete):
        ts = req.time_range.end if end else req.time_range.start
        ts.seconds, ts.nanos = seconds, nanos
    field = "time_range.end" if end else "time_range.start"
    for call, req in ((stub.Search, search), (stub.Delete, delete)):
        got, details = _code(call, req)
        assert got == INVALID, details
        assert f"{field} is not a valid Timestamp" in details


def test_enroll_rejects_invalid_timestamps_per_item(stub):
    ok = gallery_images(demo_gallery(1, seed=23))[0]
    ok.image_id, ok.camera_id = "ts-ok", "cam-ts-ok"
    items = [ok]
    for name, (seconds, nanos) in BAD_TIMESTAMPS.items():
        item = pb.GalleryImage()
        item.CopyFrom(ok)
        item.image_id = f"ts-{name.replace('^', '')}"
        item.captured_at.seconds, item.captured_at.nanos = seconds, nanos
        items.append(item)
    # One batch holds `ok` and the bad items; a second batch follows: the stream carries on.
    later = gallery_images(demo_gallery(1, seed=29))[0]
    later.image_id, later.camera_id = "ts-later", "cam-ts-ok"
    replies = enroll_all(stub, [*items, later], batch_size=len(items))
    status = {r.image_id: (r.status, r.reason) for r in replies}
    assert status["ts-ok"] == (pb.EnrollResult.ACCEPTED, "")
    assert status["ts-later"] == (pb.EnrollResult.ACCEPTED, "")
    for item in items[1:]:
        code, reason = status[item.image_id]
        assert code == pb.EnrollResult.REJECTED
        assert "captured_at is not a valid Timestamp" in reason
    reply = stub.Search(search_request("a person", top_k=5, camera_ids=["cam-ts-ok"]), timeout=30)
    assert {h.image_id for h in reply.hits} == {"ts-ok", "ts-later"}


def _png_bomb(side: int = 30_000) -> bytes:
    """A valid 1-bit greyscale PNG of side x side black pixels: ~110 KB for 30000x30000.

    Written chunk by chunk with zlib, since Pillow keeps mode "1" at a byte per pixel and
    would need 900 MB to build it.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    z = zlib.compressobj(9)
    rows = (b"\x00" * (1 + (side + 7) // 8)) * 1000  # filter byte 0 + packed bits, per row
    idat = b"".join(z.compress(rows) for _ in range(side // 1000)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _bmp_bomb() -> bytes:
    """A BMP header declaring 100000x100000 24-bit pixels, with none following."""
    info = struct.pack("<IiiHHIIiiII", 40, 100_000, 100_000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def test_enroll_rejects_oversized_crops_per_item(stub):
    bomb = _png_bomb()
    assert len(bomb) < 150_000
    assert struct.unpack(">II", bomb[16:24]) == (30_000, 30_000)  # IHDR width, height
    big = _png("L", (4096, 4096))
    ok = gallery_images(demo_gallery(2, seed=31))
    ok[0].image_id, ok[0].camera_id = "px-ok", "cam-px-ok"
    ok[1].image_id, ok[1].camera_id = "px-later", "cam-px-ok"
    items = [ok[0]]
    for name, data in {"bomb": bomb, "4096": big, "bmp-bomb": _bmp_bomb()}.items():
        item = pb.GalleryImage()
        item.CopyFrom(ok[0])
        item.image_id, item.image = f"px-{name}", data
        items.append(item)
    edge = pb.GalleryImage()
    edge.CopyFrom(ok[0])
    edge.image_id, edge.image = "px-2048", _png("L", (2048, 2048))  # at the limit: stored
    items.append(edge)

    replies = enroll_all(stub, [*items, ok[1]], batch_size=len(items))
    status = {r.image_id: (r.status, r.reason) for r in replies}
    for image_id in ("px-ok", "px-2048", "px-later"):  # px-later: the stream went on
        assert status[image_id] == (pb.EnrollResult.ACCEPTED, ""), image_id
    for image_id in ("px-bomb", "px-4096", "px-bmp-bomb"):
        code, reason = status[image_id]
        assert code == pb.EnrollResult.REJECTED, image_id
        assert f"a crop may have at most {MAX_IMAGE_PIXELS}" in reason, reason
    assert "4096x4096" in status["px-4096"][1]
    reply = stub.Search(search_request("a person", top_k=5, camera_ids=["cam-px-ok"]), timeout=30)
    assert {h.image_id for h in reply.hits} == {"px-ok", "px-2048", "px-later"}
