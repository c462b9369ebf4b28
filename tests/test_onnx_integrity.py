"""ONNX exports record each file's size and SHA-256; damaged folders are clear errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nxtrec.digests import file_sha256

ROOT = Path(__file__).resolve().parents[1]
SCENE = str(ROOT / "examples" / "scene.jpg")


def _nxtrec(*args):
    proc = subprocess.run([sys.executable, "-m", "nxtrec", *args], capture_output=True, text=True, timeout=300, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_manifest_records_size_and_sha256_of_every_file(tiny_onnx_export):
    export = tiny_onnx_export
    manifest = json.loads((export / "nxtrec-onnx.json").read_text())
    files = sorted(p.name for p in export.iterdir() if p.name != "nxtrec-onnx.json")
    assert sorted(manifest["sha256"]) == sorted(manifest["sizes"]) == files
    for name in files:
        assert manifest["sizes"][name] == (export / name).stat().st_size
        assert manifest["sha256"][name] == file_sha256(export / name)


@pytest.mark.slow  # seven CLI runs
def test_damaged_exports_are_refused_with_the_file_named(tiny_onnx_export, tmp_path):
    damaged = tmp_path / "onnx"
    shutil.copytree(tiny_onnx_export, damaged)
    good = _nxtrec("predict", SCENE, "--onnx", str(damaged), "--verify", "--top-k", "3")
    assert good.returncode == 0 and good.stdout.startswith(SCENE)
    assert _nxtrec("verify", str(damaged)).returncode == 0

    # Same size, one byte changed: only the hashes see it.
    data = damaged / "decoder.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    failed = _nxtrec("predict", SCENE, "--onnx", str(damaged), "--verify")
    assert failed.returncode == 2 and "decoder.data: SHA-256 differs" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    check = _nxtrec("verify", str(damaged))
    assert check.returncode == 1 and "decoder.data: SHA-256 differs" in check.stderr

    # A truncated embedding table is caught by the size check that always runs.
    emb = damaged / "embeddings.npy"
    emb.write_bytes(emb.read_bytes()[:200])
    failed = _nxtrec("predict", SCENE, "--onnx", str(damaged))
    assert failed.returncode == 2 and "embeddings.npy: 200 bytes" in failed.stderr and "truncated" in failed.stderr

    # Without sizes in the manifest (an older export), the table itself is checked.
    manifest = json.loads((damaged / "nxtrec-onnx.json").read_text())
    del manifest["sizes"], manifest["sha256"]
    (damaged / "nxtrec-onnx.json").write_text(json.dumps(manifest))
    failed = _nxtrec("predict", SCENE, "--onnx", str(damaged))
    assert failed.returncode == 2 and "embeddings.npy: damaged or truncated embedding table" in failed.stderr
    emb.unlink()
    failed = _nxtrec("predict", SCENE, "--onnx", str(damaged))
    assert failed.returncode == 2 and "embeddings.npy: missing" in failed.stderr
