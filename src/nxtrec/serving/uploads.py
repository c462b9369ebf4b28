"""Request bodies -> images ready for the model, with the status code for each way an
upload can be bad (never a 500 for bad input).

Two body forms: multipart/form-data with one or more file parts (any field name), or a raw
image body (`Content-Type: image/...` or `application/octet-stream`). Decoding goes through
`nxtrec.model.image.load_image`, the loader `nxtrec predict` uses, so the pixel budget
(refused from the header, before decoding) and the error messages are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import python_multipart  # noqa: F401  (Starlette's form parser: missing, fail at start, not per request)
from starlette.datastructures import UploadFile
from starlette.requests import Request

from nxtrec.model.image import ImageError, load_image
from nxtrec.inference.engine import Engine

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


def decode(upload: Upload, engine: Engine, max_pixels: int | None = None) -> DecodedImage:
    """Decode and preprocess one upload (runs in a worker thread: it is CPU work)."""
    try:
        img = load_image(upload.data, max_pixels=max_pixels)
    except ImageError as e:
        raise RequestError(422, str(e).replace("<bytes>", upload.name, 1)) from None
    return DecodedImage(engine.preprocessing.array(img), img.width, img.height)
