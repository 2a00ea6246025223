"""The PersonSearch gRPC service (grpc.aio): text -> Triton text_encoder -> Milvus top-k.

Handlers are registered with our own request parsers so that a request protobuf cannot
decode (for example a `string` field holding invalid UTF-8) gets INVALID_ARGUMENT instead of
the generic INTERNAL that a failing deserializer produces.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from icl.images import ImageRejected, decode_crop
from icl.mllm.contract import Mllm
from icl.orchestrator import validation as v
from icl.orchestrator.auth import TokenAuth, TokenTable
from icl.orchestrator.crops import CropStore
from icl.orchestrator.gallery import (
    FILTERED_SEARCH_EF,
    SEARCH_EF,
    GalleryError,
    MilvusGallery,
    bind_deadline,
    call_timeout,
    is_local_uri,
)
from icl.orchestrator.handlers import wrap_handler
from icl.orchestrator.limits import AdmissionControl
from icl.orchestrator.metrics import ObservedCalls, ServiceMetrics, TimedMllm
from icl.orchestrator.reflection import enable_reflection
from icl.orchestrator.settings import ConcurrencyLimits, ServeSettings
from icl.orchestrator.thi_search import ThiSearchResult, thi_search
from icl.orchestrator.triton.encoders import EncoderUnavailable, TritonEncoders
from icl.ports import (
    Crops,
    Encoders,
    Gallery,
    GalleryEntry,
    GalleryHit,
    GalleryRecord,
    Remaining,
)
from icl.thi.engine import DEFAULT_CANDIDATES, DEFAULT_LAMBDA, DEFAULT_XI, ThiParams, ThiStep
from icl_api import pb
from icl_api.client import MAX_MESSAGE_BYTES, timestamp

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PersonSearch"].full_name
# Health names of the dependencies (gRPC health `Check(service=...)`), and what logs call them.
DEPENDENCY_HEALTH = {
    "triton-encoders": "Triton text_encoder/image_encoder",
    "triton-mllm": "Triton mllm",
    "milvus": "Milvus",
}
T = TypeVar("T")
ENROLL_PIPELINE = 2  # Enroll batches in flight per stream
HEALTH_PROBE_S = 2.0  # the longest the health monitor waits on one dependency


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
    # THI: the Triton model serving the MLLM contract ("" = no THI in this deployment),
    # where enrolled crops are kept for it ("" = `crops/` next to a Lite data dir, else
    # `.icl/crops`), and how long one search may wait for the MLLM before it degrades.
    mllm_model: str = ""
    # The Triton serving `mllm_model` when it is not `triton_url` (a GPU deployment runs the
    # MLLM in its own Triton, the vLLM image); "" = triton_url.
    mllm_url: str = ""
    crop_dir: str = ""
    mllm_timeout_s: float = 20.0
    # How THI asks the MLLM (icl.thi.engine): the lean lazy walk by default; "reference"
    # reproduces the paper's schedule (for comparison), "batched" trades calls for round trips.
    thi_schedule: str = "lean"
    thi_walk: str = "lazy"
    # HNSW beam widths (None: the gallery's defaults): recall against latency, measured in
    # docs/gallery.md.
    search_ef: int | None = None
    filtered_search_ef: int | None = None
    # Health: how often the service re-checks Triton's models and Milvus; gRPC health says
    # NOT_SERVING while any of them is not ready, and SERVING again once all are.
    health_poll_s: float = 1.0
    # SIGTERM: how long in-flight calls (THI searches, Enroll streams) may take to finish
    # before they are cut.
    grace_s: float = 30.0
    # TLS: the server's certificate chain and key (PEM files; "" = plaintext), and a CA whose
    # client certificates are required (mutual TLS; "" = no client certificate asked for).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Bearer tokens and their permissions (None: no authentication, for loopback only).
    tokens: TokenTable | None = None
    # Prometheus metrics over HTTP on this port of `host` (0: not served).
    metrics_port: int = 0
    # Calls at once and waiting, THI searches apart (orchestrator/limits.py).
    concurrency: ConcurrencyLimits = field(default_factory=ConcurrencyLimits)

    @classmethod
    def from_settings(cls, s: ServeSettings) -> OrchestratorConfig:
        """The config of validated settings; reads the tokens file (TokensFileError)."""
        return cls(
            s.triton_url,
            s.milvus_uri,
            s.milvus_token.get_secret_value(),
            s.collection,
            s.host,
            s.port,
            triton_ready_timeout_s=s.triton_wait,
            mllm_model=s.mllm_model,
            mllm_url=s.mllm_url,
            crop_dir=s.crop_dir,
            mllm_timeout_s=s.mllm_timeout,
            thi_schedule=s.thi_schedule,
            thi_walk=s.thi_walk,
            search_ef=s.search_ef,
            filtered_search_ef=s.filtered_search_ef,
            health_poll_s=s.health_poll_s,
            grace_s=s.grace_s,
            tls_cert=str(s.tls_cert or ""),
            tls_key=str(s.tls_key or ""),
            tls_client_ca=str(s.tls_client_ca or ""),
            tokens=TokenTable.load(s.tokens_file) if s.tokens_file is not None else None,
            metrics_port=s.metrics_port,
            concurrency=s.concurrency,
        )

    def __repr__(self) -> str:  # keep the tokens out of every log line and traceback
        tls = "mutual" if self.tls_client_ca else "on" if self.tls_cert else "off"
        return (
            f"OrchestratorConfig(triton_url={self.triton_url!r}, milvus_uri={self.milvus_uri!r}, "
            f"collection={self.collection!r}, host={self.host!r}, port={self.port}, "
            f"mllm_model={self.mllm_model!r}, tls={tls}, "
            f"tokens={len(self.tokens) if self.tokens else 'off'})"
        )

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials from the configured PEM files (None: plaintext)."""
        if not (self.tls_cert or self.tls_key or self.tls_client_ca):
            return None
        if not (self.tls_cert and self.tls_key):
            raise ValueError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
        client_ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 with or without brackets) is loopback."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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


