"""The file list of an ONNX export: each file's size and SHA-256 in the manifest, checked
when the directory is opened (sizes, a `stat` each) and on request (hashes, a full read).

Torch-free: the ONNX runtime path imports it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nxtrec.digests import file_sha256
from nxtrec.errors import NxtrecError
from nxtrec.onnx.format import MANIFEST


class IntegrityError(NxtrecError):
    pass


def file_records(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """(sizes, SHA-256) of every file in `folder` but the manifest, for the manifest."""
    files = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and p.name != MANIFEST]
    return {p.name: p.stat().st_size for p in files}, {p.name: file_sha256(p) for p in files}


def check_sizes(folder: Path, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded size."""
    for name, size in manifest.get("sizes", {}).items():
        if name == MANIFEST:  # older exports listed the manifest itself
            continue
        path = Path(folder) / name
        if not path.is_file():
            raise IntegrityError(f"{path}: missing (listed in {MANIFEST}); copy the whole export folder or re-export")
        actual = path.stat().st_size
        if actual != size:
            raise IntegrityError(f"{path}: {actual} bytes, {MANIFEST} says {size} (truncated or replaced); "
                                 "copy it again or re-export")


def check_hashes(folder: Path, manifest: dict) -> int:
    """Every file's SHA-256 matches the manifest; returns the number of files checked."""
    hashes = manifest.get("sha256")
    if not hashes:
        raise IntegrityError(f"{Path(folder) / MANIFEST}: no SHA-256 recorded (an export by an older nxtrec); "
                             "re-export to verify")
    check_sizes(folder, manifest)
    for name, expected in hashes.items():
        if file_sha256(Path(folder) / name) != expected:
            raise IntegrityError(f"{Path(folder) / name}: SHA-256 differs from {MANIFEST} (damaged or replaced)")
    return len(hashes)


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing; not an nxtrec ONNX export folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path}: expected a JSON object")
    return manifest


def load_embeddings(path: Path) -> np.ndarray:
    """The [vocab, dim] table, memory-mapped; a missing or damaged file is one clear error."""
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise IntegrityError(f"{path}: missing; the ONNX export is incomplete, re-export") from None
    except (OSError, ValueError, EOFError) as e:
        raise IntegrityError(f"{path}: damaged or truncated embedding table ({e}); re-export") from None
    if table.ndim != 2:
        raise IntegrityError(f"{path}: expected a [vocab, dim] table, got shape {table.shape}")
    return table
