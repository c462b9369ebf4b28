import io

import numpy as np
import pytest
from PIL import Image

from nxtrec.errors import NxtrecError
from nxtrec.model.image import (
    ImageError,
    center_crop,
    list_images,
    load_image,
    preprocess_array,
    resize_shorter_side,
)


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_preprocess_follows_clip_resize_crop_normalise():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))
    out = preprocess_array(img, 224)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    # torchvision's rules: shorter side -> 224, longer int(224 * 451 / 300) = 336; crop offsets rounded
    resized = img.resize((336, 224), Image.BICUBIC)
    left = int(round((336 - 224) / 2.0))
    crop = np.asarray(resized.crop((left, 0, left + 224, 224)), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    np.testing.assert_array_equal(out, ((crop - mean) / std).transpose(2, 0, 1))
    into = np.full((3, 224, 224), np.nan, dtype=np.float32)  # a batch loader's slot
    assert preprocess_array(img, 224, out=into) is into
    np.testing.assert_array_equal(into, out)
    assert resize_shorter_side(Image.new("RGB", (224, 500)), 224).size == (224, 500)
    assert center_crop(Image.new("RGB", (3, 500)), 224).size == (224, 224)


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "LA", "L", "P", "I;16", "1"])
def test_odd_modes_become_rgb(mode, tmp_path):
    arr = np.random.default_rng(1).integers(0, 255, (40, 50), dtype=np.uint8)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257)
        assert img.mode == "I;16"
        path = tmp_path / "x.png"
        img.save(path)
        out = load_image(path)
        # 16-bit values are rescaled, not clipped to white
        assert np.abs(np.asarray(out)[..., 0].astype(int) - arr).max() <= 1
    else:
        img = Image.fromarray(arr).convert(mode)
        if mode == "P":
            img.info["transparency"] = 0
        ext = "jpg" if mode == "CMYK" else "png"
        path = tmp_path / f"x.{ext}"
        img.save(path)
        out = load_image(path)
    assert out.mode == "RGB" and out.size == (50, 40)
    assert preprocess_array(out, 32).shape == (3, 32, 32)


