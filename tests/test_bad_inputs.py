"""The CLI on a table of bad inputs: each gets its exit code and a one-line reason, never a
traceback, and the good inputs given in the same call still produce their output. Plus the
memory bound: `predict` on pixel bombs stays under 1 GB of peak RSS."""

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from nxtrec.cli.main import main
from nxtrec.model.directory import default_model_dir

ROOT = Path(__file__).resolve().parents[1]
GOOD = str(ROOT / "examples" / "scene.jpg")


def write_png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, row_bytes: int,
              palette: bytes = b"") -> Path:
    """A valid PNG of zero-valued rows, compressed row by row: a huge image in a small file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + row_bytes)  # filter byte 0, then the row
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + (chunk(b"PLTE", palette) if palette else b"")
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """Bad files of every kind, made small."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.jpg").write_bytes(b"")
    (d / "text.png").write_text("not an image")
    os.mkfifo(d / "pipe.jpg")
    os.symlink(d / "loop.jpg", d / "loop.jpg")
    write_png(d / "grey16.png", 17000, 17000, 16, 0, 34000)  # 289 Mpx, 16-bit
    (d / "labels-string.jsonl").write_text(json.dumps({"image": 1, "labels": "dog", "gt": ["dog"]}) + "\n")
    (d / "gt-number.jsonl").write_text(json.dumps({"image": 1, "labels": ["dog"], "gt": 3}) + "\n")
    (d / "twice.jsonl").write_text("".join(json.dumps({"image": "a", "labels": ["x"], "gt": ["x"]}) + "\n"
                                           for _ in range(2)))
    (d / "empty.jsonl").write_text("\n")
    model = d / "empty-config-model"
    shutil.copytree(default_model_dir(), model)
    (model / "config.json").write_text("{}")
    (d / "a-file").write_text("x")
    return d


