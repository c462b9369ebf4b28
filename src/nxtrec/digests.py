"""SHA-256 digests of files and of a model directory, without torch (the ONNX runtime, the
calibration and the download check them too)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from nxtrec.errors import NxtrecError

CHUNK_BYTES = 1 << 22
# What makes a model what it is: its config, weights and tokenizer. A calibration and an
# adapter record this digest and are refused by any other model.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.model")


def _feed(digest, path: str | Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    _feed(digest, path)
    return digest.hexdigest()


def model_digest(model_dir: str | Path) -> str:
    """SHA-256 over a model directory's config, weights and tokenizer (the name and bytes of
    each; about 1 s per GB of weights)."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            raise NxtrecError(f"{model_dir}: {name} is missing; cannot compute the model's digest")
        digest.update(name.encode() + b"\0")
        _feed(digest, path)
    return digest.hexdigest()
