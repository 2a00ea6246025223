"""The PersonSearch client: request builders, channels (TLS, bearer token) and sync/asyncio
clients. Shared by the `icl` CLI, the operator console, the load test and the service's tests.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from icl_api.v1 import person_search_pb2 as pb
from icl_api.v1 import person_search_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # one Enroll batch of crops; the server uses it too
DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 30.0


def timestamp(value: datetime | int) -> Timestamp:
    """A protobuf Timestamp from an aware datetime or epoch milliseconds."""
    ts = Timestamp()
    if isinstance(value, datetime):
        ts.FromDatetime(value)
    else:
        ts.FromMilliseconds(int(value))
    return ts


def search_request(
    text: str = "",
    top_k: int = 10,
    camera_ids: Sequence[str] = (),
    start: datetime | int | None = None,
    end: datetime | int | None = None,
    *,
    image: bytes = b"",
    image_weight: float | None = None,
    group_by_track: bool = False,
    thi: bool = False,
    confirmed_anchor: str = "",
) -> pb.SearchRequest:
    """A Search request: a description, a query crop (`image`, encoded), or both (mixed
    with the crop's `image_weight`, the service's default 0.5 when None); `thi` re-ranks with
    THI, from an operator-confirmed anchor image when `confirmed_anchor` names one."""
    req = pb.SearchRequest(
        text=text,
        top_k=top_k,
        camera_ids=list(camera_ids),
        image=image,
        group_by_track=group_by_track,
    )
    if image_weight is not None:
        req.image_weight = image_weight
    if start is not None:
        req.time_range.start.CopyFrom(timestamp(start))
    if end is not None:
        req.time_range.end.CopyFrom(timestamp(end))
    if thi or confirmed_anchor:
        req.thi.enabled = True
        req.thi.confirmed_anchor_image_id = confirmed_anchor
    return req


def list_images_request(
    page_size: int = 100,
    camera_ids: Sequence[str] = (),
    start: datetime | int | None = None,
    end: datetime | int | None = None,
    page_token: str = "",
) -> pb.ListImagesRequest:
    req = pb.ListImagesRequest(
        camera_ids=list(camera_ids), page_size=page_size, page_token=page_token
    )
    if start is not None:
        req.time_range.start.CopyFrom(timestamp(start))
    if end is not None:
        req.time_range.end.CopyFrom(timestamp(end))
    return req


def delete_request(
    image_ids: Sequence[str] = (),
    camera_ids: Sequence[str] = (),
    start: datetime | int | None = None,
    end: datetime | int | None = None,
) -> pb.DeleteRequest:
    """Delete by ids, or every image matching the cameras and time range."""
    req = pb.DeleteRequest(image_ids=list(image_ids), camera_ids=list(camera_ids))
    if start is not None:
        req.time_range.start.CopyFrom(timestamp(start))
    if end is not None:
        req.time_range.end.CopyFrom(timestamp(end))
    return req


def gallery_image(
    image_id: str,
    camera_id: str,
    captured_at: datetime | int,
    image: bytes,
    track_id: str = "",
    image_uri: str = "",
) -> pb.GalleryImage:
    """One Enroll item: an encoded crop (JPEG/PNG/...) with its metadata."""
    return pb.GalleryImage(
        image_id=image_id,
        camera_id=camera_id,
        captured_at=timestamp(captured_at),
        track_id=track_id,
        image_uri=image_uri,
        image=image,
    )


def enroll_batches(
    images: Iterable[pb.GalleryImage], batch_size: int = 64
) -> Iterator[pb.EnrollRequest]:
    batch: list[pb.GalleryImage] = []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            yield pb.EnrollRequest(images=batch)
            batch = []
    if batch:
        yield pb.EnrollRequest(images=batch)


async def enroll(
    stub: pb_grpc.PersonSearchStub,
    images: Iterable[pb.GalleryImage],
    batch_size: int = 64,
    timeout_s: float | None = None,
    metadata: Sequence[tuple[str, str]] = (),
) -> AsyncIterator[pb.EnrollResponse]:
    """Stream `images` in batches over an asyncio stub; one response per stored batch."""

    async def batches() -> AsyncIterator[pb.EnrollRequest]:
        for batch in enroll_batches(images, batch_size):
            yield batch

    async for response in stub.Enroll(batches(), timeout=timeout_s, metadata=tuple(metadata)):
        yield response


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]


@dataclass(frozen=True)
class TlsOptions:
    """TLS towards the service: a CA to trust (None: the system's roots), and optionally a
    client certificate and key for mutual TLS. Files in PEM."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None  # when the certificate names another host than the address

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            read(self.ca_file), read(self.key_file), read(self.cert_file)
        )


def _token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class _TokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call (plain channels cannot carry call credentials)."""

    def __init__(self, token: str) -> None:
        self._metadata = _token_metadata(token)

    def _details(self, details: Any) -> Any:
        metadata = tuple(details.metadata or ()) + self._metadata
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def open_channel(
    address: str, tls: TlsOptions | None = None, token: str | None = None
) -> grpc.Channel:
    """A blocking channel to `address`, with TLS when given and the token on every call."""
    options = channel_options()
    if tls is not None:
        opts: list[tuple[str, Any]] = list(options)
        if tls.server_name:
            opts.append(("grpc.ssl_target_name_override", tls.server_name))
        channel = grpc.secure_channel(address, tls.credentials(), options=opts)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _TokenInterceptor(token)) if token else channel


def open_aio_channel(address: str, tls: TlsOptions | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address` (the token goes per call: see AsyncPersonSearchClient)."""
    options: list[tuple[str, Any]] = list(channel_options())
    if tls is not None:
        if tls.server_name:
            options.append(("grpc.ssl_target_name_override", tls.server_name))
        return grpc.aio.secure_channel(address, tls.credentials(), options=options)
    return grpc.aio.insecure_channel(address, options=options)


