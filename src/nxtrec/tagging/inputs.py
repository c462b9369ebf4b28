"""What to tag: image files, folders (recursive), globs, list files (one path per line, `-`
for stdin) and WebDataset / img2dataset tar shards (one image per sample, its key as id).

Inputs are enumerated once, in a fixed order: a resumed or distributed run cuts the same
list into the same parts."""

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


def _expand_path(arg: str) -> list[str]:
    if os.path.isdir(arg):
        return list_images([arg])
    if not os.path.exists(arg) and any(c in arg for c in "*?["):
        matches = sorted(glob.glob(arg, recursive=True))
        return [p for p in matches if os.path.isfile(p) and Path(p).suffix.lower() in IMAGE_EXTENSIONS]
    return [arg]  # a file, or a missing one: it is reported in errors.jsonl like a corrupt image


def _read_list(list_file: str) -> list[str]:
    if list_file == "-":
        lines: Iterable[str] = sys.stdin
    else:
        try:
            lines = Path(list_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise NxtrecError(f"--list {list_file}: cannot read ({e.strerror})") from None
    return [line.strip() for line in lines if line.strip()]


def shard_items(patterns: list[str]) -> list[InputItem]:
    """One item per sample of each shard (its first image member), keyed by the sample key."""
    items = []
    for tar in expand_shards(patterns):
        for key, members, _ in tar_samples(Path(tar)):
            image = next((m for m in members if member_ext(m) in IMAGE_EXTS), None)
            source = TarMember(tar, image.offset_data, image.size) if image is not None else None
            items.append(InputItem(key, source))
    return items


def collect_inputs(paths: list[str], list_file: str | None = None, shards: list[str] | None = None) -> list[InputItem]:
    """Every input, in order: the positional paths, then the list file, then the shards. An
    input given twice is tagged twice (ids are the paths as given)."""
    items = [InputItem(p, p) for arg in paths for p in _expand_path(arg)]
    if list_file:
        items += [InputItem(p, p) for arg in _read_list(list_file) for p in _expand_path(arg)]
    if shards:
        items += shard_items(shards)
    return items


def inputs_digest(items: list[InputItem]) -> str:
    """Identifies the ordered input list (ids and where each image is read from)."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.id}\0{item.source}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
