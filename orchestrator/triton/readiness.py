"""What every Triton client of the service shares: its gRPC channel settings and the check
that the models it needs are ready (at start, and by the service's health monitor)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import tritonclient.grpc.aio as triton
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
from tritonclient.utils import InferenceServerException

# After Triton restarts, the channel reconnects within about a second: gRPC's default backoff
# grows to two minutes, and calls fail fast (UNAVAILABLE) for as long as it waits.
RECONNECT_BACKOFF_MS = 250
MAX_RECONNECT_BACKOFF_MS = 1000
CHECK_TIMEOUT_S = 2.0  # one readiness probe; a wedged server must not stall the caller


def channel_args() -> list[tuple[str, Any]]:
    """tritonclient's own defaults (message sizes, keepalive) plus a short reconnect backoff."""
    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def client(url: str) -> triton.InferenceServerClient:
    """An asyncio Triton client with the service's channel settings."""
    return triton.InferenceServerClient(url, channel_args=channel_args())


async def models_ready(
    client: triton.InferenceServerClient,
    models: Sequence[str],
    timeout_s: float = CHECK_TIMEOUT_S,
) -> bool:
    """Whether Triton answers that every one of `models` is ready (False when unreachable)."""
    try:
        for model in models:
            if not await client.is_model_ready(model, client_timeout=timeout_s):
                return False
    except InferenceServerException:
        return False
    return True


async def wait_until_ready(
    client: triton.InferenceServerClient,
    models: Sequence[str],
    timeout_s: float,
    poll_s: float = 0.2,
) -> bool:
    """Poll until every one of `models` is ready; False when `timeout_s` passes first (one
    probe is always made, so a timeout of 0 asks once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if await models_ready(client, models):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))


__all__ = ["channel_args", "client", "models_ready", "wait_until_ready"]
