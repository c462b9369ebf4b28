"""WebDataset tar shards on disk: reading samples and members, the folder manifest, atomic
JSON writes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from nxtrec.errors import NxtrecError, disk_full_error, is_disk_full

MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".nxtrec.lock"
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
    with removed_on_error(tmp):
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)


@contextlib.contextmanager
def removed_on_error(tmp: Path, needed: Optional[Callable[[], int]] = None):
    """Delete the temporary file `tmp` when writing it fails; an OSError (disk full,
    read-only, permission) becomes one line naming the file, and a full disk also says the
    space the file needed (`needed()`, default: what was written of it) and how much is free."""
    try:
        yield
    except BaseException as e:
        written = 0
        with contextlib.suppress(OSError):
            written = tmp.stat().st_size
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and is_disk_full(e) and not isinstance(e, NxtrecError):
            reason = e.strerror or str(e)
            raise disk_full_error(tmp, max(written, needed() if needed else 0),
                                  f"{reason} while writing; the partial file {tmp.name} was removed") from None
        if isinstance(e, OSError) and not isinstance(e, NxtrecError):
            reason = e.strerror or str(e)
            raise NxtrecError(f"{e.filename or tmp}: {reason} (while writing; the partial file {tmp.name} was removed)") from None
        raise


@contextlib.contextmanager
def folder_lock(folder: Path, command: str):
    """Hold an exclusive lock on `folder` (a `.nxtrec.lock` file in it) for `command`; a
    second writer into the same folder is refused instead of interleaving with the first."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    try:
        f = open(path, "a+")  # noqa: SIM115 -- held for the whole block, closed in finally
    except OSError as e:
        raise NxtrecError(f"{folder}: cannot write here ({e.strerror})") from None
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise NxtrecError(f"{folder}: {holder} is writing into this folder; wait for it to finish, "
                              "or choose another output folder") from None
        f.seek(0)
        f.truncate()
        f.write(f"`nxtrec {command}` (pid {os.getpid()})")
        f.flush()
        yield
    finally:
        f.close()


def shard_is_done(folder: Path, manifest: dict, name: str) -> bool:
    """Listed in the manifest and still the size it had when written."""
    entry = manifest.get("shards", {}).get(name)
    path = Path(folder) / name
    return entry is not None and path.is_file() and path.stat().st_size == entry["bytes"]


def tar_samples(path: Path, damage: Optional[list[str]] = None) -> Iterator[tuple[str, list[tarfile.TarInfo], tarfile.TarFile]]:
    """(key, members, open tar) per sample, reading headers only (image data is seeked
    over). Members are grouped exactly as webdataset groups them (consecutive members whose
    names share the part before the first dot of the base name), so counts agree with the
    loader. A damaged tar ends at its last complete member; with a `damage` list, what is
    wrong (not a tar, truncated, corrupt header, unreadable) is appended to it (one reason)
    instead of raising or ending silently."""
    from webdataset.tariterators import base_plus_ext

    try:
        size = os.path.getsize(path)
        tf = tarfile.open(path, "r:")  # noqa: SIM115 -- closed by the `with tf` below
    except (OSError, tarfile.TarError) as e:
        if damage is None:
            raise
        damage.append(_open_failure(e))
        return
    with tf:
        key, members, samples = None, [], 0
        while True:
            try:
                member = tf.next()
            except tarfile.ReadError as e:
                _note(damage, f"truncated or corrupt tar header after {samples + bool(members)} samples ({e})")
                break
            if member is None:
                if not _ends_cleanly(Path(path), tf.offset, size):
                    _note(damage, f"truncated or corrupt after {samples + bool(members)} samples (the tar ends early)")
                break
            if member.offset_data + member.size > size:
                _note(damage, f"truncated inside {member.name}")
                break
            if not member.isreg() or re.match(r"__[^/]*__($|/)", member.name):
                continue
            prefix, _ = base_plus_ext(member.name)
            if prefix is None:
                continue
            if prefix != key and members:
                yield key, members, tf
                samples += 1
                members = []
            key = prefix
            members.append(member)
        if members:
            yield key, members, tf


def _note(damage: Optional[list[str]], reason: str) -> None:
    if damage is not None:
        damage.append(reason)


def _open_failure(e: Exception) -> str:
    if isinstance(e, tarfile.TarError):
        return "not a tar file"
    return f"cannot read ({e.strerror or e})"


def _ends_cleanly(path: Path, offset: int, size: int) -> bool:
    """A tar ends with at least two zero blocks after its last member; anything else after
    the last header tarfile could read means the file was cut or damaged there."""
    if size - offset < 2 * tarfile.BLOCKSIZE:
        return False
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return False
    return True


def member_ext(member: tarfile.TarInfo) -> str:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(member.name)[1].lower()


def read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    return tf.extractfile(member).read()


def bytes_member(name: str, data: bytes, like: tarfile.TarInfo) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A tar member holding `data`, with the owner, mode and time of `like` (for `addfile`)."""
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
