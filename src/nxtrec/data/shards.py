"""WebDataset tar shards on disk: reading samples and members, the folder manifest, atomic
JSON writes."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Iterator, Optional

from nxtrec.errors import NxtrecError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "nxtrec-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members the loader reads
TAR_MTIME = 1_700_000_000  # fixed member time: identical inputs give identical shards


def read_manifest(folder: Path) -> Optional[dict]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NxtrecError(f"{path}: unreadable manifest ({e}); delete it to rebuild") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None  # someone else's manifest.json: ignore it
    return manifest


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(f"{path}.{os.getpid()}.tmp")  # per process: ranks may write a count cache at once
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def shard_is_done(folder: Path, manifest: dict, name: str) -> bool:
    """Listed in the manifest and still the size it had when written."""
    entry = manifest.get("shards", {}).get(name)
    path = Path(folder) / name
    return entry is not None and path.is_file() and path.stat().st_size == entry["bytes"]


def tar_samples(path: Path) -> Iterator[tuple[str, list[tarfile.TarInfo], tarfile.TarFile]]:
    """(key, members, open tar) per sample, reading headers only (image data is seeked
    over). Members are grouped exactly as webdataset groups them (consecutive members whose
    names share the part before the first dot of the base name), so counts agree with the
    loader. A truncated tar ends at its last complete member."""
    from webdataset.tariterators import base_plus_ext

    size = os.path.getsize(path)
    with tarfile.open(path, "r:") as tf:
        key, members = None, []
        while True:
            try:
                member = tf.next()
            except tarfile.ReadError:
                break
            if member is None or member.offset_data + member.size > size:
                break
            if not member.isreg() or re.match(r"__[^/]*__($|/)", member.name):
                continue
            prefix, _ = base_plus_ext(member.name)
            if prefix is None:
                continue
            if prefix != key and members:
                yield key, members, tf
                members = []
            key = prefix
            members.append(member)
        if members:
            yield key, members, tf


def member_ext(member: tarfile.TarInfo) -> str:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(member.name)[1].lower()


def read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    return tf.extractfile(member).read()


def _bytes_member(name: str, data: bytes, like: tarfile.TarInfo) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime, info.mode, info.uid, info.gid = like.mtime, like.mode, like.uid, like.gid
    info.uname, info.gname = like.uname, like.gname
    return info, io.BytesIO(data)


def list_tars(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise NxtrecError(f"{folder}: not a folder")
    return sorted(p for p in folder.glob("*.tar") if p.is_file())
