"""The service's limits, in one place (the table in docs/operations.md), and admission control.

Size limits: every request field with a size has a bound here; orchestrator/validation.py
checks them and answers INVALID_ARGUMENT naming the field, the size and the limit. A whole
message over the channel's MAX_MESSAGE_BYTES never reaches a handler: gRPC itself answers
RESOURCE_EXHAUSTED ("Received message larger than max"), as its status-code guide prescribes.
Enroll is per item: a crop over MAX_IMAGE_BYTES or MAX_IMAGE_PIXELS is REJECTED with its
reason in the item's result and the rest of the batch is stored.

Concurrency: `AdmissionControl`, a grpc.aio server interceptor, lets at most a configured
number of PersonSearch calls run at once, in two lanes: THI searches (each holds the MLLM for
seconds) and everything else. Beyond the limit a call waits in a short queue, at most
`queue_wait_s` and never past its deadline; when the queue is full, or the wait is over, it
gets RESOURCE_EXHAUSTED at once instead of latency that grows with the load. Calls of every
shape are admitted (unary, server-streaming, client- and bidi-streaming); a stream holds its
slot until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from icl.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from icl.orchestrator.handlers import wrap_handler
from icl.orchestrator.settings import ConcurrencyLimits
from icl_api.client import MAX_MESSAGE_BYTES

# --- Size limits (per request; INVALID_ARGUMENT beyond them) -------------------------------
MAX_TEXT_BYTES = 4096  # Search text, UTF-8; far above any benchmark caption (~80 words)
MAX_TOP_K = 1000  # Search top_k
MAX_THI_CANDIDATES = 50  # Search thi.candidates (icl.thi.engine.ThiParams enforces the same)
MAX_CAMERA_IDS = 256  # camera_ids of a Search or Delete filter
MAX_IDS_PER_DELETE = 10_000  # Delete image_ids
MAX_IMAGES_PER_BATCH = 256  # crops in one EnrollRequest
MAX_URI_CHARS = 1024  # GalleryImage image_uri
MAX_PAGE_SIZE = 1000  # ListImages page_size
# Per crop (the item is REJECTED with the reason; icl/images.py checks them while decoding):
# MAX_IMAGE_BYTES (8 MiB encoded) and MAX_IMAGE_PIXELS (2048 x 2048, read from the header).
# Per message (gRPC's max receive size on the server, RESOURCE_EXHAUSTED beyond it; the
# client library sends up to the same): MAX_MESSAGE_BYTES, 64 MiB. An Enroll batch therefore
# carries at most 64 MiB of crops, whatever MAX_IMAGES_PER_BATCH allows.

SIZE_LIMITS: dict[str, int] = {
    "MAX_TEXT_BYTES": MAX_TEXT_BYTES,
    "MAX_TOP_K": MAX_TOP_K,
    "MAX_THI_CANDIDATES": MAX_THI_CANDIDATES,
    "MAX_CAMERA_IDS": MAX_CAMERA_IDS,
    "MAX_IDS_PER_DELETE": MAX_IDS_PER_DELETE,
    "MAX_IMAGES_PER_BATCH": MAX_IMAGES_PER_BATCH,
    "MAX_URI_CHARS": MAX_URI_CHARS,
    "MAX_PAGE_SIZE": MAX_PAGE_SIZE,
    "MAX_IMAGE_BYTES": MAX_IMAGE_BYTES,
    "MAX_IMAGE_PIXELS": MAX_IMAGE_PIXELS,
    "MAX_MESSAGE_BYTES": MAX_MESSAGE_BYTES,
}


# --- Concurrency (the numbers are settings: ConcurrencyLimits in orchestrator/settings.py) ---
class Overloaded(Exception):
    """No slot now and no room (or no time left) to wait for one."""

    def __init__(self, message: str, deadline: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.deadline = deadline  # the caller's deadline, not the queue, ended the wait


class Lane:
    """`limit` calls at once, at most `queue` more waiting in arrival order (first come,
    first served: a freed slot goes straight to the oldest waiter)."""

    def __init__(self, name: str, limit: int, queue: int, max_wait_s: float) -> None:
        if limit < 1 or queue < 0 or max_wait_s < 0:
            raise ValueError(f"lane {name}: limit >= 1, queue >= 0 and max_wait_s >= 0")
        self.name = name
        self.limit = limit
        self.queue = queue
        self.max_wait_s = max_wait_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _full(self) -> str:
        return (
            f"the service is at its limit of {self.limit} {self.name} calls in flight "
            f"with {self.queue} waiting; retry later, with backoff"
        )

    async def acquire(self, remaining_s: float | None) -> None:
        """Take a slot, or raise Overloaded."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.queue:
            raise Overloaded(self._full())
        wait = (
            self.max_wait_s if remaining_s is None else max(0.0, min(self.max_wait_s, remaining_s))
        )
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        try:
            await asyncio.wait_for(slot, wait)
        except TimeoutError:
            by_deadline = remaining_s is not None and remaining_s <= self.max_wait_s
            raise Overloaded(
                f"no {self.name} slot within {wait:.2f} s: " + self._full(), deadline=by_deadline
            ) from None
        except BaseException:
            # Cancelled (the caller left) just after a slot was handed over: pass it on.
            if slot.done() and not slot.cancelled():
                self.release()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(slot)

    def release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot moves to the waiter; `active` is unchanged
                return
        self.active -= 1


