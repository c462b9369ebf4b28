"""Image loading and CLIP preprocessing with PIL + numpy (no torchvision).

`preprocess` reproduces torchvision's `Resize(size, BICUBIC)` + `CenterCrop(size)` +
`ToTensor()` + `Normalize(mean, std)` on PIL images exactly, which is what the released
model was trained with.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from nxtrec.errors import NxtrecError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Pillow's own decompression-bomb limit (2 x 89.5 Mpixels); bigger headers are refused
# before any pixel is decoded.
MAX_IMAGE_PIXELS = 2 * 89_478_485
ImageInput = Union[str, os.PathLike, bytes, Image.Image]


class ImageError(NxtrecError, ValueError):
    """An image that cannot be used; the message is one line naming the file."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit-depth grey: rescale to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(source: ImageInput) -> Image.Image:
    """Open and fully decode an image as RGB, or raise `ImageError` with a one-line reason."""
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            with fp:
                old_limit = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
                try:
                    img = Image.open(fp)
                    img.load()
                finally:
                    Image.MAX_IMAGE_PIXELS = old_limit
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: image too large ({e})") from None
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image or an unsupported format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from None
    return _to_rgb(img)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side equals `size` (torchvision's Resize(int) rule)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:  # only reachable for degenerate 1-pixel-wide inputs
        img = img.resize((max(w, size), max(h, size)), Image.BICUBIC)
        w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess_array(
    img: Image.Image, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD
) -> np.ndarray:
    """RGB PIL image -> float32 array [3, size, size], CLIP-normalised."""
    img = center_crop(resize_shorter_side(_to_rgb(img), size), size)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(img: Image.Image, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD):
    """RGB PIL image -> torch.FloatTensor [3, size, size], CLIP-normalised."""
    import torch

    return torch.from_numpy(preprocess_array(img, size, mean, std))


def list_images(paths) -> list[str]:
    """Expand folder arguments to the images inside them (sorted); keep files as given."""
    out: list[str] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(
                str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            )
        else:
            out.append(str(p))
    return out
