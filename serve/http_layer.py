"""What wraps the app's routes, as vLLM's server has it: CORS (Starlette's middleware, with
--allowed-origins and the rest; vLLM's defaults allow any origin) and --root-path (the prefix
a reverse proxy serves the server under, set as the ASGI root_path the way FastAPI's root_path
sets it: a request is routed with or without the prefix), --enable-request-id-headers, and
the HTTP series vLLM's server exports (HttpMetrics)."""

from __future__ import annotations

import time
import uuid

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match


class RootPath:
    """Sets scope["root_path"] on HTTP requests; Starlette's router then strips it from a path
    that starts with it (a proxy that forwards the full path) and routes other paths as they are."""

    def __init__(self, app, root_path: str) -> None:
        self.app, self.root_path = app, root_path

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scope = dict(scope, root_path=self.root_path)
        await self.app(scope, receive, send)


SCOPE_KEY = "fastserve.request_id"      # the id RequestIdHeader sends back (bytes), for the 500 handler


def header_value(headers, name: bytes) -> bytes | None:
    """The first non-empty value of header `name` (lower case) among ASGI `headers`, or None."""
    return next((v for k, v in headers if k == name and v), None)


class RequestIdHeader:
    """--enable-request-id-headers (vLLM's): every HTTP response carries X-Request-Id, the
    request's own (its first non-empty one) or a new one; streamed responses, CORS preflights
    (this middleware is outside CORS's) and 404s too. An internal error's 500 is sent by
    Starlette outside every middleware: app._unexpected adds the header from SCOPE_KEY."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = scope[SCOPE_KEY] = header_value(scope["headers"], b"x-request-id") or uuid.uuid4().hex.encode()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"x-request-id", rid)])
            await send(message)
        await self.app(scope, receive, send_with_id)


# the routes vLLM's instrumentator leaves out of the HTTP series (probes and scrapes)
UNCOUNTED = frozenset({"/metrics", "/health", "/ping", "/version"})


class HttpMetrics:
    """vLLM's http_requests_total{handler, method, status} and http_request_duration_seconds
    {handler, method} (prometheus-fastapi-instrumentator's, which vLLM's dashboards read for
    their 5xx ratio and per-endpoint panels): the handler is the route's path template
    ("none" for a path no route has), the status its class ("5xx"), the duration until the
    response's last byte (a stream's too). Innermost, so --root-path is already applied."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        app = scope.get("app")
        metrics = getattr(getattr(getattr(app, "state", None), "server", None), "metrics", None)
        if scope["type"] != "http" or metrics is None:       # an app of the routes alone (tests)
            return await self.app(scope, receive, send)
        handler = next((r.path for r in app.routes if r.matches(scope)[0] == Match.FULL), "none")
        if handler in UNCOUNTED:
            return await self.app(scope, receive, send)
        status, t0 = [500], time.perf_counter()     # 500: an exception, answered outside every middleware

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            metrics.http(handler, scope["method"], status[0], time.perf_counter() - t0)


def middleware(cfg) -> list[Middleware]:
    """For app.ServerConfig `cfg` (its cors_* fields, root_path and request_id_headers); the
    first is the outermost."""
    out = [Middleware(RequestIdHeader)] if cfg.request_id_headers else []
    out.append(Middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=list(cfg.cors_methods),
                          allow_headers=list(cfg.cors_headers), allow_credentials=cfg.cors_credentials))
    if cfg.root_path:
        out.append(Middleware(RootPath, root_path=cfg.root_path))
    out.append(Middleware(HttpMetrics))
    return out
