"""What to tag: image files, folders (recursive), globs, list files (one path per line, `-`
for stdin) and WebDataset / img2dataset tar shards (one image per sample, its key as id).

Inputs are enumerated once, in a fixed order: a resumed or distributed run cuts the same
list into the same parts. A folder is known by its real path: named again by another path
(relative or absolute, through a symbolic link, with a trailing slash) its images keep the
ids they were first given (`roots`). `fingerprint` tells a changed image from an unchanged
one (size and modification time, or the content's SHA-256)."""

from __future__ import annotations

import glob
import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nxtrec.data.registry import expand_shards
from nxtrec.data.shards import IMAGE_EXTS, member_ext, tar_samples
from nxtrec.errors import NxtrecError
from nxtrec.model.image import IMAGE_EXTENSIONS, list_images


@dataclass(frozen=True)
class TarMember:
    """An image stored inside a tar: its data is read directly at `offset`."""

    tar: str
    offset: int
    size: int


@dataclass(frozen=True)
class InputItem:
    id: str
    # A path, a tar member, or None for a shard sample that has no image member.
    source: str | TarMember | None


def folder_spelling(folder: str, roots: dict[str, str]) -> str:
    """How ids spell `folder`: as the folder (or the one above it) was first named, found by
    real path in `roots` (real path -> spelling); a new folder is added as given."""
    real = os.path.realpath(folder)
    known = [r for r in roots if real == r or real.startswith(r.rstrip(os.sep) + os.sep)]
    if not known:
        roots[real] = str(Path(folder))
        return roots[real]
    root = max(known, key=len)
    rel = os.path.relpath(real, root)
    return roots[root] if rel == "." else os.path.join(roots[root], rel)


def _expand_path(arg: str, roots: dict[str, str] | None) -> list[InputItem]:
    if os.path.isdir(arg):
        files = list_images([arg])
        if roots is None:
            return [InputItem(p, p) for p in files]
        base, spelling = str(Path(arg)), folder_spelling(arg, roots)
        return [InputItem(spelling + p[len(base):] if p.startswith(base) else p, p) for p in files]
    if not os.path.exists(arg) and any(c in arg for c in "*?["):
        matches = sorted(glob.glob(arg, recursive=True))
        return [InputItem(p, p) for p in matches if os.path.isfile(p) and Path(p).suffix.lower() in IMAGE_EXTENSIONS]
    return [InputItem(arg, arg)]  # a file, or a missing one: reported in errors.jsonl like a corrupt image


def _read_list(list_file: str) -> list[str]:
    if list_file == "-":
        lines: Iterable[str] = sys.stdin
    else:
        try:
            lines = Path(list_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise NxtrecError(f"--list {list_file}: cannot read ({e.strerror})") from None
    return [line.strip() for line in lines if line.strip()]


def shard_items(patterns: list[str], shard_errors: list[dict] | None = None) -> list[InputItem]:
    """One item per sample of each shard (its first image member), keyed by the sample key.
    A damaged shard (not a tar, unreadable, truncated, corrupt header) gives its readable
    samples and an error `{"id": shard, "reason", "shard": true}` in `shard_errors`."""
    items = []
    for tar in expand_shards(patterns):
        damage: list[str] = []
        samples = 0
        for key, members, _ in tar_samples(Path(tar), damage):
            image = next((m for m in members if member_ext(m) in IMAGE_EXTS), None)
            source = TarMember(tar, image.offset_data, image.size) if image is not None else None
            items.append(InputItem(key, source))
            samples += 1
        if damage and shard_errors is not None:
            reason = f"{tar}: damaged shard, {damage[0]}; {samples} samples read"
            shard_errors.append({"id": tar, "reason": reason, "shard": True})
    return items


def collect_inputs(paths: list[str], list_file: str | None = None, shards: list[str] | None = None,
                   roots: dict[str, str] | None = None, shard_errors: list[dict] | None = None,
                   ) -> list[InputItem]:  # fmt: skip
    """Every input, in order: the positional paths, then the list file, then the shards. An
    input given twice is tagged twice (ids are the paths as given). With `roots`, the images of
    a folder named before by another path get ids spelled as then, and new folders are added.
    Damaged shards are appended to `shard_errors` (see shard_items)."""
    items = [item for arg in paths for item in _expand_path(arg, roots)]
    if list_file:
        items += [item for arg in _read_list(list_file) for item in _expand_path(arg, roots)]
    if shards:
        items += shard_items(shards, shard_errors)
    return items


def inputs_digest(items: list[InputItem]) -> str:
    """Identifies the ordered input list (ids and where each image is read from)."""
    h = hashlib.sha256()
    for item in items:
        # a file is named by its id: the same folder named by another path is the same input
        source = item.id if isinstance(item.source, str) else item.source
        h.update(f"{item.id}\0{source}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _sha256(path: str, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size
        while chunk := f.read(1 << 20 if left is None else min(1 << 20, left)):
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def fingerprint(item: InputItem, content: bool = False) -> dict | None:
    """What tells a changed image: its size and modification time (a tar member: its size
    and the tar's time), plus its SHA-256 with `content`; None for a missing file."""
    source = item.source
    try:
        if isinstance(source, TarMember):
            fp = {"size": source.size, "mtime_ns": os.stat(source.tar).st_mtime_ns}
            return fp | ({"sha256": _sha256(source.tar, source.offset, source.size)} if content else {})
        if source is None:
            return None
        st = os.stat(source)
        fp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return fp | ({"sha256": _sha256(source)} if content and os.path.isfile(source) else {})
    except OSError:
        return None


def same_image(old: dict | None, new: dict | None) -> bool:
    """Whether an image is unchanged: by content when both fingerprints have it (a touched
    file is unchanged), else by size and modification time."""
    if old is None or new is None:
        return old is new
    if "sha256" in old and "sha256" in new:
        return old["sha256"] == new["sha256"] and old["size"] == new["size"]
    return (old["size"], old["mtime_ns"]) == (new["size"], new["mtime_ns"])