def _image(e: GalleryEntry) -> pb.GalleryImage:
    return pb.GalleryImage(
        image_id=e.image_id,
        camera_id=e.camera_id,
        captured_at=timestamp(e.captured_at_ms),
        track_id=e.track_id,
        image_uri=e.image_uri,
    )


def _trace(result: ThiSearchResult, k: int) -> pb.ThiTrace:
    out = result.outcome
    anchor = result.anchor_id if out.anchor is not None else ""
    return pb.ThiTrace(
        candidates=[
            pb.ThiCandidate(
                image_id=h.image_id,
                base_rank=rank,
                base_score=h.score,
                p_yes=out.p_yes.get(rank - 1, 0.0),
                asked=(rank - 1) in out.p_yes,
            )
            for rank, h in enumerate(result.candidates[:k], 1)
        ],
        anchor_image_id=anchor,
        vqa_answers=out.answers,
        refined_query=out.refined_query,
        fallback_reason=out.fallback_reason,
        mllm_calls=out.evaluations,
        anchor_confirmed=out.anchor_confirmed and out.anchor is not None,
    )


def _step_event(step: ThiStep, base_ranks: dict[str, tuple[int, float]]) -> pb.SearchEvent:
    """A THI step as a SearchStream event (ranks are 1-based in the base ranking)."""
    rank, score = base_ranks.get(step.image_id, (0, 0.0))
    if step.kind == "candidate":
        return pb.SearchEvent(
            candidate=pb.ThiCandidate(
                image_id=step.image_id,
                base_rank=rank,
                base_score=score,
                p_yes=step.p_yes,
                asked=True,
            )
        )
    if step.kind == "anchor":
        return pb.SearchEvent(
            anchor=pb.ThiAnchor(image_id=step.image_id, base_rank=rank, confirmed=step.confirmed)
        )
    if step.kind == "vqa":
        return pb.SearchEvent(
            vqa=pb.ThiVqa(image_id=step.image_id, answers=step.answers, cached=step.cached)
        )
    return pb.SearchEvent(refined_query=pb.ThiRefinedQuery(text=step.text))


