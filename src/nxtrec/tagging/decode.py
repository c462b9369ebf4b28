"""Reading, decoding and preprocessing one input (torch-free: the ONNX path uses it too).
Runs in loader worker processes; a bad input becomes an error message, never an exception."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from nxtrec.inference.engine import Preprocessing
from nxtrec.model.image import ImageError, ImageInput, load_image
from nxtrec.tagging.inputs import TarMember


@dataclass
class Decoded:
    index: int  # position in the input list
    width: int = 0
    height: int = 0
    error: str | None = None  # why the image failed; None when its pixels were written


def _read_member(member: TarMember) -> bytes:
    with open(member.tar, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise ImageError(f"{member.tar}: truncated tar member")
    return data


def decode(index: int, name: str, source: ImageInput | TarMember | None, prep: Preprocessing, out: np.ndarray) -> Decoded:
    """Decode and preprocess one image into `out` [3, S, S]; `name` (its id) names it in
    error messages."""
    try:
        if source is None:
            raise ImageError("no image in this sample")
        img = load_image(_read_member(source) if isinstance(source, TarMember) else source)
        prep.array(img, out=out)
    except Exception as e:  # noqa: BLE001 - one odd file must not stop a job over millions
        reason = str(e).removeprefix("<bytes>: ") if isinstance(e, (ImageError, OSError)) else f"{type(e).__name__}: {e}"
        return Decoded(index, error=reason if reason.startswith(name) else f"{name}: {reason}")
    return Decoded(index, img.width, img.height)


def image_name(source, index: int) -> str:
    """An image's id in results: its path, or its position for bytes and PIL images."""
    return str(source) if isinstance(source, (str, os.PathLike)) else str(index)