# (arguments, exit code, the message, whether GOOD's labels must be printed)
PREDICT_SKIPS = [
    (["https://example.com/cat.jpg"], "URLs are not fetched"),
    (["{bad}/empty.jpg"], "empty file (0 bytes)"),
    (["{bad}/text.png"], "not an image"),
    (["{bad}/pipe.jpg"], "is a FIFO, not a regular file"),
    (["{bad}/loop.jpg"], "symbolic link loop"),
    (["/dev/null"], "is a character device"),
    (["{bad}/grey16.png"], "image too large (289.0 Mpx; the limit is 64 Mpx"),
]
USAGE_ERRORS = [
    (["predict", GOOD, "--top-k", "0"], "argument --top-k: must be an integer >= 1, got 0"),
    (["predict", GOOD, "--top-k", "-1"], "argument --top-k: must be an integer >= 1, got -1"),
    (["predict", GOOD, "--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["predict", GOOD, "--top-p", "1.5"], "argument --top-p: must be a number in (0, 1]"),
    (["predict", GOOD, "--temperature", "nan"], "argument --temperature: must be a finite number > 0"),
    (["predict", GOOD, "--device", "gpu"], "argument --device: must be cpu, cuda, cuda:N or mps"),
    (["predict", GOOD, "--top-k", "5000"], "--top-k 5000 + --extra-k 0 is more than the model's 1002 tokens"),
    (["predict", GOOD, "--model", "{bad}/empty-config-model"], "'encoder' is missing or empty"),
    (["predict", GOOD, "{bad}/missing.jpg"], "{bad}/missing.jpg: no such file or folder"),
    (["predict", GOOD, "--onnx", "{bad}/a-file"], "argument --onnx: {bad}/a-file: is a file, expected a directory"),
    (["score", "{bad}/labels-string.jsonl"], "labels-string.jsonl:1: \"labels\" must be a list of strings, got a string"),
    (["score", "{bad}/gt-number.jsonl"], "gt-number.jsonl:1: \"gt\" must be a list of strings, got int"),
    (["score", "{bad}/twice.jsonl"], "twice.jsonl:2: image 'a' appears twice (first on line 1)"),
    (["score", "{bad}/empty.jsonl"], "empty.jsonl: no records"),
    (["score", "{bad}/nothing.jsonl"], "argument predictions: {bad}/nothing.jsonl: no such file"),
    (["eval", "--model", "m", "--data", "d", "--top-k", "0"], "argument --top-k: must be an integer >= 1"),
    (["train", "tiny-cpu", "--set", "optim.lr=nan"], "optim.lr = nan; must be a finite number"),
    (["train", "tiny-cpu", "--set", "optim.lr=-0.1"], "optim.lr = -0.1; must be 0 or more"),
    (["train", "tiny-cpu", "--set", "data.num_workers=-1"], "data.num_workers = -1; must be 0 or more"),
    (["pack", "jsonl", "{bad}/twice.jsonl", "--out", "o", "--shard-size", "0"], "--shard-size: must be an integer >= 1"),
    (["predict"], "the following arguments are required: images"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
]


def _run(argv, bad, capsys):
    code = main([a.format(bad=bad) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return code, out, err


@pytest.mark.parametrize("args, message", PREDICT_SKIPS, ids=[m for _, m in PREDICT_SKIPS])
def test_predict_skips_bad_images_and_still_labels_the_good_one(args, message, bad, capsys):
    code, out, err = _run(["predict", GOOD, *args, "--top-k", "3"], bad, capsys)
    assert code == 1
    assert out.startswith(GOOD + "\n  0.62454  snake")  # the good image, as `make demo` shows it
    reasons = [line for line in err.splitlines() if line.startswith("nxtrec predict: skipped")]
    assert len(reasons) == 1 and message in reasons[0]
    assert err.strip().splitlines()[-1] == "nxtrec predict: 1 of 2 images failed"


@pytest.mark.parametrize("argv, message", USAGE_ERRORS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in USAGE_ERRORS])
def test_user_errors_are_one_line_with_exit_code_2(argv, message, bad, capsys):
    code, out, err = _run(argv, bad, capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message.format(bad=bad) in lines[0], err


def test_a_bug_says_so_with_its_traceback(monkeypatch, capsys):
    from nxtrec.cli import predict

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(predict, "run", broken)
    assert main(["predict", GOOD]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("nxtrec predict: internal error: this is a bug in nxtrec")


def test_environment_errors_are_one_line(monkeypatch, capsys):
    import errno

    from nxtrec.cli import predict

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out.json")

    monkeypatch.setattr(predict, "run", disk_full)
    assert main(["predict", GOOD]) == 2
    assert capsys.readouterr().err == "nxtrec predict: error: /data/out.json: no space left on the device\n"


def _peak_rss_mb(argv: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run nxtrec in a child process; its peak resident memory (ru_maxrss of the waited child)."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.stderr.write(p.stdout + p.stderr); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "nxtrec", *argv],
                          capture_output=True, text=True, timeout=300, check=False)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0  # kilobytes on Linux
    return proc, int(proc.stdout.strip()) / 1024


def test_pixel_bombs_keep_predict_under_1_gb(tmp_path):
    bombs = [write_png(tmp_path / "grey16-17000.png", 17000, 17000, 16, 0, 34000),
             write_png(tmp_path / "one-colour-30000.png", 30000, 30000, 1, 3, 3750, palette=b"\x20\x80\x20"),
             write_png(tmp_path / "grey16-9000.png", 9000, 9000, 16, 0, 18000)]  # over 64 Mpx, under Pillow's limit
    assert all(p.stat().st_size < 1_000_000 for p in bombs)
    decodable = tmp_path / "grey16-3000.png"
    Image.new("I;16", (3000, 2000), 40000).save(decodable)  # 16-bit and decoded: no float64 copy
    proc, peak_mb = _peak_rss_mb(["predict", *map(str, bombs), str(decodable), GOOD, "--top-k", "3"])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("image too large") == 3 and "Traceback" not in proc.stderr
    assert str(decodable) in proc.stderr and "0.62454  snake" in proc.stderr  # both good images labelled
    assert peak_mb < 1024, f"peak RSS {peak_mb:.0f} MB"
