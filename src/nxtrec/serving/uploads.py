"""Request bodies -> images ready for the model, with the status code for each way an
upload can be bad (never a 500 for bad input).

Two body forms: multipart/form-data with one or more file parts (any field name), or a raw
image body (`Content-Type: image/...` or `application/octet-stream`). Decoding goes through
`nxtrec.model.image.load_image`, the loader `nxtrec predict` uses, so the pixel budget
(refused from the header, before decoding) and the error messages are the same.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import python_multipart  # noqa: F401  (Starlette's form parser: missing, fail at start, not per request)
from starlette.datastructures import UploadFile
from starlette.requests import Request

from nxtrec.model.image import ImageError, header_decode_bytes, load_image, max_image_bytes, release_free_memory
from nxtrec.inference.engine import Engine
from nxtrec.serving.middleware import answer_unless_started, send_error

# Declared content types taken as "maybe an image"; the bytes decide (422 if they are not).
# A missing type counts as unknown, not as wrong (curl --data-binary sends none useful).
GENERIC_TYPES = ("", "application/octet-stream", "application/x-www-form-urlencoded")


class RequestError(Exception):
    """A request answered with an error `status` and a one-line `detail` (a bad body or
    option; the app also uses it for 503/504)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Upload:
    name: str
    data: bytes


@dataclass
class DecodedImage:
    pixels: np.ndarray  # [3, S, S] float32, preprocessed for the engine
    width: int
    height: int


def _check_type(name: str, content_type: str | None) -> None:
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in GENERIC_TYPES and not kind.startswith("image/"):
        raise RequestError(415, f"{name}: content type {kind!r} is not an image (send image/* or application/octet-stream)")


async def read_uploads(request: Request, max_images: int) -> tuple[list[Upload], dict[str, str]]:
    """The uploaded files and the form's text fields (options may be sent as form fields)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _read_multipart(request, max_images)
    _check_type("request body", content_type)
    data = await request.body()
    if not data:
        raise RequestError(422, "no image in the request: send multipart/form-data files or a raw image body")
    return [Upload("request body", data)], {}


async def _read_multipart(request: Request, max_images: int) -> tuple[list[Upload], dict[str, str]]:
    # Starlette answers a malformed body or more than max_files parts with a 400 itself.
    form = await request.form(max_files=max_images, max_fields=100)
    try:
        uploads, fields = [], {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = value.filename or key
                _check_type(name, value.content_type)
                uploads.append(Upload(name, await value.read()))
            else:
                fields[key] = value
    finally:
        await form.close()
    if not uploads:
        raise RequestError(422, "no image in the request: add at least one file part to the multipart form")
    return uploads, fields


class DecodeBytes:
    """The decodes of one process hold at most one image's byte budget together
    (`max_image_bytes()`, what `load_image` lets one image take): a decode whose header says
    it needs more than what is left waits for the others to finish (at most --decode-threads
    wait: the app's limiter bounds them); alone, a decode always starts."""

    def __init__(self):
        self._cond = threading.Condition()
        self.held = 0

    @contextmanager
    def hold(self, cost: int):
        budget = max_image_bytes()
        if cost > budget:  # load_image refuses it from the header: nothing to wait for
            cost = 0
        with self._cond:
            self._cond.wait_for(lambda: self.held == 0 or self.held + cost <= budget)
            self.held += cost
        try:
            yield
        finally:
            with self._cond:
                self.held -= cost
                self._cond.notify_all()


DECODE_BYTES = DecodeBytes()


def decode(upload: Upload, engine: Engine, max_pixels: int | None = None) -> DecodedImage:
    """Decode and preprocess one upload (runs in a worker thread: it is CPU work), within
    the process's decode budget (`DECODE_BYTES`)."""
    cost = header_decode_bytes(upload.data)
    with DECODE_BYTES.hold(cost):
        try:
            img = load_image(upload.data, max_pixels=max_pixels)
        except ImageError as e:
            raise RequestError(422, str(e).replace("<bytes>", upload.name, 1)) from None
        decoded = DecodedImage(engine.preprocessing.array(img), img.width, img.height)
        del img  # freed, and given back, before the next decode starts
        release_free_memory(cost)
    return decoded


class _OverInflight(Exception):
    pass


class InflightBytes:
    """Bounds the sum of the request bodies in flight (being received, decoded or waiting
    for their labels) to `max_bytes`: a request that would pass it gets 503 with
    Retry-After, from its Content-Length before any byte is read, or as soon as a streamed
    body passes it. Nothing waits in a queue for room. A request alone is always let in
    (its body is bounded by the upload limit, 413), so a limit below --max-upload-mb
    cannot lock a large upload out. Pure ASGI: single-threaded on the event loop, so the
    counter needs no lock."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes
        self.in_flight = 0  # bytes reserved by the requests being served
        self.requests = 0

    def _message(self) -> str:
        mb = self.max_bytes / (1024 * 1024)
        return (f"server busy: uploads in flight would pass {mb:g} MB (--max-inflight-mb); "
                "retry shortly")

    def _fits(self, more: int) -> bool:
        return self.requests == 1 or self.in_flight + more <= self.max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                text = value.decode("latin-1")
                length = int(text) if text.isdigit() else None
        self.requests += 1
        reserved = 0
        try:
            if length:
                if not self._fits(length):
                    await send_error(send, 503, self._message(), {"Retry-After": "1"})
                    return
                reserved = length
                self.in_flight += reserved

            async def receive_counted():
                nonlocal reserved
                message = await receive()
                if message["type"] == "http.request":
                    received = len(message.get("body", b""))
                    if length is None and received:  # a streamed body: reserve as it comes
                        if not self._fits(received):
                            raise _OverInflight
                        reserved += received
                        self.in_flight += received
                return message

            await answer_unless_started(self.app, scope, receive_counted, send, _OverInflight,
                                        lambda e: (503, self._message(), {"Retry-After": "1"}))  # fmt: skip
        finally:
            self.requests -= 1
            self.in_flight -= reserved
