"""Pure ASGI middleware around the app: request metrics, the API key (401) and the body
size limit (413). Pure ASGI (not Starlette's BaseHTTPMiddleware) so that the body is
streamed through, never buffered, and client disconnects reach the endpoint."""

from __future__ import annotations

import hmac
import json
import time

from nxtrec.serving.metrics import Metrics


async def send_error(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error response, `{"detail": ...}` like FastAPI's own errors."""
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequestMetrics:
    """Counts every response by path and status and times it. Paths outside `known_paths`
    are counted as "other" (a scanner must not create unbounded label values)."""

    def __init__(self, app, metrics: Metrics, known_paths: set[str]):
        self.app, self.metrics, self.known_paths = app, metrics, known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # what the server answers if the app raises before responding

        async def send_tracking_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_status)
        finally:
            path = scope["path"] if scope["path"] in self.known_paths else "other"
            self.metrics.observe_request(path, status, time.perf_counter() - start)


class ApiKey:
    """`Authorization: Bearer KEY` on every path except the public ones (the health check and
    the static files of the page, which hold no data and cannot carry a header when a
    browser navigates to them; the page sends the key with its API calls)."""

    def __init__(self, app, key: str, public_paths: set[str], public_prefixes: tuple[str, ...] = ()):
        self.app = app
        self.expected = f"Bearer {key}".encode()
        self.public_paths, self.public_prefixes = public_paths, public_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.public_paths or scope["path"].startswith(self.public_prefixes):
            return await self.app(scope, receive, send)
        given = (_header(scope, b"authorization") or "").encode("latin-1")
        if not hmac.compare_digest(given, self.expected):
            await send_error(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413: at once from Content-Length, or as
    soon as a streamed (chunked) body passes the limit."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"request body larger than the upload limit ({self.max_bytes} bytes; see --max-upload-mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await send_error(send, 413, self._message())
            return
        received = 0
        started = False

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def send_tracking_start(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive_limited, send_tracking_start)
        except BodyTooLarge:
            if started:
                raise
            await send_error(send, 413, self._message())