def wants_thi(request: Any) -> bool:
    """Whether a (parsed) request asks for THI re-ranking: Search and any streaming search
    carry `thi.enabled`; a request that did not parse, or has no `thi`, is not THI."""
    thi = getattr(request, "thi", None)
    return bool(getattr(thi, "enabled", False))


class AdmissionControl(grpc.aio.ServerInterceptor):
    """Bounded concurrency for the calls of one service (`/service/...`); other services
    (health, reflection) are never limited. Put it after authentication (a refused caller
    takes no slot) and after the metrics interceptor (a rejected call is counted there as
    RESOURCE_EXHAUSTED)."""

    def __init__(
        self,
        limits: ConcurrencyLimits,
        service: str,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.prefix = f"/{service}/"
        self.thi = Lane("THI search", limits.thi_in_flight, limits.thi_queue, limits.queue_wait_s)
        self.other = Lane("non-THI", limits.in_flight, limits.queue, limits.queue_wait_s)
        registry = registry if registry is not None else CollectorRegistry()
        self.rejected = Counter(
            "icl_admission_rejected",  # exposed as icl_admission_rejected_total
            "Calls refused with RESOURCE_EXHAUSTED by the concurrency limit, by lane.",
            ["lane"],
            registry=registry,
        )
        self.waiting = Gauge(
            "icl_admission_waiting",
            "Calls waiting for a slot, by lane.",
            ["lane"],
            registry=registry,
        )
        self.rejected.labels("thi")
        self.rejected.labels("other")
        self.waiting.labels("thi").set_function(lambda: self.thi.waiting)
        self.waiting.labels("other").set_function(lambda: self.other.waiting)

    async def _admit(self, request: Any, context: grpc.aio.ServicerContext) -> Lane:
        lane = self.thi if wants_thi(request) else self.other
        try:
            await lane.acquire(context.time_remaining())
        except Overloaded as exc:
            if exc.deadline:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, exc.message)
            self.rejected.labels("thi" if lane is self.thi else "other").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
        return lane

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        return wrap_handler(handler, self._admitted)

    @contextlib.asynccontextmanager
    async def _admitted(
        self, context: grpc.aio.ServicerContext, request: Any
    ) -> AsyncIterator[None]:
        """The call holds a slot of its lane from admission to its end (a stream: its last
        message); `request` is None for client-streaming calls, which are never THI."""
        lane = await self._admit(request, context)
        try:
            yield
        finally:
            lane.release()


__all__ = [
    "SIZE_LIMITS",
    "AdmissionControl",
    "ConcurrencyLimits",
    "Lane",
    "Overloaded",
    "wants_thi",
]
