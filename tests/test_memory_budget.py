"""Memory bounded by the decoded size, not the file size (issue #33): a 0.4 MB deflate TIFF of
32-bit floats and a 0.1 MB 16-bit PNG, both just under the 64 Mpx budget, keep the peak RSS
of `nxtrec predict` under 1 GB (it was 1.1 GB for the TIFF before the conversion went by
blocks)."""

import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GOOD = str(ROOT / "examples" / "scene.jpg")
WIDTH, HEIGHT = 8000, 7999  # 63.99 Mpx: under the 64 Mpx budget


def grey16_png(path: Path, width: int, height: int) -> Path:
    """A 16-bit grey PNG of constant rows, compressed as it is written (KBs on disk)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" + b"\x9c\x40" * width  # filter byte, then 40000 in every pixel
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def near_budget(tmp_path_factory):
    d = tmp_path_factory.mktemp("near-budget")
    floats = d / "float32.tif"
    Image.new("F", (WIDTH, HEIGHT), 1234.5).save(floats, compression="tiff_adobe_deflate")
    grey16 = grey16_png(d / "grey16.png", WIDTH, HEIGHT)
    assert floats.stat().st_size < 1_000_000 and grey16.stat().st_size < 1_000_000
    assert Image.open(floats).mode == "F" and Image.open(grey16).mode == "I;16"
    return floats, grey16


def peak_rss_mb(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run nxtrec in a child process; its peak resident memory (ru_maxrss of the waited child,
    kilobytes on Linux)."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.stderr.write(p.stdout + p.stderr); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "nxtrec", *argv],
                          capture_output=True, text=True, timeout=300, check=False)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
    return proc, int(proc.stdout.strip()) / 1024


def test_near_budget_high_depth_images_keep_predict_under_1_gb(near_budget):
    floats, grey16 = near_budget
    proc, peak_mb = peak_rss_mb(["predict", str(floats), str(grey16), GOOD, "--top-k", "3"])
    assert proc.returncode == 0, proc.stderr
    assert str(floats) in proc.stderr and str(grey16) in proc.stderr and "0.62454  snake" in proc.stderr
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"


def test_a_lower_byte_budget_refuses_the_float_image_from_its_header(near_budget, monkeypatch):
    from nxtrec.model.image import ImageError, load_image

    floats, grey16 = near_budget
    # the float image needs 64 Mpx x (4 + 4) = 512 MB, the 16-bit one 64 Mpx x (2 + 4) = 384 MB
    monkeypatch.setenv("NXTREC_MAX_IMAGE_BYTES", "300_000_000")
    for path, mode, cost, per_pixel in ((floats, "F", 511.9, 8), (grey16, "I;16", 384.0, 6)):
        with pytest.raises(ImageError) as e:
            load_image(path)
        assert str(e.value) == (f"{path}: image too large to decode (8000x7999 {mode} = {cost} MB at {per_pixel} bytes "
                                "a pixel; the limit is 300 MB, set NXTREC_MAX_IMAGE_BYTES to change it)")


def test_memory_of_a_large_decode_is_given_back_whichever_thread_decoded(tmp_path):
    """serve decodes uploads on a pool of threads: each large decode gives its freed memory back, so
    that the process does not keep one image's worth per thread (glibc keeps freed blocks in
    the arena of the thread that freed them)."""
    path = tmp_path / "float.tif"
    Image.new("F", (6000, 6000), 300.0).save(path, compression="tiff_adobe_deflate")  # 36 Mpx
    code = f"""
import threading
from nxtrec.inference.engine import Preprocessing
from nxtrec.serving.uploads import Upload, decode as decode_upload
class Engine:
    preprocessing = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
upload = Upload("float.tif", open({str(path)!r}, "rb").read())
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) // 1024
def decode():
    assert decode_upload(upload, Engine()).width == 6000
base = rss()
after = []
for _ in range(3):
    t = threading.Thread(target=decode)
    t.start()
    t.join()
    after.append(rss() - base)
print(max(after))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) < 120, f"{proc.stdout.strip()} MB still held after the decodes"  # was 250
