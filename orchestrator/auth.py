"""Bearer-token authentication for the PersonSearch service, as a grpc.aio server interceptor.

The tokens file (`icl serve --tokens-file`, or ICL_TOKENS_FILE) maps a name to a token and its
permissions, in TOML (`.toml`) or JSON (any other suffix)::

    [tokens.camera-backend]            # {"tokens": {"camera-backend": {
    token = "long random string"       #    "token": "long random string",
    permissions = ["enroll"]           #    "permissions": ["enroll"]}}}

Permissions: `search` (Search, SearchStream and gallery browsing: ListImages, GetImage,
GetGalleryStats), `enroll` (Enroll and Delete), `admin` (every call). Clients send
`authorization: Bearer <token>` metadata. gRPC health and reflection need no token. A missing or
unknown token gets UNAUTHENTICATED, a known one without the permission PERMISSION_DENIED.
Tokens never reach a log line, an error message or a repr; only their names do.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

PERMISSIONS = ("search", "enroll", "admin")
MIN_TOKEN_CHARS = 16  # a guessable token is no authentication
# Calls anyone may make: probes and tooling must work without a token.
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the entry, never a token."""


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: its name and permissions (the token itself is not kept here)."""

    name: str
    permissions: frozenset[str]

    def may(self, needed: str) -> bool:
        return "admin" in self.permissions or needed in self.permissions


def _digest(token: str) -> bytes:
    # Compare fixed-length digests, so the comparison time does not even depend on the length.
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class TokenTable:
    """The configured tokens (as SHA-256 digests) and whom each belongs to."""

    entries: tuple[tuple[bytes, Principal], ...] = field(repr=False)

    def __repr__(self) -> str:
        return f"TokenTable({', '.join(p.name for _, p in self.entries)})"

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, token: str) -> Principal | None:
        """The principal of `token`, comparing against every configured token in constant time
        (no early exit, so timing tells nothing about which or whether one matched)."""
        presented = _digest(token)
        found: Principal | None = None
        for digest, principal in self.entries:
            if hmac.compare_digest(presented, digest):
                found = principal
        return found

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str) -> TokenTable:
        tokens = data.get("tokens") if isinstance(data, Mapping) else None
        if not isinstance(tokens, Mapping) or not tokens:
            raise TokensFileError(f"{where}: expected a non-empty `tokens` table of named tokens")
        entries: list[tuple[bytes, Principal]] = []
        seen: set[bytes] = set()
        for name, entry in tokens.items():
            at = f"{where}: tokens.{name}"
            if not isinstance(entry, Mapping):
                raise TokensFileError(f"{at}: expected a table with `token` and `permissions`")
            token = entry.get("token")
            if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
                raise TokensFileError(
                    f"{at}: `token` must be a string of at least {MIN_TOKEN_CHARS} characters"
                )
            if token != token.strip() or any(ch in token for ch in "\r\n\0"):
                raise TokensFileError(f"{at}: `token` has surrounding spaces or control characters")
            perms = entry.get("permissions")
            if (
                not isinstance(perms, list)
                or not perms
                or not all(isinstance(p, str) and p in PERMISSIONS for p in perms)
            ):
                raise TokensFileError(
                    f"{at}: `permissions` must be a non-empty list of {', '.join(PERMISSIONS)}"
                )
            digest = _digest(token)
            if digest in seen:
                raise TokensFileError(f"{at}: the same token is configured twice")
            seen.add(digest)
            entries.append((digest, Principal(str(name), frozenset(perms))))
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokensFileError(f"cannot read tokens file {path}: {exc.strerror}") from None
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            # The parser's message may quote the line (a token): give its position only.
            kind = "TOML" if path.suffix == ".toml" else "JSON"
            line = getattr(exc, "lineno", None)
            raise TokensFileError(
                f"{path}: not valid {kind}" + (f" (line {line})" if line else "")
            ) from None
        if path.stat().st_mode & 0o077:
            log.warning("tokens file %s is readable by group or others; chmod 600 it", path)
        return cls.from_mapping(data, str(path))


def needed_permission(method: str, service_name: str) -> str:
    """The permission a full method name needs (`admin` for anything not listed)."""
    prefix = f"/{service_name}/"
    if method in (
        f"{prefix}Search",
        f"{prefix}SearchStream",
        f"{prefix}ListImages",
        f"{prefix}GetImage",
        f"{prefix}GetGalleryStats",
    ):
        return "search"
    if method in (f"{prefix}Enroll", f"{prefix}Delete"):
        return "enroll"
    return "admin"


def bearer_token(metadata: Any) -> str | None:
    """The token of the `authorization: Bearer ...` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _denying_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `code`."""
    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises; the yield makes this a response stream

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny, **codec)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **codec)


class TokenAuth(grpc.aio.ServerInterceptor):
    """Checks the bearer token and its permission before any non-open call runs."""

    def __init__(self, tokens: TokenTable, service_name: str) -> None:
        self.tokens = tokens
        self.service_name = service_name

    def __repr__(self) -> str:
        return f"TokenAuth({self.tokens!r})"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler  # unknown methods get UNIMPLEMENTED as before
        token = bearer_token(details.invocation_metadata)
        principal = self.tokens.lookup(token) if token is not None else None
        if principal is None:
            why = "no bearer token" if token is None else "an unknown token"
            log.warning("UNAUTHENTICATED: call to %s with %s", method, why)
            return _denying_handler(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs a valid token in `authorization: Bearer <token>` metadata "
                f"(this call had {why})",
            )
        needed = needed_permission(method, self.service_name)
        if not principal.may(needed):
            log.warning(
                "PERMISSION_DENIED: token %r (%s) called %s, which needs %r",
                principal.name,
                ", ".join(sorted(principal.permissions)),
                method,
                needed,
            )
            return _denying_handler(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"token {principal.name!r} may not call {method}: it needs the {needed!r} "
                f"(or 'admin') permission",
            )
        return handler
