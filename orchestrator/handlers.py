"""Wrap a gRPC method handler of any of the four kinds in a per-call scope.

The server interceptors (metrics and request ids, draining, admission) each need "run this
around the whole call", whatever the call's shape: one helper, so a new kind of RPC
(SearchStream is the first unary-stream one) is covered by every interceptor at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

# Opened when the call starts, closed when it ends (also on error or cancellation). It gets
# the call's context and its request (None when the client streams its requests).
CallScope = Callable[[grpc.aio.ServicerContext, Any], AbstractAsyncContextManager[None]]


def wrap_handler(handler: grpc.RpcMethodHandler, scope: CallScope) -> grpc.RpcMethodHandler:
    """`handler` with every call run inside `scope(context, request)`."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def wrapped_unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context, request):
                return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(wrapped_unary_unary, **codec)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def wrapped_unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async with scope(context, request):
                async for response in unary_stream(request, context):
                    yield response

        return grpc.unary_stream_rpc_method_handler(wrapped_unary_stream, **codec)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def wrapped_stream_unary(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> Any:
            async with scope(context, None):
                return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(wrapped_stream_unary, **codec)
    if handler.stream_stream is not None:
        stream_stream = handler.stream_stream

        async def wrapped_stream_stream(
            requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async with scope(context, None):
                async for response in stream_stream(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(wrapped_stream_stream, **codec)
    return handler


__all__ = ["CallScope", "wrap_handler"]
