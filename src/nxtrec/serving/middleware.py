"""Pure ASGI middleware around the app: request metrics (a client that disconnects is a 499
and one log line), the API key (401), the body-read deadline (408, or 503 once the server
shuts down) and the body size limit (413). Pure ASGI (not Starlette's BaseHTTPMiddleware) so
that the body is streamed through, never buffered, and client disconnects reach the endpoint."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from starlette.requests import ClientDisconnect

from nxtrec.serving.metrics import Metrics

log = logging.getLogger("uvicorn.error")  # uvicorn's log (stderr), as its own messages
CLIENT_CLOSED = 499  # nginx's code for "client closed the request": counted, never sent


async def send_error(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error response, `{"detail": ...}` like FastAPI's own errors."""
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


async def answer_unless_started(app, scope, receive, send, error: type[Exception], answer) -> None:
    """Run `app`; when it raises `error` (a body limit hit while it read the request) before
    its response started, send `answer(e)` = (status, detail, headers) instead."""
    started = False

    async def send_tracking_start(message):
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, receive, send_tracking_start)
    except error as e:
        if started:
            raise
        await send_error(send, *answer(e))


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
        except ClientDisconnect:
            # The client went away before its request was complete (mid-upload): nobody to
            # answer, nothing wrong with the server. One line, no traceback, no 500.
            status = CLIENT_CLOSED
        finally:
            path = scope["path"] if scope["path"] in self.known_paths else "other"
            self.metrics.observe_request(path, status, time.perf_counter() - start)
            if status == CLIENT_CLOSED:
                client = scope.get("client") or ("-", 0)
                log.warning('%s:%s - "%s %s" %d client disconnected before the answer', client[0], client[1],
                            scope["method"], path, CLIENT_CLOSED)


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

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        await answer_unless_started(self.app, scope, receive_limited, send, BodyTooLarge,
                                    lambda e: (413, self._message(), None))  # fmt: skip


class Shutdown:
    """Set (from a signal handler) when the server begins to shut down: uploads still being
    received get `grace` seconds more, then 503, so that they do not hold the shutdown."""

    def __init__(self, grace: float = 1.0):
        self.grace = grace
        self.since: float | None = None  # time.monotonic() of the signal

    def begin(self) -> None:
        if self.since is None:
            self.since = time.monotonic()


class BodyTimeout:
    """The whole request body must arrive within `timeout_s` seconds of the request head
    (408 beyond, and the connection is closed): a client sending slowly, or not at all, cannot
    hold a connection and a request slot for ever. Once the body is in, `receive` passes
    through untouched (the endpoint waits on it for a disconnect)."""

    POLL_S = 0.2  # how often a waiting read looks at the shutdown flag

    def __init__(self, app, timeout_s: float, shutdown: Shutdown | None = None):
        self.app, self.timeout_s, self.shutdown = app, timeout_s, shutdown or Shutdown()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.timeout_s
        body_done = False

        async def receive_with_deadline():
            nonlocal body_done
            if body_done:
                return await receive()
            reading = asyncio.ensure_future(receive())
            try:
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        raise _BodyNotReceived(408, f"request body not received within {self.timeout_s:g} s "
                                                    "(see --body-timeout)")
                    since = self.shutdown.since
                    if since is not None and now >= since + self.shutdown.grace:
                        raise _BodyNotReceived(503, "the server is shutting down; retry on another instance or later")
                    done, _ = await asyncio.wait({reading}, timeout=min(self.POLL_S, deadline - now))
                    if done:
                        message = reading.result()
                        body_done = message["type"] != "http.request" or not message.get("more_body", False)
                        return message
            finally:
                if not reading.done():
                    reading.cancel()

        await answer_unless_started(self.app, scope, receive_with_deadline, send, _BodyNotReceived,
                                    lambda e: (e.status, e.detail, {"Connection": "close"}))  # fmt: skip


class _BodyNotReceived(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail
