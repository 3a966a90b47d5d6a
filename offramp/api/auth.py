"""API key check for every route but health, and the refusal to bind publicly without one.

The key comes from ``Authorization: Bearer <key>`` or ``x-api-key: <key>`` and is compared
in constant time. The check is a pure ASGI middleware (not Starlette's BaseHTTPMiddleware)
so streaming responses and client-disconnect signals pass through untouched; it runs
before the body is read, so an unauthenticated client cannot make the server buffer a body.
"""
from __future__ import annotations

import hmac
import ipaddress
import json

from offramp.errors import ConfigError

OPEN_PATHS = frozenset({"/healthz", "/-/healthz", "/health"})


def check_bind(host: str, api_key: str | None, key_env: str = "OFFRAMP_API_KEY", what: str | None = None) -> None:
    """Refuse a non-loopback bind without an API key (raise ConfigError naming the fix)."""
    if api_key:
        return
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return
    except ValueError:
        pass  # a host name other than localhost: may resolve anywhere, treat as public
    raise ConfigError(
        f"refusing to serve {what or 'on ' + repr(host)} without an API key: set the environment variable "
        f"{key_env} to a secret key (clients send it as 'Authorization: Bearer <key>'), or "
        + ("drop grpc_options from the Serve config" if what else "bind 127.0.0.1")
    )


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a client sent, from raw ASGI headers (names are lower-case)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value.strip():
            return value.strip()
    return None


def key_matches(presented: bytes | None, expected: bytes) -> bool:
    # compare_digest runs in time independent of where the bytes differ.
    return presented is not None and hmac.compare_digest(presented, expected)


class ApiKeyMiddleware:
    """ASGI middleware: 401 OpenAI error unless the request carries the key."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if self.expected is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        key = presented_key(scope.get("headers", []))
        if key_matches(key, self.expected):
            return await self.app(scope, receive, send)
        message = ("Missing API key: send 'Authorization: Bearer <key>'" if key is None
                   else "Incorrect API key provided")
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                     "param": None, "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def check_exposure(http_host: str | None, grpc_on: bool | None, api_key: str | None,
                   key_env: str = "OFFRAMP_API_KEY") -> None:
    """The ingress's start-up check of the listeners Serve opened for it: HTTP on its
    configured host, and Serve's gRPC proxy, which binds every interface (``[::]:port``)
    whatever the HTTP host - so with gRPC on, a key is required even for a loopback HTTP
    bind. ``None``: not readable (left to the operator)."""
    if http_host is not None:
        check_bind(http_host, api_key, key_env)
    if grpc_on:
        check_bind("::", api_key, key_env, what="Serve's gRPC proxy (it binds every interface)")
