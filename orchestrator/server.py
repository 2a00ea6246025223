"""The PersonSearch gRPC service (grpc.aio): text -> Triton text_encoder -> Milvus top-k.

Handlers are registered with our own request parsers so that a request protobuf cannot
decode (for example a `string` field holding invalid UTF-8) gets INVALID_ARGUMENT instead of
the generic INTERNAL that a failing deserializer produces.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from icl.images import ImageRejected, decode_crop
from icl.orchestrator import validation as v
from icl.orchestrator.client import MAX_MESSAGE_BYTES, timestamp
from icl.orchestrator.encoders import EncoderUnavailable, TritonEncoders
from icl.orchestrator.gallery import GalleryError, MilvusGallery
from icl.ports import GalleryHit, GalleryRecord
from icl.reid.v1 import person_search_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PersonSearch"].full_name
T = TypeVar("T")
ENROLL_PIPELINE = 2  # Enroll batches in flight per stream


@dataclass(frozen=True)
class OrchestratorConfig:
    triton_url: str
    milvus_uri: str
    milvus_token: str = ""
    collection: str = "gallery"
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    triton_timeout_s: float = 30.0
    triton_ready_timeout_s: float = 60.0

    def __repr__(self) -> str:  # keep the token out of every log line and traceback
        return (
            f"OrchestratorConfig(triton_url={self.triton_url!r}, milvus_uri={self.milvus_uri!r}, "
            f"collection={self.collection!r}, host={self.host!r}, port={self.port})"
        )


class _Malformed:
    """Stands in for a request that did not parse."""

    def __init__(self, error: str) -> None:
        self.error = error


def _parser(message_type: type[Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return _Malformed(str(exc) or "malformed request")

    return parse


async def _reject_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Malformed):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request does not parse as {SERVICE_NAME} message (e.g. text that is not valid "
            f"UTF-8): {request.error}",
        )


def _hit(h: GalleryHit) -> pb.Hit:
    return pb.Hit(
        image_id=h.image_id,
        camera_id=h.camera_id,
        captured_at=timestamp(h.captured_at_ms),
        score=h.score,
        track_id=h.track_id,
        image_uri=h.image_uri,
    )


class PersonSearchService:
    def __init__(self, encoders: TritonEncoders, gallery: MilvusGallery) -> None:
        self.encoders = encoders
        self.gallery = gallery
        # One thread owns the Milvus client: Milvus Lite is single-writer, and the event
        # loop never blocks on it.
        self._gallery_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gallery")

    async def _in_gallery(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._gallery_thread, fn, *args)

    async def _guard(self, context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
        """Run `work`, turning known failures into precise status codes."""
        try:
            return await work
        except v.InvalidRequest as exc:
            await context.abort(exc.code, exc.message)
        except EncoderUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"encoder unavailable: {exc}")
        except GalleryError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"gallery unavailable: {exc}")
        raise AssertionError("unreachable")  # abort() always raises

    async def Search(self, request: Any, context: grpc.aio.ServicerContext) -> pb.SearchResponse:
        await _reject_malformed(request, context)
        return await self._guard(context, self._search(request, context))

    async def _search(
        self, request: pb.SearchRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchResponse:
        query = v.check_search(request)
        if request.thi.enabled:
            raise v.InvalidRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                "THI re-ranking needs an `mllm` model, and this deployment serves none; "
                "search with thi.enabled=false",
            )
        if query.where.camera_ids:
            unknown = await self._in_gallery(self.gallery.unknown_cameras, query.where.camera_ids)
            if unknown:
                raise v.InvalidRequest(
                    grpc.StatusCode.NOT_FOUND, f"no gallery image comes from camera(s) {unknown}"
                )
        vectors = await self.encoders.encode_texts([query.text], context.time_remaining())
        hits = await self._in_gallery(self.gallery.search, vectors[0], query.top_k, query.where)
        return pb.SearchResponse(hits=[_hit(h) for h in hits])

    async def Enroll(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EnrollResponse]:
        # Up to ENROLL_PIPELINE batches in flight: decoding and encoding the next batch overlap
        # the upsert of this one, while upserts and acknowledgements stay in stream order.
        pending: deque[asyncio.Task[pb.EnrollResponse]] = deque()
        previous: asyncio.Future[None] | None = None
        try:
            async for request in requests:
                await _reject_malformed(request, context)
                stored = asyncio.get_running_loop().create_future()
                pending.append(
                    asyncio.create_task(self._enroll_batch(request, context, previous, stored))
                )
                previous = stored
                if len(pending) >= ENROLL_PIPELINE:
                    yield await self._guard(context, pending.popleft())
            while pending:
                yield await self._guard(context, pending.popleft())
        finally:
            for task in pending:
                task.cancel()

    async def _enroll_batch(
        self,
        request: pb.EnrollRequest,
        context: grpc.aio.ServicerContext,
        previous: asyncio.Future[None] | None = None,
        stored: asyncio.Future[None] | None = None,
    ) -> pb.EnrollResponse:
        try:
            return await self._enroll_batch_in_order(request, context, previous)
        finally:
            if stored is not None and not stored.done():
                stored.set_result(None)  # the next batch may upsert now

    async def _enroll_batch_in_order(
        self,
        request: pb.EnrollRequest,
        context: grpc.aio.ServicerContext,
        previous: asyncio.Future[None] | None,
    ) -> pb.EnrollResponse:
        items = list(request.images)
        if len(items) > v.MAX_IMAGES_PER_BATCH:
            raise v.InvalidRequest(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(items)} images in one batch; at most {v.MAX_IMAGES_PER_BATCH}",
            )
        size = self.encoders.image_size
        decoded = await asyncio.to_thread(_decode_batch, items, size)
        accepted = [(i, px) for i, (px, _) in enumerate(decoded) if px is not None]
        results = [
            pb.EnrollResult(image_id=item.image_id, status=pb.EnrollResult.REJECTED, reason=reason)
            for item, (_, reason) in zip(items, decoded, strict=True)
        ]
        if accepted:
            pixels = np.stack([px for _, px in accepted])
            embeddings = await self.encoders.encode_images(pixels, context.time_remaining())
            records = [
                GalleryRecord(
                    image_id=items[i].image_id,
                    camera_id=items[i].camera_id,
                    captured_at_ms=v.captured_at_ms(items[i]),
                    track_id=items[i].track_id,
                    image_uri=items[i].image_uri,
                    embedding=emb,
                )
                for (i, _), emb in zip(accepted, embeddings, strict=True)
            ]
            if previous is not None:
                await previous  # a later batch never overwrites an earlier one's rows
            await self._in_gallery(self.gallery.upsert, records)
            for i, _ in accepted:  # acknowledged only after the upsert returned
                results[i].status = pb.EnrollResult.ACCEPTED
                results[i].reason = ""
        return pb.EnrollResponse(results=results)

    async def Delete(self, request: Any, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        await _reject_malformed(request, context)

        async def delete() -> pb.DeleteResponse:
            ids, where = v.check_delete(request)
            return pb.DeleteResponse(
                deleted=await self._in_gallery(self.gallery.delete, ids, where)
            )

        return await self._guard(context, delete())

    def close(self) -> None:
        self._gallery_thread.shutdown(wait=True)


def _decode_batch(
    items: list[pb.GalleryImage], size: tuple[int, int]
) -> list[tuple[np.ndarray | None, str]]:
    out: list[tuple[np.ndarray | None, str]] = []
    seen: set[str] = set()
    for item in items:
        reason = v.check_gallery_image(item)
        if reason is None and item.image_id in seen:
            reason = "duplicate image_id in this batch"
        seen.add(item.image_id)
        if reason is not None:
            out.append((None, reason))
            continue
        try:
            out.append((decode_crop(item.image, size), ""))
        except ImageRejected as exc:
            out.append((None, str(exc)))
    return out


def _generic_handler(service: PersonSearchService) -> grpc.GenericRpcHandler:
    handlers = {
        "Search": grpc.unary_unary_rpc_method_handler(
            service.Search,
            request_deserializer=_parser(pb.SearchRequest),
            response_serializer=pb.SearchResponse.SerializeToString,
        ),
        "Enroll": grpc.stream_stream_rpc_method_handler(
            service.Enroll,
            request_deserializer=_parser(pb.EnrollRequest),
            response_serializer=pb.EnrollResponse.SerializeToString,
        ),
        "Delete": grpc.unary_unary_rpc_method_handler(
            service.Delete,
            request_deserializer=_parser(pb.DeleteRequest),
            response_serializer=pb.DeleteResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class Orchestrator:
    """The running service: Triton encoders + Milvus gallery + gRPC server with health."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._service: PersonSearchService | None = None
        self._encoders: TritonEncoders | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        self._encoders = TritonEncoders(cfg.triton_url, cfg.triton_timeout_s)
        await self._encoders.start(cfg.triton_ready_timeout_s)
        gallery = await asyncio.to_thread(
            MilvusGallery, cfg.milvus_uri, self._encoders.dim, cfg.collection, cfg.milvus_token
        )
        self._service = PersonSearchService(self._encoders, gallery)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        server.add_generic_rpc_handlers((_generic_handler(self._service),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
        await server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("PersonSearch listening on %s (%s)", self.address, cfg)

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        if self._service is not None:
            self._service.close()
            self._service.gallery.close()
        if self._encoders is not None:
            await self._encoders.close()
