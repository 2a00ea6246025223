"""Prometheus metrics of the PersonSearch service (`icl serve --metrics-port`), and the gRPC
interceptor that records every call: its count and latency by RPC and status code, the calls
in flight, its request id (caller's `x-request-id` or a new one, returned in the initial
metadata and put on the call's log records) and one access log line.

Each service has its own CollectorRegistry: several services in one process (tests) never
share or clash over a metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from icl.mllm.contract import VQA_PROMPT, Mllm
from icl.orchestrator.handlers import wrap_handler
from icl.orchestrator.logs import (
    REQUEST_ID_KEY,
    request_id_from,
    reset_request_id,
    set_request_id,
)

access_log = logging.getLogger("icl.orchestrator.access")

# Seconds: from a cached plain search (ms) to a THI search on a CPU MLLM (tens of seconds).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
MLLM_CALL_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STAGES = (
    "text_encode",  # Triton text_encoder (the query; THI's refined query)
    "image_encode",  # Triton image_encoder (an Enroll batch)
    "gallery_search",  # Milvus top-k (plain search; THI's base and refined pools)
    "gallery_upsert",  # Milvus upsert of an Enroll batch
    "thi_yes_no",  # MLLM: P(Yes) of the anchor question for a group of candidates
    "thi_vqa",  # MLLM: the anchor's human-centred questions
    "thi_refine",  # MLLM: aggregation into the refined query (generating backends only)
    "fusion",  # THI: re-scoring the pool from its stored embeddings and fusing
)


class ServiceMetrics:
    """The service's metrics, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "icl_requests",  # exposed as icl_requests_total
            "PersonSearch calls finished, by RPC and gRPC status code.",
            ["rpc", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "icl_request_duration_seconds",
            "PersonSearch call latency (whole stream for Enroll), by RPC and status code.",
            ["rpc", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "icl_requests_in_flight", "PersonSearch calls being served.", ["rpc"], registry=r
        )
        self.stage_seconds = Histogram(
            "icl_stage_duration_seconds",
            "Time in one stage of a call (Triton encoders, Milvus, the MLLM, THI fusion).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.thi_mllm_calls = Histogram(
            "icl_thi_mllm_calls",
            "MLLM requests made by one THI search (0: answers cached or no candidate).",
            buckets=MLLM_CALL_BUCKETS,
            registry=r,
        )
        self.gallery_images = Gauge(
            "icl_gallery_images",
            "Images in the gallery (recounted after Enroll/Delete, at most once per health poll).",
            registry=r,
        )
        for stage in STAGES:  # every stage is exposed from the start, at zero
            self.stage_seconds.labels(stage)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage `name` (also when it fails)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds.labels(name).observe(time.perf_counter() - start)

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Serve /metrics over HTTP on host:port in a daemon thread; returns the stop."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop


class TimedMllm:
    """The Mllm port with each call timed as its THI stage and counted (one per search)."""

    def __init__(self, inner: Mllm, metrics: ServiceMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.calls = 0

    @property
    def model_key(self) -> str:
        return self.inner.model_key

    @property
    def can_generate(self) -> bool:
        return self.inner.can_generate

    async def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        self.calls += 1
        with self.metrics.stage("thi_yes_no"):
            return await self.inner.score(images, prompts)

    async def generate(
        self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256
    ) -> str:
        self.calls += 1
        # THI generates twice: the anchor's VQA (always this prompt), then the aggregation.
        with self.metrics.stage("thi_vqa" if prompt == VQA_PROMPT else "thi_refine"):
            return await self.inner.generate(images, prompt, max_tokens)


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    """The status the call ended with."""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions keep the raw number
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status
    return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN


class ObservedCalls(grpc.aio.ServerInterceptor):
    """Metrics, request id and access log for the calls of one service (`/service/...`)."""

    def __init__(self, metrics: ServiceMetrics, service: str) -> None:
        self.metrics = metrics
        self.prefix = f"/{service}/"

    @contextlib.contextmanager
    def _observed(
        self, rpc: str, request_id: str, context: grpc.aio.ServicerContext
    ) -> Iterator[None]:
        token = set_request_id(request_id)
        gauge = self.metrics.in_flight.labels(rpc)
        gauge.inc()
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            elapsed = time.perf_counter() - start
            gauge.dec()
            code = _code(context, error)
            self.metrics.requests.labels(rpc, code.name).inc()
            self.metrics.request_seconds.labels(rpc, code.name).observe(elapsed)
            access_log.info("%s %s %.1f ms", rpc, code.name, 1000 * elapsed)
            # A stream closed from another task runs this in another context.
            with contextlib.suppress(ValueError):
                reset_request_id(token)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        rpc = details.method[len(self.prefix) :]
        request_id = request_id_from(details.invocation_metadata)
        reply_metadata = ((REQUEST_ID_KEY, request_id),)

        @contextlib.asynccontextmanager
        async def observed(context: grpc.aio.ServicerContext, _: Any) -> AsyncIterator[None]:
            with self._observed(rpc, request_id, context):
                # Initial metadata: the caller has the id on success and on error alike.
                await context.send_initial_metadata(reply_metadata)
                yield

        return wrap_handler(handler, observed)


__all__ = ["STAGES", "ObservedCalls", "ServiceMetrics", "TimedMllm"]
