"""`nxtrec tag --format hf`: `metadata.jsonl` for the Hugging Face `imagefolder` loader.

`datasets.load_dataset("imagefolder", data_dir=D)` pairs the images under D with the rows
of D/metadata.jsonl by `file_name` (relative to D). D is the deepest folder that holds every
input image; the file is written there, atomically, at the end of each run, from the tag
folder's current records. It is replaced only when it is the one nxtrec wrote last (its
SHA-256 is kept in the tag folder's `.tag/imagefolder.json`): a metadata.jsonl of someone
else is never overwritten."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from nxtrec.errors import NxtrecError
from nxtrec.tagging.inputs import InputItem
from nxtrec.tagging.output import write_atomic

METADATA = "metadata.jsonl"
WRITTEN = "imagefolder.json"  # in the tag folder's .tag/: {"path", "sha256"} of the last write


def data_dir(items: list[InputItem]) -> Path:
    """The deepest folder holding every input image (shard samples are refused)."""
    if any(not isinstance(item.source, str) for item in items):
        raise NxtrecError("--format hf needs image files (the imagefolder loader reads a folder); "
                          "use --format parquet for shards")  # fmt: skip
    return Path(os.path.commonpath([os.path.dirname(os.path.abspath(item.source)) for item in items]))


def _last_written(state: Path) -> dict:
    try:
        return json.loads((state / WRITTEN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def check_metadata_target(items: list[InputItem], state: Path) -> None:
    """Refuse, before tagging, to replace a metadata.jsonl that nxtrec did not write last."""
    target = data_dir(items) / METADATA
    if not target.exists():
        return
    last = _last_written(state)
    if last.get("path") != str(target) or hashlib.sha256(target.read_bytes()).hexdigest() != last.get("sha256"):
        raise NxtrecError(f"{target} exists and is not the one this tag folder wrote; move it away "
                          "(nxtrec never overwrites another metadata.jsonl)")  # fmt: skip


def write_metadata(records: Iterable[dict], items: list[InputItem], state: Path) -> Path:
    """One row per tagged image: file_name, labels ({"label", "prob"} and "confidence" when
    present), width, height. Returns the file written."""
    root = data_dir(items)
    sources = {item.id: item.source for item in items}
    rows = []
    for record in records:
        name = Path(os.path.relpath(os.path.abspath(sources[record["id"]]), root)).as_posix()
        labels = [{k: v for k, v in lab.items() if k != "map"} for lab in record["labels"]]
        rows.append({"file_name": name, "labels": labels, "width": record["width"], "height": record["height"]})
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    target = root / METADATA
    last = _last_written(state)
    write_atomic(target, data)
    write_atomic(state / WRITTEN, json.dumps({"path": str(target), "sha256": hashlib.sha256(data).hexdigest()}).encode())
    old = Path(last.get("path") or target)
    if old != target and old.is_file() and hashlib.sha256(old.read_bytes()).hexdigest() == last.get("sha256"):
        old.unlink()  # the inputs' folder moved up (--update): the loader would find both files
    return target
