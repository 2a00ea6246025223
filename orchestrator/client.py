"""Client helpers for the PersonSearch API, shared by the CLI, the console and load tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from icl.reid.v1 import person_search_pb2 as pb
from icl.reid.v1 import person_search_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # one Enroll batch of crops; the server uses it too


def timestamp(value: datetime | int) -> Timestamp:
    ts = Timestamp()
    if isinstance(value, datetime):
        ts.FromDatetime(value)
    else:
        ts.FromMilliseconds(int(value))
    return ts


def search_request(
    text: str,
    top_k: int = 10,
    camera_ids: Sequence[str] = (),
    start: datetime | int | None = None,
    end: datetime | int | None = None,
) -> pb.SearchRequest:
    req = pb.SearchRequest(text=text, top_k=top_k, camera_ids=list(camera_ids))
    if start is not None:
        req.time_range.start.CopyFrom(timestamp(start))
    if end is not None:
        req.time_range.end.CopyFrom(timestamp(end))
    return req


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


def search(address: str, request: pb.SearchRequest, timeout_s: float = 30.0) -> pb.SearchResponse:
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        return pb_grpc.PersonSearchStub(channel).Search(request, timeout=timeout_s)


async def enroll(
    stub: pb_grpc.PersonSearchStub,
    images: Iterable[pb.GalleryImage],
    batch_size: int = 64,
    timeout_s: float | None = None,
) -> AsyncIterator[pb.EnrollResponse]:
    """Stream `images` in batches; yields one response per batch once it is stored."""

    async def batches() -> AsyncIterator[pb.EnrollRequest]:
        batch: list[pb.GalleryImage] = []
        for image in images:
            batch.append(image)
            if len(batch) == batch_size:
                yield pb.EnrollRequest(images=batch)
                batch = []
        if batch:
            yield pb.EnrollRequest(images=batch)

    async for response in stub.Enroll(batches(), timeout=timeout_s):
        yield response