class PersonSearchClient:
    """Blocking client. Each call takes `timeout_s` (the deadline) or the client's default.

    Errors are grpc.RpcError with the service's status code and message.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        tls: TlsOptions | None = None,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = open_channel(address, tls, token)
        self.stub = pb_grpc.PersonSearchStub(self.channel)

    def __enter__(self) -> PersonSearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def search(
        self, request: pb.SearchRequest | None = None, timeout_s: float | None = None, **kwargs: Any
    ) -> pb.SearchResponse:
        """Search with a prepared request, or with `search_request`'s arguments."""
        request = request if request is not None else search_request(**kwargs)
        return self.stub.Search(request, timeout=timeout_s or self.timeout_s)

    def enroll(
        self,
        images: Iterable[pb.GalleryImage],
        batch_size: int = 64,
        timeout_s: float | None = None,
    ) -> Iterator[pb.EnrollResponse]:
        """Stream `images` in batches; yields one response per batch once it is stored."""
        yield from self.stub.Enroll(enroll_batches(images, batch_size), timeout=timeout_s)

    def delete(
        self, request: pb.DeleteRequest | None = None, timeout_s: float | None = None, **kwargs: Any
    ) -> pb.DeleteResponse:
        """Delete with a prepared request, or with `delete_request`'s arguments."""
        request = request if request is not None else delete_request(**kwargs)
        return self.stub.Delete(request, timeout=timeout_s or self.timeout_s)

    def search_stream(
        self, request: pb.SearchRequest | None = None, timeout_s: float | None = None, **kwargs: Any
    ) -> Iterator[pb.SearchEvent]:
        """SearchStream: the base ranking, each THI step, then the result. Stop iterating
        (or close the generator) to cancel the call and the MLLM calls left."""
        request = request if request is not None else search_request(**kwargs)
        call = self.stub.SearchStream(request, timeout=timeout_s or self.timeout_s)
        try:
            yield from call
        finally:
            call.cancel()  # no-op once the stream has ended

    def list_images(
        self,
        request: pb.ListImagesRequest | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> pb.ListImagesResponse:
        """One page; `list_images_request`'s arguments or a prepared request."""
        request = request if request is not None else list_images_request(**kwargs)
        return self.stub.ListImages(request, timeout=timeout_s or self.timeout_s)

    def iter_images(
        self, timeout_s: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GalleryImage]:
        """Every image matching `list_images_request`'s arguments, page after page."""
        request = list_images_request(**kwargs)
        while True:
            page = self.list_images(request, timeout_s)
            yield from page.images
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def get_image(self, image_id: str, timeout_s: float | None = None) -> pb.GalleryImage:
        return self.stub.GetImage(
            pb.GetImageRequest(image_id=image_id), timeout=timeout_s or self.timeout_s
        )

    def gallery_stats(self, timeout_s: float | None = None) -> pb.GalleryStats:
        return self.stub.GetGalleryStats(
            pb.GalleryStatsRequest(), timeout=timeout_s or self.timeout_s
        )


class AsyncPersonSearchClient:
    """The asyncio twin of PersonSearchClient (grpc.aio); use `async with`."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        tls: TlsOptions | None = None,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = open_aio_channel(address, tls)
        self.stub = pb_grpc.PersonSearchStub(self.channel)
        self._metadata = _token_metadata(token)

    async def __aenter__(self) -> AsyncPersonSearchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def search(
        self, request: pb.SearchRequest | None = None, timeout_s: float | None = None, **kwargs: Any
    ) -> pb.SearchResponse:
        request = request if request is not None else search_request(**kwargs)
        return await self.stub.Search(
            request, timeout=timeout_s or self.timeout_s, metadata=self._metadata
        )

    async def enroll(
        self,
        images: Iterable[pb.GalleryImage],
        batch_size: int = 64,
        timeout_s: float | None = None,
    ) -> AsyncIterator[pb.EnrollResponse]:
        """Stream `images` in batches; yields one response per batch once it is stored."""
        async for response in enroll(self.stub, images, batch_size, timeout_s, self._metadata):
            yield response

    async def delete(
        self, request: pb.DeleteRequest | None = None, timeout_s: float | None = None, **kwargs: Any
    ) -> pb.DeleteResponse:
        request = request if request is not None else delete_request(**kwargs)
        return await self.stub.Delete(
            request, timeout=timeout_s or self.timeout_s, metadata=self._metadata
        )

    async def search_stream(
        self, request: pb.SearchRequest | None = None, timeout_s: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.SearchEvent]:
        """SearchStream; leaving the loop early cancels the call and the MLLM calls left."""
        request = request if request is not None else search_request(**kwargs)
        call = self.stub.SearchStream(
            request, timeout=timeout_s or self.timeout_s, metadata=self._metadata
        )
        try:
            async for event in call:
                yield event
        finally:
            call.cancel()

    async def list_images(
        self,
        request: pb.ListImagesRequest | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> pb.ListImagesResponse:
        request = request if request is not None else list_images_request(**kwargs)
        return await self.stub.ListImages(
            request, timeout=timeout_s or self.timeout_s, metadata=self._metadata
        )

    async def get_image(self, image_id: str, timeout_s: float | None = None) -> pb.GalleryImage:
        return await self.stub.GetImage(
            pb.GetImageRequest(image_id=image_id),
            timeout=timeout_s or self.timeout_s,
            metadata=self._metadata,
        )

    async def gallery_stats(self, timeout_s: float | None = None) -> pb.GalleryStats:
        return await self.stub.GetGalleryStats(
            pb.GalleryStatsRequest(), timeout=timeout_s or self.timeout_s, metadata=self._metadata
        )