def _mix(text_vector: np.ndarray, image_vector: np.ndarray | None, weight: float) -> np.ndarray:
    """normalise(w * image + (1 - w) * text); the text vector alone without a crop."""
    if image_vector is None:
        return text_vector
    mixed = weight * np.asarray(image_vector, np.float32) + (1.0 - weight) * np.asarray(
        text_vector, np.float32
    )
    norm = float(np.linalg.norm(mixed))
    # Opposite unit vectors at w 0.5 cancel out: fall back on the text (never seen in practice).
    return mixed / norm if norm > 1e-6 else np.asarray(text_vector, np.float32)


GROUP_POOL_FACTOR = 10
MAX_GROUP_POOL = 10_000


def _group_pool(top_k: int) -> int:
    """How many images a grouped search ranks to find its top_k tracks."""
    return min(MAX_GROUP_POOL, max(100, GROUP_POOL_FACTOR * top_k))


def _grouped(hits: Sequence[GalleryHit], top_k: int) -> list[pb.Hit]:
    """The best hit of each track (hits come best first), with the track's number of hits
    among `hits`; an image without a track id is a track of its own."""
    counts: dict[str, int] = {}
    for h in hits:
        if h.track_id:
            counts[h.track_id] = counts.get(h.track_id, 0) + 1
    out: list[pb.Hit] = []
    seen: set[str] = set()
    for h in hits:
        if h.track_id in seen:
            continue
        if h.track_id:
            seen.add(h.track_id)
        hit = _hit(h)
        hit.track_hits = counts.get(h.track_id, 1)
        out.append(hit)
        if len(out) == top_k:
            break
    return out