def test_bad_files_give_one_line_errors(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    good = _png_bytes(Image.new("RGB", (64, 64), (10, 200, 30)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    for path, reason in [(empty, "not an image"), (text, "not an image"), (truncated, "cannot decode"),
                         (tmp_path / "missing.jpg", "no such file"), (tmp_path, "is a directory")]:
        with pytest.raises(ImageError) as e:
            load_image(path)
        assert str(path) in str(e.value) and reason in str(e.value) and "\n" not in str(e.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # A real 20000 x 20000 PNG header (1-bit, so the file stays small).
    img = Image.new("1", (20000, 20000))
    path = tmp_path / "bomb.png"
    img.save(path, optimize=False)
    with pytest.raises(ImageError, match="too large"):
        load_image(path)


def test_list_images_expands_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.PNG", "sub/c.webp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    assert list_images([tmp_path, "other.jpg"]) == [str(tmp_path / "a.PNG"), str(tmp_path / "b.jpg"), str(tmp_path / "sub/c.webp"), "other.jpg"]


def test_sixteen_bit_modes_match_the_float_formula_without_float_copies():
    arr = np.arange(0, 65536, 7, dtype=np.uint16)[: 96 * 96].reshape(96, 96)
    out = np.asarray(load_image(Image.fromarray(arr)))[..., 0]
    expected = np.clip(arr.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    ints = Image.fromarray(arr.astype(np.int32) - 100)  # mode I, with negatives clipped to 0
    expected_i = np.clip((arr.astype(np.float64) - 100) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(ints))[..., 0], expected_i)


def test_pixel_budget_is_read_from_the_header_and_configurable(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("1", (3000, 2000)).save(path)  # 6 Mpx
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError, match=r"3000x2000 = 6.0 Mpx; the limit is 5 Mpx"):
        load_image(path, max_pixels=5_000_000)
    monkeypatch.setenv("NXTREC_MAX_IMAGE_PIXELS", "5_000_000")
    with pytest.raises(ImageError, match="too large"):
        load_image(path)
    assert load_image(path, max_pixels=6_000_000).size == (3000, 2000)
    monkeypatch.setenv("NXTREC_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(NxtrecError, match="NXTREC_MAX_IMAGE_PIXELS"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == before  # Pillow's global limit is never touched


def _rotated_jpeg(path):
    """A 40x20 image whose EXIF says 'rotate 90 degrees clockwise to display' (orientation 6)."""
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    img.paste((20, 20, 220), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied_unless_switched_off(tmp_path, monkeypatch):
    path = tmp_path / "phone.jpg"
    _rotated_jpeg(path)
    upright = load_image(path)
    assert upright.size == (20, 40)
    assert np.asarray(upright)[2, 10, 2] > 150  # the blue band is now on top
    assert load_image(path, exif_orientation=False).size == (40, 20)
    monkeypatch.setenv("NXTREC_EXIF_ORIENTATION", "0")
    assert load_image(path).size == (40, 20)


def test_special_files_and_arguments_get_one_line_reasons(tmp_path):
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    broken = tmp_path / "broken.jpg"
    os.symlink(tmp_path / "gone.jpg", broken)
    cases = [(fifo, "is a FIFO"), (loop, "symbolic link loop"), (broken, "broken symbolic link"),
             ("/dev/null", "is a character device"), ("https://example.com/cat.jpg", "URLs are not fetched"),
             (b"", "empty")]
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.png"
        locked.write_bytes(_png_bytes(Image.new("RGB", (4, 4))))
        locked.chmod(0)
        cases.append((locked, "permission denied"))
    for source, reason in cases:
        with pytest.raises(ImageError) as e:
            load_image(source)
        assert reason in str(e.value) and "\n" not in str(e.value)
    # Inside a folder, the odd entries are listed (to be reported), not dropped silently.
    listed = list_images([tmp_path])
    assert {str(fifo), str(loop), str(broken)} <= set(listed)
    assert list_images(["https://example.com/cat.jpg"]) == ["https://example.com/cat.jpg"]


def test_decode_budget_counts_bytes_from_the_header(tmp_path, monkeypatch):
    """A pixel costs the bytes of its decoded mode in Pillow (1 for L, 2 for I;16, 4 for F,
    RGB, RGBA) plus 4 for the RGB result: a float image is refused where an 8-bit grey one
    of the same size passes, from its header, before any pixel is decoded."""
    from PIL import ImageFile

    from nxtrec.model.image import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, decode_bytes

    floats, grey = tmp_path / "float.tif", tmp_path / "grey.png"
    Image.new("F", (100, 100), 1000.0).save(floats, compression="tiff_adobe_deflate")  # 100*100*(4+4) = 80 kB
    Image.new("L", (100, 100), 7).save(grey)  # 100*100*(1+4) = 50 kB
    assert decode_bytes("F", 100, 100) == 80_000 and decode_bytes("L", 100, 100) == 50_000
    assert decode_bytes("I;16", 10, 10) == 600 and decode_bytes("RGB", 10, 10) == 800
    # every 8-bit image within the pixel budget fits the default byte budget (8 bytes a pixel at most)
    assert decode_bytes("RGBA", MAX_IMAGE_PIXELS, 1) == decode_bytes("CMYK", MAX_IMAGE_PIXELS, 1) == MAX_IMAGE_BYTES
    assert load_image(grey, max_bytes=60_000).size == (100, 100)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded before the check"))
    with pytest.raises(ImageError) as e:
        load_image(floats, max_bytes=60_000)
    assert str(e.value) == (f"{floats}: image too large to decode (100x100 F = 0.1 MB at 8 bytes a pixel; "
                            "the limit is 0.06 MB, set NXTREC_MAX_IMAGE_BYTES to change it)")
    monkeypatch.setenv("NXTREC_MAX_IMAGE_BYTES", "60_000")
    with pytest.raises(ImageError, match="too large to decode"):
        load_image(floats.read_bytes())
    monkeypatch.undo()
    assert np.asarray(load_image(floats))[0, 0, 0] == 4  # 1000 of 65535 -> 3.9, rescaled
    for bad in ("abc", "0", "-5", "1.5"):
        monkeypatch.setenv("NXTREC_MAX_IMAGE_BYTES", bad)
        with pytest.raises(NxtrecError) as e:
            load_image(grey)
        assert not isinstance(e.value, ImageError)  # the command's usage error, not a failed image
        assert str(e.value).startswith(f"NXTREC_MAX_IMAGE_BYTES={bad!r}: expected a positive whole number of bytes")


@pytest.mark.parametrize("mode", ["F", "I", "I;16"])
def test_high_depth_images_are_converted_without_a_whole_image_copy(mode, tmp_path, monkeypatch):
    """numpy's allocations (traced) while a high bit-depth image becomes RGB: the 8-bit
    result and one block of rows, never a copy of the whole image at its own depth."""
    import tracemalloc

    from nxtrec.model import image

    monkeypatch.setattr(image, "_CHUNK_PIXELS", 1 << 16, raising=False)
    w, h = 2000, 1500
    values = (np.arange(w * h, dtype=np.int64).reshape(h, w) % 60000)
    src = Image.fromarray(values.astype({"F": np.float32, "I": np.int32, "I;16": np.uint16}[mode]))
    assert src.mode == mode
    path = tmp_path / "deep.tif"
    src.save(path)
    tracemalloc.start()
    try:
        out = load_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    expected = np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(out)[..., 1], expected)
    assert peak < 1.75 * w * h, f"{peak / 1e6:.1f} MB traced for a {w * h / 1e6:.1f} Mpx {mode} image"
