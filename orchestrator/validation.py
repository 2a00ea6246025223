"""Request limits and checks. Every failure carries the gRPC status code a caller should get."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

# The numbers live with the other limits (orchestrator/limits.py, docs/operations.md);
# re-exported here for the callers that read them as validation.MAX_...
from icl.orchestrator.limits import MAX_CAMERA_IDS as MAX_CAMERA_IDS
from icl.orchestrator.limits import MAX_IDS_PER_DELETE as MAX_IDS_PER_DELETE
from icl.orchestrator.limits import MAX_IMAGES_PER_BATCH as MAX_IMAGES_PER_BATCH
from icl.orchestrator.limits import MAX_PAGE_SIZE as MAX_PAGE_SIZE
from icl.orchestrator.limits import MAX_TEXT_BYTES as MAX_TEXT_BYTES
from icl.orchestrator.limits import MAX_THI_CANDIDATES as MAX_THI_CANDIDATES
from icl.orchestrator.limits import MAX_TOP_K as MAX_TOP_K
from icl.orchestrator.limits import MAX_URI_CHARS as MAX_URI_CHARS
from icl.ports import GalleryFilter
from icl_api import pb

# Query by example with text: the crop's weight in normalise(w * image + (1 - w) * text).
DEFAULT_IMAGE_WEIGHT = 0.5
# Ids end up inside Milvus filter expressions: allow no quote, backslash, space or bracket.
CAMERA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
TRACK_ID = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.:-]{0,63})?")
# google.protobuf.Timestamp's valid range (0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z, nanos
# 0..999,999,999): the wire carries any int64/int32, and protobuf's converters raise on the rest.
TIMESTAMP_SECONDS_MIN = -62_135_596_800
TIMESTAMP_SECONDS_MAX = 253_402_300_799
TIMESTAMP_NANOS_MAX = 999_999_999


class InvalidRequest(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, message)


def _shorten(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def check_camera_ids(camera_ids: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if len(camera_ids) > MAX_CAMERA_IDS:
        raise _bad(f"{len(camera_ids)} camera ids; at most {MAX_CAMERA_IDS} per request")
    for cam in camera_ids:
        if not CAMERA_ID.fullmatch(cam):
            raise _bad(f"camera id {_shorten(cam)!r} must match {CAMERA_ID.pattern}")
    return tuple(dict.fromkeys(camera_ids))


def timestamp_problem(ts: Timestamp) -> str | None:
    """Why `ts` is not a valid google.protobuf.Timestamp, or None."""
    if not TIMESTAMP_SECONDS_MIN <= ts.seconds <= TIMESTAMP_SECONDS_MAX:
        return (
            f"seconds {ts.seconds} is outside {TIMESTAMP_SECONDS_MIN}..{TIMESTAMP_SECONDS_MAX} "
            "(years 1..9999)"
        )
    if not 0 <= ts.nanos <= TIMESTAMP_NANOS_MAX:
        return f"nanos {ts.nanos} is outside 0..{TIMESTAMP_NANOS_MAX}"
    return None


def _timestamp_ms(ts: Timestamp, field: str) -> int:
    problem = timestamp_problem(ts)
    if problem is not None:
        raise _bad(f"{field} is not a valid Timestamp: {problem}")
    return ts.ToMilliseconds()


def check_time_range(has_range: bool, time_range: pb.TimeRange) -> tuple[int | None, int | None]:
    if not has_range:
        return None, None
    start = (
        _timestamp_ms(time_range.start, "time_range.start")
        if time_range.HasField("start")
        else None
    )
    end = _timestamp_ms(time_range.end, "time_range.end") if time_range.HasField("end") else None
    if start is not None and end is not None and start > end:
        raise _bad("time_range.start is after time_range.end")
    return start, end


@dataclass(frozen=True)
class SearchQuery:
    text: str  # "" for a query by example alone
    top_k: int
    where: GalleryFilter
    image: bytes = b""  # the query crop, still encoded
    image_weight: float = DEFAULT_IMAGE_WEIGHT
    group_by_track: bool = False


def check_unit_interval(value: float, field: str) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise _bad(f"{field} must be a number in [0, 1], got {value}")
    return float(value)


def check_image_id(image_id: str, field: str = "image id") -> str:
    if not IMAGE_ID.fullmatch(image_id):
        raise _bad(f"{field} {_shorten(image_id)!r} must match {IMAGE_ID.pattern}")
    return image_id


def check_search(req: pb.SearchRequest) -> SearchQuery:
    text = req.text.strip()
    if not text and not req.image:
        raise _bad(
            "text is empty and there is no image: give a description, a query crop "
            "(query by example), or both"
        )
    size = len(req.text.encode("utf-8"))
    if size > MAX_TEXT_BYTES:
        raise _bad(f"text is {size} bytes; the limit is {MAX_TEXT_BYTES}")
    if not 1 <= req.top_k <= MAX_TOP_K:
        raise _bad(f"top_k must be between 1 and {MAX_TOP_K}, got {req.top_k}")
    if req.thi.HasField("candidates") and not 1 <= req.thi.candidates <= MAX_THI_CANDIDATES:
        raise _bad(
            f"thi.candidates must be between 1 and {MAX_THI_CANDIDATES}, got {req.thi.candidates}"
        )
    weight = DEFAULT_IMAGE_WEIGHT
    if req.HasField("image_weight"):
        weight = check_unit_interval(req.image_weight, "image_weight")
    cameras = check_camera_ids(list(req.camera_ids))
    start, end = check_time_range(req.HasField("time_range"), req.time_range)
    return SearchQuery(
        text,
        req.top_k,
        GalleryFilter(cameras, start, end),
        bytes(req.image),
        weight,
        req.group_by_track,
    )


@dataclass(frozen=True)
class ListQuery:
    where: GalleryFilter
    page_size: int
    after: str | None


CURSOR_VERSION = 1


def _filter_digest(where: GalleryFilter) -> str:
    key = json.dumps([list(where.camera_ids), where.start_ms, where.end_ms])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def make_cursor(where: GalleryFilter, last_image_id: str) -> str:
    """An opaque page token: the last id listed and the filter it belongs to, with a
    checksum. It holds a position, not a secret: a valid token only moves the page."""
    body = json.dumps(
        {"v": CURSOR_VERSION, "f": _filter_digest(where), "after": last_image_id},
        separators=(",", ":"),
    )
    check = hashlib.sha256(body.encode()).hexdigest()[:16]
    return base64.urlsafe_b64encode(f"{check}{body}".encode()).decode().rstrip("=")


def read_cursor(token: str, where: GalleryFilter) -> str:
    """The image id a page token continues after; INVALID_ARGUMENT for a forged, corrupt,
    other-version or other-filter (stale) token."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        check, body = raw[:16], raw[16:]
        if hashlib.sha256(body.encode()).hexdigest()[:16] != check:
            raise ValueError("checksum")
        fields = json.loads(body)
        after = fields["after"]
        version, digest = fields["v"], fields["f"]
    except (ValueError, UnicodeDecodeError, binascii.Error, KeyError, TypeError):
        raise _bad("page_token is not a token this service issued (corrupt or forged)") from None
    if version != CURSOR_VERSION:
        raise _bad(f"page_token is of format {version!r}; start again without a page_token")
    if digest != _filter_digest(where):
        raise _bad(
            "page_token belongs to a listing with other cameras or another time range; "
            "repeat the filter of the first page, or start again without a page_token"
        )
    if not isinstance(after, str) or not IMAGE_ID.fullmatch(after):
        raise _bad("page_token holds no valid position")
    return after