class PersonSearchService:
    """The PersonSearch handlers. The logic (`search`, `enroll_batch`, `delete`) is typed
    against the ports and takes the caller's remaining time as a function, so it runs with
    Triton and Milvus here and with in-process adapters in unit tests; the gRPC methods
    (`Search`, `Enroll`, `Delete`) only parse, call it and map failures to status codes."""

    def __init__(
        self,
        encoders: Encoders,
        gallery: Gallery,
        crops: Crops | None = None,
        mllm: Mllm | None = None,
        mllm_timeout_s: float = 20.0,
        thi_schedule: str = "lean",
        thi_walk: str = "lazy",
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else ServiceMetrics()
        # Set by writes; the health monitor then recounts the gallery (gauge) once.
        self._gallery_changed = True
        self.thi_schedule = thi_schedule
        self.thi_walk = thi_walk
        self.encoders = encoders
        self.gallery = gallery
        self.crops = crops
        self.mllm = mllm
        self.mllm_timeout_s = mllm_timeout_s
        # One thread owns the Milvus client: Milvus Lite is single-writer, and the event
        # loop never blocks on it.
        self._gallery_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gallery")
        # Set by the health monitor while Milvus does not answer: gallery calls then fail at
        # once (UNAVAILABLE) instead of queueing behind a call that waits on a wedged server.
        self.gallery_unreachable = False

    async def _in_gallery(self, fn: Callable[..., T], *args: Any) -> T:
        if self.gallery_unreachable:
            raise GalleryError("Milvus did not answer the last health check")
        limit = call_timeout()  # the request's deadline, less time to answer
        # With the caller's context: log lines of the gallery thread keep the request id, and
        # its Milvus calls get the request's deadline.
        context = contextvars.copy_context()
        work = asyncio.get_running_loop().run_in_executor(
            self._gallery_thread, context.run, fn, *args
        )
        try:
            # The caller is answered in time even when pymilvus' retries overrun the call's
            # timeout; a call still queued is dropped, one running ends on its own.
            return await asyncio.wait_for(work, limit)
        except TimeoutError:
            raise GalleryError(f"Milvus did not answer within {limit:.2f} s") from None

    async def _encode_texts(self, texts: Sequence[str], remaining: Remaining) -> np.ndarray:
        with self.metrics.stage("text_encode"):
            return await self.encoders.encode_texts(texts, remaining())

    async def refresh_gallery_size(self) -> None:
        """Recount the gallery for the gauge, when a write may have changed it."""
        if not self._gallery_changed:
            return
        self._gallery_changed = False
        try:
            size = await self._in_gallery(self.gallery.count)
        except GalleryError:
            self._gallery_changed = True  # try again at the next poll
            raise
        self.metrics.gallery_images.set(size)

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
        bind_deadline(context.time_remaining())  # bounds this call's Milvus calls
        return await self._guard(context, self.search(request, context.time_remaining))

    async def SearchStream(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SearchEvent]:
        await _reject_malformed(request, context)
        events = self.search_stream(request, context.time_remaining)
        try:
            while True:
                try:
                    event = await self._guard(context, anext(events))
                except StopAsyncIteration:
                    return
                yield event
        finally:
            await events.aclose()  # a cancelled call cancels the search and its MLLM calls

    async def search(self, request: pb.SearchRequest, remaining: Remaining) -> pb.SearchResponse:
        return await self._search(request, remaining, None)

    async def search_stream(
        self, request: pb.SearchRequest, remaining: Remaining
    ) -> AsyncGenerator[pb.SearchEvent, None]:
        """The events of one search: the base ranking, each THI step as it happens, then
        the result (the same response `search` gives). Closing the iterator early cancels
        the search, so no further MLLM call is made."""
        queue: asyncio.Queue[pb.SearchEvent | None] = asyncio.Queue()
        task = asyncio.create_task(self._search(request, remaining, queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
            yield pb.SearchEvent(result=task.result())  # raises the search's failure
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _query_vector(
        self, query: v.SearchQuery, remaining: Remaining
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The query embedding (text, crop, or their weighted mix) and the crop's own
        embedding (None without a crop), so THI's refined text can be mixed the same way."""
        image_vector = None
        if query.image:
            try:
                pixels = await asyncio.to_thread(decode_crop, query.image, self.encoders.image_size)
            except ImageRejected as exc:
                raise v.InvalidRequest(
                    grpc.StatusCode.INVALID_ARGUMENT, f"image (the query crop): {exc}"
                ) from None
            with self.metrics.stage("image_encode"):
                image_vector = (await self.encoders.encode_images(pixels[None], remaining()))[0]
            if not query.text:
                return image_vector, image_vector
        text_vector = (await self._encode_texts([query.text], remaining))[0]
        return _mix(text_vector, image_vector, query.image_weight), image_vector

    async def _search(
        self,
        request: pb.SearchRequest,
        remaining: Remaining,
        emit: Callable[[pb.SearchEvent], None] | None,
    ) -> pb.SearchResponse:
        query = v.check_search(request)
        thi = (
            _thi_params(request, self.thi_schedule, self.thi_walk) if request.thi.enabled else None
        )
        anchor_id = request.thi.confirmed_anchor_image_id
        if anchor_id:
            v.check_image_id(anchor_id, "thi.confirmed_anchor_image_id")
            if thi is None:
                raise v.InvalidRequest(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "thi.confirmed_anchor_image_id needs thi.enabled=true",
                )
        if thi is not None and not query.text:
            raise v.InvalidRequest(
                grpc.StatusCode.FAILED_PRECONDITION,
                "THI needs a text query (it asks the MLLM whether a crop matches the "
                "description and refines the description); a query crop alone has no text: "
                "add text, or search with thi.enabled=false",
            )
        if thi is not None and (self.mllm is None or self.crops is None):
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
        anchor = None
        if anchor_id:
            found = await self._in_gallery(self.gallery.fetch, [anchor_id])
            if not found:
                raise v.InvalidRequest(
                    grpc.StatusCode.NOT_FOUND,
                    f"thi.confirmed_anchor_image_id {anchor_id!r} is not in the gallery",
                )
            anchor = found[0]
        vector, image_vector = await self._query_vector(query, remaining)
        # Grouping ranks a wider pool, so that top_k tracks (not top_k images) come back.
        want = _group_pool(query.top_k) if query.group_by_track else query.top_k

        def respond(
            hits: Sequence[GalleryHit], trace: pb.ThiTrace | None = None
        ) -> pb.SearchResponse:
            out = _grouped(hits, query.top_k) if query.group_by_track else [_hit(h) for h in hits]
            return pb.SearchResponse(hits=out, thi_trace=trace)

        if thi is None:
            with self.metrics.stage("gallery_search"):
                hits = await self._in_gallery(self.gallery.search, vector, want, query.where)
            response = respond(hits)
            if emit is not None:
                emit(pb.SearchEvent(base=response))
            return response
        assert self.mllm is not None and self.crops is not None
        left = remaining()
        # The MLLM gets the configured time, but never more than 80% of what is left of the
        # request's deadline: the rest is for fusing and answering.
        budget = self.mllm_timeout_s if left is None else min(self.mllm_timeout_s, 0.8 * left)
        mllm = TimedMllm(self.mllm, self.metrics)  # counts this search's MLLM calls

        async def encode_refined(texts: Sequence[str]) -> np.ndarray:
            refined = await self._encode_texts(texts, remaining)
            return np.stack([_mix(t, image_vector, query.image_weight) for t in refined])

        base_ranks: dict[str, tuple[int, float]] = {}

        def on_base(hits: list[GalleryHit]) -> None:
            base_ranks.update((h.image_id, (r, h.score)) for r, h in enumerate(hits, 1))
            if emit is not None:
                emit(pb.SearchEvent(base=respond(hits[:want])))

        def on_step(step: ThiStep) -> None:
            if emit is not None:
                emit(_step_event(step, base_ranks))

        result = await thi_search(
            query.text,
            vector,
            want,
            query.where,
            thi,
            gallery=self.gallery,
            in_gallery=self._in_gallery,
            encode_texts=encode_refined,
            mllm=mllm,
            crops=self.crops,
            mllm_timeout_s=budget,
            stage=self.metrics.stage,
            on_step=on_step,
            on_base=on_base,
            confirmed_anchor=anchor,
        )
        self.metrics.thi_mllm_calls.observe(mllm.calls)
        return respond(result.hits, _trace(result, thi.candidates))

    async def Enroll(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EnrollResponse]:
        # Up to ENROLL_PIPELINE batches in flight: decoding and encoding the next batch overlap
        # the upsert of this one, while upserts and acknowledgements stay in stream order.
        pending: deque[asyncio.Task[pb.EnrollResponse]] = deque()
        previous: asyncio.Future[None] | None = None
        bind_deadline(context.time_remaining())  # the batches' tasks copy this context
        try:
            async for request in requests:
                await _reject_malformed(request, context)
                stored = asyncio.get_running_loop().create_future()
                pending.append(
                    asyncio.create_task(
                        self.enroll_batch(request, context.time_remaining, previous, stored)
                    )
                )
                previous = stored
                if len(pending) >= ENROLL_PIPELINE:
                    yield await self._guard(context, pending.popleft())
            while pending:
                yield await self._guard(context, pending.popleft())
        finally:
            for task in pending:
                task.cancel()

    async def enroll_batch(
        self,
        request: pb.EnrollRequest,
        remaining: Remaining,
        previous: asyncio.Future[None] | None = None,
        stored: asyncio.Future[None] | None = None,
    ) -> pb.EnrollResponse:
        """Store one batch; upserts after `previous` is stored, sets `stored` when done."""
        try:
            return await self._enroll_batch_in_order(request, remaining, previous)
        finally:
            if stored is not None and not stored.done():
                stored.set_result(None)  # the next batch may upsert now

    async def _enroll_batch_in_order(
        self,
        request: pb.EnrollRequest,
        remaining: Remaining,
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
            crops = [(items[i].image_id, items[i].image) for i, _ in accepted]

            async def store_crops() -> None:
                if previous is not None:
                    await previous  # the same id in two batches ends with the later crop
                if self.crops is not None:  # THI shows these crops to the MLLM later
                    await asyncio.to_thread(self.crops.put_many, crops)

            async def encode() -> np.ndarray:
                with self.metrics.stage("image_encode"):
                    return await self.encoders.encode_images(pixels, remaining())

            # The crop write waits on the disk, not the CPU: overlap it with the encoder.
            embeddings, _ = await asyncio.gather(encode(), store_crops())
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
            # store_crops awaited `previous`: a later batch never overwrites an earlier one's rows
            with self.metrics.stage("gallery_upsert"):
                await self._in_gallery(self.gallery.upsert, records)
            self._gallery_changed = True
            for i, _ in accepted:  # acknowledged only after the upsert returned
                results[i].status = pb.EnrollResult.ACCEPTED
                results[i].reason = ""
        return pb.EnrollResponse(results=results)

    async def Delete(self, request: Any, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        await _reject_malformed(request, context)
        bind_deadline(context.time_remaining())
        return await self._guard(context, self.delete(request))

    async def delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        ids, where = v.check_delete(request)
        removed = await self._in_gallery(self.gallery.delete, ids, where)
        self._gallery_changed = True
        if self.crops is not None:
            # After the rows: a crash in between leaves crops no search can reach, never a
            # row whose crop THI cannot load. A deleted image keeps no pixels here. By ids
            # alone, every listed id is now absent, so a crop left by such a crash goes too.
            doomed = list(ids) if ids and where.empty else removed
            await asyncio.to_thread(self.crops.delete, doomed)
        return pb.DeleteResponse(deleted=len(removed))

    async def ListImages(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.ListImagesResponse:
        await _reject_malformed(request, context)
        return await self._guard(context, self.list_images(request))

    async def list_images(self, request: pb.ListImagesRequest) -> pb.ListImagesResponse:
        """One page of gallery rows in image_id order after the cursor (keyset paging)."""
        q = v.check_list(request)
        # One row more than the page: whether a next page exists, without an empty last page.
        rows = await self._in_gallery(self.gallery.list_page, q.where, q.after, q.page_size + 1)
        page = rows[: q.page_size]
        token = v.make_cursor(q.where, page[-1].image_id) if len(rows) > q.page_size else ""
        return pb.ListImagesResponse(images=[_image(e) for e in page], next_page_token=token)

    async def GetImage(self, request: Any, context: grpc.aio.ServicerContext) -> pb.GalleryImage:
        await _reject_malformed(request, context)
        return await self._guard(context, self.get_image(request))

    async def get_image(self, request: pb.GetImageRequest) -> pb.GalleryImage:
        """A row's metadata and its stored crop (empty bytes when no crop is kept here)."""
        image_id = v.check_image_id(request.image_id, "image_id")
        found = await self._in_gallery(self.gallery.fetch, [image_id])
        if not found:
            raise v.InvalidRequest(
                grpc.StatusCode.NOT_FOUND, f"image {image_id!r} is not in the gallery"
            )
        r = found[0]
        entry = GalleryEntry(r.image_id, r.camera_id, r.captured_at_ms, r.track_id, r.image_uri)
        data = await asyncio.to_thread(self.crops.read, image_id) if self.crops else None
        image = _image(entry)
        image.image = data or b""
        return image

    async def GetGalleryStats(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.GalleryStats:
        await _reject_malformed(request, context)
        return await self._guard(context, self.gallery_stats())

    async def gallery_stats(self) -> pb.GalleryStats:
        stats = await self._in_gallery(self.gallery.stats)
        out = pb.GalleryStats(
            images=stats.images,
            cameras=[
                pb.CameraStats(camera_id=c, images=n) for c, n in sorted(stats.per_camera.items())
            ],
        )
        if stats.oldest_ms is not None and stats.newest_ms is not None:
            out.oldest_captured_at.CopyFrom(timestamp(stats.oldest_ms))
            out.newest_captured_at.CopyFrom(timestamp(stats.newest_ms))
        return out

    def close(self) -> None:
        self._gallery_thread.shutdown(wait=True)


def _thi_params(request: pb.SearchRequest, schedule: str, walk: str) -> ThiParams:
    """The request's THI parameters, the paper's defaults where unset."""
    opts = request.thi
    if opts.HasField("xi") and not np.isfinite(opts.xi):
        raise v.InvalidRequest(
            grpc.StatusCode.INVALID_ARGUMENT, f"thi.xi must be a finite number, got {opts.xi}"
        )
    try:
        return ThiParams(
            candidates=opts.candidates if opts.HasField("candidates") else DEFAULT_CANDIDATES,
            xi=opts.xi if opts.HasField("xi") else DEFAULT_XI,
            lam=getattr(opts, "lambda") if opts.HasField("lambda") else DEFAULT_LAMBDA,
            schedule=schedule,  # type: ignore[arg-type]
            walk=walk,  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise v.InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


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


_HANDLER_KINDS = {  # (client streams, server streams) -> grpc's handler constructor
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _generic_handler(service: PersonSearchService) -> grpc.GenericRpcHandler:
    """A handler for every RPC the proto declares, of the kind it declares, served by the
    servicer's method of the same name (a missing one fails at start, not on first call)."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["PersonSearch"].methods:
        make = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(service, method.name),
            request_deserializer=_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class _CallTracker(grpc.aio.ServerInterceptor):
    """Counts the PersonSearch calls in flight, so shutdown waits for exactly those: health
    Watch streams never end by themselves and would hold the server for the whole grace."""

    def __init__(self) -> None:
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler

        @contextlib.asynccontextmanager
        async def tracked(context: grpc.aio.ServicerContext, _: Any) -> AsyncIterator[None]:
            with self._tracked():
                yield

        return wrap_handler(handler, tracked)


class Orchestrator:
    """The running service: Triton encoders + Milvus gallery + gRPC server with health."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._service: PersonSearchService | None = None
        self._encoders: TritonEncoders | None = None
        self._mllm: Any = None
        self._health: health.aio.HealthServicer | None = None
        self._dependency_ready: dict[str, bool] = {}  # as last published under their names
        self._monitor: asyncio.Task[None] | None = None
        self._calls = _CallTracker()
        self.metrics = ServiceMetrics()  # this service's own registry
        self._stop_metrics: Callable[[], None] | None = None

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        credentials = cfg.server_credentials()
        if not is_loopback(cfg.host) and credentials is None and not cfg.tokens:
            # Said first, before any dependency can fail the start.
            log.warning(
                "PersonSearch will listen on %s without TLS and without tokens: anyone who can "
                "reach it may search, enrol and delete. Configure --tls-cert/--tls-key and "
                "--tokens-file, or keep --host 127.0.0.1",
                cfg.host,
            )
        self._encoders = TritonEncoders(cfg.triton_url, cfg.triton_timeout_s)
        await self._encoders.start(cfg.triton_ready_timeout_s)
        gallery = await asyncio.to_thread(
            MilvusGallery,
            cfg.milvus_uri,
            self._encoders.dim,
            cfg.collection,
            cfg.milvus_token,
            search_ef=cfg.search_ef or SEARCH_EF,
            filtered_search_ef=cfg.filtered_search_ef or FILTERED_SEARCH_EF,
        )
        crop_dir = cfg.crop_dir or (
            str(Path(cfg.milvus_uri).parent / "crops")
            if is_local_uri(cfg.milvus_uri)
            else ".icl/crops"
        )
        crops = await asyncio.to_thread(CropStore, Path(crop_dir))
        mllm = None
        if cfg.mllm_model:
            from icl.orchestrator.triton.mllm import TritonMllm

            # Each search bounds its own wait (mllm_timeout_s); the client's timeout only
            # catches a wedged connection.
            mllm = TritonMllm(
                cfg.mllm_url or cfg.triton_url, cfg.mllm_model, timeout_s=cfg.triton_timeout_s
            )
            await mllm.start(cfg.triton_ready_timeout_s)
            self._mllm = mllm
        self._service = PersonSearchService(
            self._encoders,
            gallery,
            crops,
            mllm,
            cfg.mllm_timeout_s,
            cfg.thi_schedule,
            cfg.thi_walk,
            self.metrics,
        )
        await self._refresh_gallery_size()
        if cfg.metrics_port:
            self._stop_metrics = self.metrics.serve(cfg.host, cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", cfg.host, cfg.metrics_port)
        # Observed first (every call is counted and gets its request id, refused ones too),
        # then authentication (a refused call never counts as in flight), then draining, then
        # admission (RESOURCE_EXHAUSTED beyond the concurrency limits): a call waiting for a
        # slot when SIGTERM comes is drained like one being served.
        interceptors: list[grpc.aio.ServerInterceptor] = [
            ObservedCalls(self.metrics, SERVICE_NAME),
            self._calls,
            AdmissionControl(cfg.concurrency, SERVICE_NAME, self.metrics.registry),
        ]
        if cfg.tokens:
            interceptors.insert(1, TokenAuth(cfg.tokens, SERVICE_NAME))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        server.add_generic_rpc_handlers((_generic_handler(self._service),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), server)  # v1 and v1alpha
        address = f"{cfg.host}:{cfg.port}"
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
        await server.start()
        self._server = server
        self._health = health_servicer
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        await self._set_dependency_health(await self.dependency_readiness())
        self._monitor = asyncio.create_task(self._watch_dependencies(), name="health-monitor")
        log.info("PersonSearch listening on %s (%s)", self.address, cfg)

    async def _set_health(self, status: int) -> None:
        assert self._health is not None
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def dependency_readiness(self) -> dict[str, bool]:
        """Each dependency's health name (DEPENDENCY_HEALTH) and whether it can serve now."""
        assert self._encoders is not None and self._service is not None
        gallery = self._service.gallery
        checks: dict[str, Awaitable[bool]] = {
            "triton-encoders": self._encoders.ready(),
            "milvus": asyncio.to_thread(gallery.reachable),
        }
        if self._mllm is not None:
            checks["triton-mllm"] = self._mllm.ready()
        results = await asyncio.gather(*checks.values(), return_exceptions=True)
        return {name: ok is True for name, ok in zip(checks, results, strict=True)}

    async def unready_dependencies(self) -> list[str]:
        """The dependencies that cannot serve right now, in words (empty: all can)."""
        readiness = await self.dependency_readiness()
        return [DEPENDENCY_HEALTH[name] for name, ok in readiness.items() if not ok]

    async def _refresh_gallery_size(self) -> None:
        assert self._service is not None
        try:
            await self._service.refresh_gallery_size()
        except GalleryError as exc:  # health reports Milvus; the gauge waits for the next poll
            log.debug("gallery size not refreshed: %s", exc)

    async def _watch_dependencies(self) -> None:
        """Health follows the dependencies: NOT_SERVING while one is down, SERVING when back.

        Without this, health said SERVING through a Triton outage while every call failed."""
        serving = True
        while True:
            await asyncio.sleep(self.config.health_poll_s)
            try:
                readiness = await self.dependency_readiness()
            except Exception:  # the monitor must outlive any one failed check
                log.exception("health check failed")
                readiness = {"": False}
            down = [
                DEPENDENCY_HEALTH.get(n, "health check") for n, ok in readiness.items() if not ok
            ]
            await self._set_dependency_health(readiness)
            assert self._service is not None
            # Gallery calls fail at once while health finds Milvus down (no queue behind a
            # wedged Milvus); the outcome of a failed check as a whole changes nothing here.
            self._service.gallery_unreachable = readiness.get("milvus") is False
            if bool(down) == serving:
                serving = not down
                if down:
                    log.warning("NOT_SERVING: not ready: %s", ", ".join(down))
                    await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
                else:
                    log.info("SERVING: Triton and Milvus are ready again")
                    await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            if not down:
                # After health is published: the recount (for the gauge) may wait on a Milvus
                # that is still catching up, and health must not say NOT_SERVING meanwhile
                # while gallery calls are let through. It waits at most HEALTH_PROBE_S.
                bind_deadline(HEALTH_PROBE_S)
                await self._refresh_gallery_size()

    async def _set_dependency_health(self, readiness: dict[str, bool]) -> None:
        """Each dependency under its own health name, so an operator sees which one is down."""
        assert self._health is not None
        for name, ok in readiness.items():
            if name in DEPENDENCY_HEALTH and self._dependency_ready.get(name) != ok:
                self._dependency_ready[name] = ok
                status = health_pb2.HealthCheckResponse
                await self._health.set(name, status.SERVING if ok else status.NOT_SERVING)

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish within `grace_s`
        (default: the config's), then close the clients."""
        grace = self.config.grace_s if grace_s is None else grace_s
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self._health is not None:
            # NOT_SERVING (for good) before the port closes: balancers and watchers learn of
            # the shutdown while in-flight calls still drain.
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            stopping = asyncio.create_task(self._server.stop(grace))
            # A call accepted just before gets dispatched, and watchers get NOT_SERVING.
            await asyncio.sleep(0.1)
            drained = asyncio.create_task(self._calls.drained())
            await asyncio.wait({stopping, drained}, return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
            if not stopping.done():  # every PersonSearch call is done: end the Watch streams
                await self._server.stop(None)
            await stopping
        if self._stop_metrics is not None:
            await asyncio.to_thread(self._stop_metrics)
            self._stop_metrics = None
        if self._service is not None:
            self._service.close()
            self._service.gallery.close()
        if self._encoders is not None:
            await self._encoders.close()
        if self._mllm is not None:
            await self._mllm.close()
