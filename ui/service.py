"""The console's link to the service: one cached client per settings, calls that turn gRPC
errors into messages an operator can act on, health and metrics for the Status page."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import streamlit as st
from grpc_health.v1 import health_pb2, health_pb2_grpc

from icl_api import PersonSearchClient
from icl_console.settings import ConsoleSettings

T = TypeVar("T")

# What an operator should read for each status code; the service's own message follows.
_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "The search service is not reachable or not ready",
    grpc.StatusCode.UNAUTHENTICATED: "The service refused the console's token",
    grpc.StatusCode.PERMISSION_DENIED: "The console's token is not allowed to do this",
    grpc.StatusCode.INVALID_ARGUMENT: "The service rejected the request",
    grpc.StatusCode.NOT_FOUND: "Not found",
    grpc.StatusCode.FAILED_PRECONDITION: "Not possible for this request",
    grpc.StatusCode.DEADLINE_EXCEEDED: "The service did not answer in time",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "The service is busy; try again in a moment",
}


class ServiceError(Exception):
    """A failed call, worded for the operator."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def settings() -> ConsoleSettings:
    if "settings" not in st.session_state:
        try:
            st.session_state.settings = ConsoleSettings.from_env()
        except ValueError as exc:  # SettingsProblem: every problem, each naming its setting
            st.error(f"The console's settings are not valid: {exc}", icon=":material/error:")
            st.stop()
    settings: ConsoleSettings = st.session_state.settings
    return settings


@st.cache_resource(show_spinner=False)
def _client(settings: ConsoleSettings) -> PersonSearchClient:
    return PersonSearchClient(
        settings.address,
        tls=settings.tls_options(),
        token=settings.token,
        timeout_s=settings.timeout_s,
    )


def client() -> PersonSearchClient:
    return _client(settings())


@st.cache_data(show_spinner=False, max_entries=5000, ttl=3600)
def _crop(settings: ConsoleSettings, image_id: str) -> bytes | None:
    try:
        return _client(settings).get_image(image_id).image or None
    except grpc.RpcError:
        return None  # deleted meanwhile, or the service is down: the grid shows no picture


def crop(image_id: str) -> bytes | None:
    """A gallery image's crop (cached: crops never change under an id until it is deleted)."""
    return _crop(settings(), image_id)


def explain(exc: grpc.RpcError) -> ServiceError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    hint = _HINTS.get(code, "The call failed")
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = f"{hint} at {settings().address}"
    return ServiceError(code, f"{hint} ({code.name}: {details})")


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs), with a gRPC error raised as ServiceError."""
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as exc:
        raise explain(exc) from None


def show_error(error: ServiceError) -> None:
    st.error(str(error), icon=":material/error:")


def health(service: str = "") -> str:
    """SERVING / NOT_SERVING / UNKNOWN / SERVICE_UNKNOWN, or the reason it could not be asked."""
    try:
        reply = health_pb2_grpc.HealthStub(client().channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    except grpc.RpcError as exc:
        return f"unreachable ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def scrape_metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus /metrics page, keyed by (name, sorted labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
