"""Image loading and CLIP preprocessing with PIL + numpy (no torchvision).

`preprocess` reproduces torchvision's `Resize(size, BICUBIC)` + `CenterCrop(size)` +
`ToTensor()` + `Normalize(mean, std)` on PIL images exactly, which is what the released
model was trained with.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import re
import stat
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nxtrec.errors import NxtrecError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# The pixel budget: an image whose header declares more pixels than this is refused before
# any pixel is decoded (64 Mpx decodes to at most ~256 MB as RGBA). Override it with the
# environment variable below or the `max_pixels` argument of `load_image`. Pillow's own
# global limit is left untouched (changing it per call is not thread-safe); Pillow refuses by
# itself at twice its limit (~179 Mpx), so budgets above that need the caller to raise
# `PIL.Image.MAX_IMAGE_PIXELS` too.
MAX_IMAGE_PIXELS = 64_000_000
MAX_PIXELS_ENV = "NXTREC_MAX_IMAGE_PIXELS"
# The decode budget in bytes, also checked from the header: width x height x (the bytes a
# pixel of the decoded mode takes in Pillow's memory + 4 for one RGB-sized copy: the RGB
# result, or the copy an EXIF rotation makes). Pillow stores "1", "L" and "P" in 1 byte a
# pixel, "I;16*" in 2 and every other mode (RGB, RGBA, LA, CMYK, I, F, ...) in 4, so a
# pixel costs 5 to 8 bytes; high bit-depth modes go to 8 bits in blocks of
# `_CHUNK_PIXELS`, which costs no more. The default, 64 Mpx x 8 bytes, lets every image
# within the pixel budget through: it bounds memory when the pixel budget is raised, and
# can be lowered ($NXTREC_MAX_IMAGE_BYTES, or `load_image(..., max_bytes=N)`).
MAX_IMAGE_BYTES = 8 * MAX_IMAGE_PIXELS
MAX_BYTES_ENV = "NXTREC_MAX_IMAGE_BYTES"
# EXIF orientation (phone photos are stored rotated) is applied unless this is "0"; the
# reference pipeline ignored it, so set it to 0 to reproduce published numbers exactly on
# datasets whose images carry orientation tags. An environment variable reaches every
# reader, data-loader workers included.
EXIF_ENV = "NXTREC_EXIF_ORIENTATION"
ImageInput = Union[str, os.PathLike, bytes, Image.Image]

# Pillow warns between its limit and twice it; such images are over our budget and refused
# with an ImageError anyway, so the warning would only repeat that.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FILE_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
               stat.S_ISSOCK: "a socket"}
_CHUNK_PIXELS = 1 << 20  # pixels converted at a time from high bit-depth modes (bounded temporaries)
_RGB_BYTES = 4  # Pillow keeps RGB in 4 bytes a pixel
# 16-bit grey -> 8 bits, rounded; a table lookup avoids any float copy of the whole image.
_U16_TO_U8 = np.clip(np.arange(65536, dtype=np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)


class ImageError(NxtrecError, ValueError):
    """An image that cannot be used; the message is one line naming the file."""


class PixelBudgetError(NxtrecError):
    """A bad $NXTREC_MAX_IMAGE_PIXELS or $NXTREC_MAX_IMAGE_BYTES: a usage error of the whole
    command (exit code 2), not an ImageError, so that no per-image loop records it as a failed
    image."""


def max_image_pixels() -> int:
    """The pixel budget in force: $NXTREC_MAX_IMAGE_PIXELS, else `MAX_IMAGE_PIXELS`."""
    return _positive_from_env(MAX_PIXELS_ENV, MAX_IMAGE_PIXELS, "pixels")


def max_image_bytes() -> int:
    """The decode budget in bytes: $NXTREC_MAX_IMAGE_BYTES, else `MAX_IMAGE_BYTES`."""
    return _positive_from_env(MAX_BYTES_ENV, MAX_IMAGE_BYTES, "bytes")


def _positive_from_env(name: str, default: int, unit: str) -> int:
    """$name as a positive whole number (`_` separators allowed), else `default`; any other
    value raises PixelBudgetError (one line)."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        budget = int(value.replace("_", ""))
    except ValueError:
        budget = 0
    if budget <= 0:
        raise PixelBudgetError(f"{name}={value!r}: expected a positive whole number of {unit} "
                               f"(e.g. {default}); correct or unset it")
    return budget


