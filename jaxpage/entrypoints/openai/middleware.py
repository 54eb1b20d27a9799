"""Pure ASGI middleware (it sees every route, unknown ones included): the body-size cap, the
API key, and response counts for ``/metrics``."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.exceptions import HTTPException

from jaxpage.entrypoints.openai.errors import http_error
from jaxpage.entrypoints.openai.metrics import ServerMetrics


def body_limit_middleware(app: Callable, max_bytes: int) -> Callable:
    """413 for a body over ``max_bytes``: by its Content-Length, or counted as it arrives."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        too_large = http_error(413, f"the request body exceeds {max_bytes} bytes.",
                                "request_too_large")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return await too_large(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:  # FastAPI passes an HTTPException through its parser
                    raise HTTPException(413, f"the request body exceeds {max_bytes} bytes.")
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, counted_receive, tracked_send)
        except HTTPException as e:  # raised outside a route (FastAPI renders it inside)
            if e.status_code != 413 or started:
                raise
            await too_large(scope, receive, send)

    return middleware


def api_key_middleware(app: Callable, api_key: str) -> Callable:
    """401 unless ``Authorization: Bearer <api_key>`` (constant-time compare); not on /health."""
    expected = f"Bearer {api_key}".encode()

    async def middleware(scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            got = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(got, expected):
                response = http_error(401, "missing or invalid API key.", "invalid_api_key")
                return await response(scope, receive, send)
        return await app(scope, receive, send)

    return middleware


def count_middleware(app: Callable, metrics: ServerMetrics, routes: set[str]) -> Callable:
    """Counts responses by route and status for ``/metrics`` (unknown paths as "other")."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        route = scope["path"] if scope["path"] in routes else "other"

        async def counted_send(message):
            if message["type"] == "http.response.start":
                metrics.count(route, message["status"])
            await send(message)

        await app(scope, receive, counted_send)

    return middleware
