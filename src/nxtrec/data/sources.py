"""Caption sources for the packers: COCO captions, OpenImages localized narratives, JSON
lines and plain folders, each read into `Record`s (image path, caption, metadata)."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from nxtrec.errors import NxtrecError


@dataclass
class Record:
    key: str
    image: str  # path to read the image from
    caption: Optional[str]  # None: the source had no caption for this image
    source: str  # the image as the annotation names it, stored in KEY.json
    extra: dict = field(default_factory=dict)  # more metadata for KEY.json (e.g. synth's true objects)


def safe_key(text: str) -> str:
    """A sample key webdataset reads back unchanged: it cuts the member name at the first
    dot, so dots (and path separators) become underscores."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise NxtrecError(f"{path}: no such {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NxtrecError(f"{path}: not a JSON {what} ({e})") from None


def read_jsonl(path: str | Path, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines `what`; an error names
    the file and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise NxtrecError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise NxtrecError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
                yield line_no, obj
    except FileNotFoundError:
        raise NxtrecError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise NxtrecError(f"{path}: is a directory, expected a {what}") from None
    except UnicodeDecodeError:
        raise NxtrecError(f"{path}: not UTF-8 text") from None


def _field(obj: dict, name: str, path: Path, line_no: int) -> str:
    if not isinstance(obj.get(name), str):
        raise NxtrecError(f"{path}:{line_no}: no {name!r} string in this line")
    return obj[name]


def coco_records(images: Path, captions: Path) -> list[Record]:
    """COCO captions_*.json: one record per image, its captions joined with spaces (as the
    reference's packer does); key = file name stem."""
    data = _read_json(Path(captions), "COCO captions file")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise NxtrecError(f"{captions}: not a COCO captions file (no 'images' and 'annotations')")
    texts = defaultdict(list)
    try:
        for ann in data["annotations"]:
            texts[ann["image_id"]].append(ann["caption"].strip())
        return [
            Record(safe_key(Path(img["file_name"]).stem), str(Path(images) / img["file_name"]),
                   " ".join(texts[img["id"]]), img["file_name"])
            for img in data["images"]
        ]  # fmt: skip
    except (KeyError, TypeError, AttributeError) as e:
        raise NxtrecError(f"{captions}: not a COCO captions file (bad entry: {e!r})") from None


def openimages_records(images: Path, narratives: Path) -> list[Record]:
    """Localized Narratives JSONL (`image_id`, `caption` per line) with the OpenImages
    folder of `IMAGE_ID.jpg`: one record per image, its narratives joined with spaces."""
    texts: dict[str, list[str]] = defaultdict(list)
    for line_no, obj in read_jsonl(narratives, "narratives file"):
        image_id = _field(obj, "image_id", narratives, line_no)
        texts[image_id].append(_field(obj, "caption", narratives, line_no).strip())
    return [
        Record(safe_key(i), str(Path(images) / f"{i}.jpg"), " ".join(t), f"{i}.jpg") for i, t in texts.items()
    ]


def jsonl_records(path: Path, images_root: Optional[Path] = None) -> list[Record]:
    """Lines `{"image": PATH, "caption": TEXT}` (optional "key"); relative image paths are
    relative to `images_root`, by default the JSONL file's folder. Key: "key", else the
    line number."""
    path = Path(path)
    root = Path(images_root) if images_root else path.parent
    records = []
    for line_no, obj in read_jsonl(path, "JSONL file"):
        image = _field(obj, "image", path, line_no)
        caption = _field(obj, "caption", path, line_no)
        key = obj.get("key") or f"{line_no:09d}"
        records.append(Record(safe_key(str(key)), str(root / image), caption, image))
    return records


def folder_records(folder: Path) -> list[Record]:
    """Every image under `folder` with the caption in the same-name .txt beside it; key =
    the relative path without extension."""
    from nxtrec.model.image import list_images

    folder = Path(folder)
    if not folder.is_dir():
        raise NxtrecError(f"{folder}: not a folder")
    records = []
    for image in list_images([folder]):
        rel = Path(image).relative_to(folder)
        txt = Path(image).with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        records.append(Record(safe_key(str(rel.with_suffix(""))), image, caption, rel.as_posix()))
    return records