def bytes_per_pixel(mode: str) -> int:
    """The bytes a pixel of `mode` takes in Pillow's memory."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_bytes(mode: str, width: int, height: int) -> int:
    """What decoding an image of this header to RGB may hold at once (see MAX_IMAGE_BYTES)."""
    return width * height * (bytes_per_pixel(mode) + _RGB_BYTES)


_TRIM_ABOVE = 64_000_000  # decodes this large (decode_bytes) give their freed memory back at once


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def release_free_memory(cost: int) -> None:
    """After a decode of `cost` bytes (decode_bytes), hand the memory it freed back to the
    system. Pillow allocates images in 16 MB blocks, which glibc keeps for later in the
    arena of the thread that freed them; decodes on other threads (serve) would each keep
    their own, so a process would hold several images' worth without using them."""
    trim = _malloc_trim() if cost >= _TRIM_ABOVE else None
    if trim is not None:
        trim(0)


def header_decode_bytes(data: bytes) -> int:
    """`decode_bytes` of the image in `data`, from its header alone (nothing decoded); 0 when
    the header cannot be read (`load_image` then says why)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return decode_bytes(img.mode, *img.size)
    except Exception:  # noqa: BLE001 - any unreadable header: load_image reports it
        return 0


def exif_orientation_enabled() -> bool:
    return os.environ.get(EXIF_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _is_high_depth(img: Image.Image) -> bool:
    return img.mode.startswith("I;16") or img.mode in ("I", "F")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit or 32-bit grey -> 8-bit grey, rescaled instead of clipped at 255. Converted in
    blocks of rows (`_CHUNK_PIXELS`): no copy of the whole image besides the 1-byte result."""
    width, height = img.size
    if not img.mode.startswith("I;16"):  # mode I (int32) or F (float32)
        # the largest value, from Pillow without a copy: above 255 selects the 16-bit scale
        peak = 65535.0 if img.getextrema()[1] > 255 else 255.0
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        block = np.asarray(img.crop((0, top, width, min(height, top + rows))))
        if img.mode.startswith("I;16"):
            out[top : top + rows] = _U16_TO_U8[block]
        else:
            out[top : top + rows] = np.clip(block.astype(np.float64) / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if _is_high_depth(img):
        return _high_depth_to_l(img).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _decoded_to_rgb(img: Image.Image) -> Image.Image:
    """`_to_rgb` for an image `load_image` decoded itself: each source is closed (its memory
    freed) as soon as the next step exists, so at most the decoded image and one 4-byte copy
    are held at once (`decode_bytes`)."""
    if _is_high_depth(img):
        grey = _high_depth_to_l(img)
        img.close()
        img = grey
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        # straight to RGB (the colours RGBA would keep; its alpha was dropped anyway): no
        # RGBA copy held next to the palette image and the RGB result
        img.info.pop("transparency")
    rgb = img.convert("RGB")
    img.close()
    return rgb


def _check_path(name: str) -> None:
    """Refuse, with a one-line reason, what `open` would block on or fail at obscurely."""
    if _URL.match(name):
        raise ImageError(f"{name}: URLs are not fetched; download the image and pass the file")
    try:
        st = os.stat(name)
    except FileNotFoundError:
        broken = os.path.islink(name)
        raise ImageError(f"{name}: {'broken symbolic link' if broken else 'no such file'}") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ImageError(f"{name}: symbolic link loop") from None
        raise ImageError(f"{name}: cannot access ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        readable = os.access(name, os.R_OK | os.X_OK)
        raise ImageError(f"{name}: is a directory{'' if readable else ' that cannot be read (permission denied)'}")
    for is_kind, kind in _FILE_KINDS.items():
        if is_kind(st.st_mode):
            raise ImageError(f"{name}: is {kind}, not a regular file")
    if st.st_size == 0:
        raise ImageError(f"{name}: empty file (0 bytes), not an image")


def _open_within_budget(fp, name: str, budget: int, byte_budget: int | None = None) -> Image.Image:
    """Read the header, refuse more than `budget` pixels or `byte_budget` bytes to decode
    (`decode_bytes`), then decode."""
    img = Image.open(fp)
    w, h = img.size
    if w * h > budget:
        raise _too_large(name, f"{w}x{h} = {w * h / 1e6:.1f} Mpx", budget)
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image has zero size ({w}x{h})")
    cost = decode_bytes(img.mode, w, h)
    if byte_budget is not None and cost > byte_budget:
        raise ImageError(f"{name}: image too large to decode ({w}x{h} {img.mode} = {cost / 1e6:.1f} MB at "
                         f"{bytes_per_pixel(img.mode) + _RGB_BYTES} bytes a pixel; the limit is {byte_budget / 1e6:g} MB, "
                         f"set {MAX_BYTES_ENV} to change it)")
    img.load()
    return img


def _too_large(name: str, size: str, budget: int) -> ImageError:
    return ImageError(f"{name}: image too large ({size}; the limit is {budget / 1e6:g} Mpx, "
                      f"set {MAX_PIXELS_ENV} to change it)")


def load_image(source: ImageInput, *, max_pixels: int | None = None,
               exif_orientation: bool | None = None, max_bytes: int | None = None) -> Image.Image:
    """Open and fully decode an image as RGB, or raise `ImageError` with a one-line reason.

    `max_pixels` defaults to `max_image_pixels()`, `max_bytes` (the decode budget,
    `decode_bytes`) to `max_image_bytes()`; `exif_orientation` (rotate as the EXIF tag says)
    defaults to `exif_orientation_enabled()`."""
    if isinstance(source, Image.Image):
        _check_not_empty(source, "<PIL image>")
        return _to_rgb(source)
    budget = max_image_pixels() if max_pixels is None else max_pixels
    byte_budget = max_image_bytes() if max_bytes is None else max_bytes
    rotate = exif_orientation_enabled() if exif_orientation is None else exif_orientation
    name = "<bytes>" if isinstance(source, bytes) else os.fspath(source)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: empty (0 bytes), not an image")
    else:
        _check_path(name)
    try:
        with io.BytesIO(source) if isinstance(source, bytes) else open(name, "rb") as fp:
            img = _open_within_budget(fp, name, budget, byte_budget)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        # Pillow's own refusal (at twice its limit) comes from the header, before ours.
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(name, f"{int(pixels[1]) / 1e6:.1f} Mpx" if pixels else str(e), budget) from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image or an unsupported format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: cannot decode image ({e})") from None
    if rotate:
        _apply_exif_orientation(img, name)
    cost = decode_bytes(img.mode, *img.size)
    rgb = _decoded_to_rgb(img)
    release_free_memory(cost)  # the decoded image and its 8-bit copy
    return rgb


def _apply_exif_orientation(img: Image.Image, name: str) -> None:
    """Rotate `img` (ours, just decoded) in place: without a tag nothing is copied, where
    the default would copy the whole image (11 ms for a 6.7 Mpx photo)."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise ImageError(f"{name}: unreadable EXIF orientation ({e})") from None


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
    if w == h == size:
        return img
    if w < size or h < size:  # only reachable for degenerate 1-pixel-wide inputs
        img = img.resize((max(w, size), max(h, size)), Image.BICUBIC)
        w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


@functools.lru_cache(maxsize=8)
def _normalised_levels(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: `(level / 255 - mean) / std` of each 8-bit level per channel. It is
    computed with the same float32 operations as on a whole image, so looking pixels up in
    it gives bit-identical values, with one pass over the image instead of four."""
    levels = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
    return (levels - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


def _check_not_empty(img: Image.Image, name: str) -> None:
    """A 0xN image has no pixel to resize (it would divide by zero): refused as a bad image."""
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{name}: image has zero size ({img.width}x{img.height})")


def preprocess_array(
    img: Image.Image, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD, out: np.ndarray | None = None
) -> np.ndarray:
    """RGB PIL image -> float32 array [3, size, size], CLIP-normalised; written into `out`
    when given (a batch loader fills its batch in place)."""
    _check_not_empty(img, "<PIL image>")
    rgb = np.asarray(center_crop(resize_shorter_side(_to_rgb(img), size), size))
    levels = _normalised_levels(tuple(mean), tuple(std))
    if out is None:
        out = np.empty((3, size, size), dtype=np.float32)
    for c in range(3):  # indices as intp up front: np.take would convert them more slowly
        np.take(levels[c], rgb[:, :, c].astype(np.intp), out=out[c])
    return out


def preprocess(img: Image.Image, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD):
    """RGB PIL image -> torch.FloatTensor [3, size, size], CLIP-normalised."""
    import torch

    return torch.from_numpy(preprocess_array(img, size, mean, std))


def list_images(paths, strict: bool = False) -> list[str]:
    """Expand folder arguments to the images inside them (sorted); keep other arguments as
    given. Nothing is dropped silently: an unreadable sub-folder, and an entry with an image
    extension that is not a regular file (FIFO, broken link, link loop), stay in the list so
    that `load_image` reports them.

    strict (a command's own arguments): an argument that does not exist (a mistyped folder or
    file name; URLs excepted, which fail as images) is a usage error (`NxtrecError`, exit code
    2) before any model loads, instead of an image that fails."""
    out: list[str] = []
    for p in paths:
        name = os.fspath(p)
        if os.path.isdir(name):
            out += _images_in_folder(str(Path(name)))
        elif strict and not (os.path.lexists(name) or _URL.match(name)):
            raise NxtrecError(f"{name}: no such file or folder")
        else:
            out.append(name)
    return out


def _images_in_folder(folder: str) -> list[str]:
    found: list[str] = []
    # os.walk reports unreadable folders through onerror (Path.rglob skips them silently);
    # symbolic links to folders are not followed, as before.
    for root, _, files in os.walk(folder, onerror=lambda e: found.append(e.filename)):  # noqa: B023
        found += [os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)