def check_list(req: pb.ListImagesRequest) -> ListQuery:
    if not 1 <= req.page_size <= MAX_PAGE_SIZE:
        raise _bad(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {req.page_size}")
    cameras = check_camera_ids(list(req.camera_ids))
    start, end = check_time_range(req.HasField("time_range"), req.time_range)
    where = GalleryFilter(cameras, start, end)
    after = read_cursor(req.page_token, where) if req.page_token else None
    return ListQuery(where, req.page_size, after)


def check_gallery_image(item: pb.GalleryImage) -> str | None:
    """The reason an enrolment item is unusable before decoding its pixels, or None."""
    if not IMAGE_ID.fullmatch(item.image_id):
        return f"image_id {_shorten(item.image_id)!r} must match {IMAGE_ID.pattern}"
    if not CAMERA_ID.fullmatch(item.camera_id):
        return f"camera_id {_shorten(item.camera_id)!r} must match {CAMERA_ID.pattern}"
    if not TRACK_ID.fullmatch(item.track_id):
        return f"track_id {_shorten(item.track_id)!r} must match {TRACK_ID.pattern}"
    if len(item.image_uri) > MAX_URI_CHARS:
        return f"image_uri is longer than {MAX_URI_CHARS} characters"
    if not item.HasField("captured_at"):
        return "captured_at is required"
    problem = timestamp_problem(item.captured_at)
    if problem is not None:
        return f"captured_at is not a valid Timestamp: {problem}"
    return None


def captured_at_ms(item: pb.GalleryImage) -> int:
    """An item that passed check_gallery_image: its captured_at is valid."""
    return item.captured_at.ToMilliseconds()


def check_delete(req: pb.DeleteRequest) -> tuple[tuple[str, ...], GalleryFilter]:
    if len(req.image_ids) > MAX_IDS_PER_DELETE:
        raise _bad(f"{len(req.image_ids)} image ids; at most {MAX_IDS_PER_DELETE} per request")
    for image_id in req.image_ids:
        if not IMAGE_ID.fullmatch(image_id):
            raise _bad(f"image id {_shorten(image_id)!r} must match {IMAGE_ID.pattern}")
    cameras = check_camera_ids(list(req.camera_ids))
    start, end = check_time_range(req.HasField("time_range"), req.time_range)
    where = GalleryFilter(cameras, start, end)
    if not req.image_ids and where.empty:
        raise _bad("give image_ids, camera_ids or a time_range; an empty Delete deletes nothing")
    return tuple(dict.fromkeys(req.image_ids)), where
