"""Label Studio, both ways: tag records -> tasks with predictions and the labelling config
that makes a matching project; a Label Studio JSON export -> ground-truth rows
`{"image": ID, "gt": [...]}` (what `nxtrec score --gt` reads).

A task's data holds the image URL (`image`) and nxtrec's id (`nxtrec_id`), so that the
annotations come back under the ids the records had. Each prediction has one result of the
config's control (`choices`: multiple choice; `taxonomy`: one path per label, one level
deep), its `model_version`, and as `score` the mean probability of its labels (Label Studio
sorts tasks by it: the least sure first)."""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from urllib.parse import quote, unquote

from nxtrec.data.xmp import xml_text
from nxtrec.errors import NxtrecError

FROM_NAME, TO_NAME = "tags", "image"
CONTROLS = {"choices": "Choices", "taxonomy": "Taxonomy"}  # result type -> config tag
LOCAL_FILES = "/data/local-files/?d="  # Label Studio's local file storage, relative to its document root


class LabelStudioError(NxtrecError):
    pass


def labelling_config(labels: Iterable[str], control: str = "choices") -> str:
    """The labelling config XML: the image and one choice per label (in first-seen order;
    characters that XML cannot hold are dropped, in the tasks' predictions too)."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=TO_NAME, value="$image")
    attrs = {"choice": "multiple", "showInline": "true"} if control == "choices" else {}
    tags = ET.SubElement(view, CONTROLS[control], name=FROM_NAME, toName=TO_NAME, **attrs)
    for label in dict.fromkeys(map(xml_text, labels)):
        ET.SubElement(tags, "Choice", value=label)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def _value(labels: list[str], control: str) -> dict:
    return {"choices": labels} if control == "choices" else {"taxonomy": [[label] for label in labels]}


def task(record: dict, model_version: str, image_url: str = LOCAL_FILES, control: str = "choices") -> dict:
    """One task from a tag record: the image at image_url + the id (URL-quoted), the labels
    as a prediction. A label's `confidence`, when present, is kept in `meta`."""
    labels = list(dict.fromkeys(xml_text(lab["label"]) for lab in record["labels"]))
    result = []
    if labels:
        result.append({"id": uuid.uuid5(uuid.NAMESPACE_URL, record["id"]).hex[:10], "from_name": FROM_NAME,
                       "to_name": TO_NAME, "type": control, "value": _value(labels, control)})  # fmt: skip
    probs = [lab["prob"] for lab in record["labels"]]
    prediction = {"model_version": model_version, "score": sum(probs) / len(probs) if probs else 0.0, "result": result}
    if any("confidence" in lab for lab in record["labels"]):
        prediction["meta"] = {"confidence": {xml_text(lab["label"]): lab.get("confidence") for lab in record["labels"]}}
    return {"data": {"image": image_url + quote(record["id"], safe="/"), "nxtrec_id": record["id"]},
            "predictions": [prediction]}  # fmt: skip


def read_export(path) -> list:
    """The tasks of a Label Studio JSON export; an unreadable file is one LabelStudioError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise LabelStudioError(f"{path}: cannot read a JSON export ({e}); export the Label Studio project as JSON") from None


def image_path(image: str) -> str:
    """The file a task's image id names: nxtrec's id as it is, a local-file URL (`task`'s
    default) without its prefix and quoting."""
    return unquote(image[len(LOCAL_FILES):]) if image.startswith(LOCAL_FILES) else image


def _annotation(entry: dict) -> dict | None:
    """The latest annotation that was not cancelled (by `updated_at`, else list order)."""
    done = [a for a in entry.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    return max(done, key=lambda a: str(a.get("updated_at") or ""), default=None) if done else None


def _labels(annotation: dict, where: str) -> list[str]:
    labels: list[str] = []
    for item in annotation.get("result") or []:
        value = item.get("value") or {}
        if item.get("type") == "choices":
            labels += value.get("choices", [])
        elif item.get("type") == "taxonomy":
            labels += [path[-1] for path in value.get("taxonomy", []) if path]  # the leaf of each path
    if not all(isinstance(label, str) for label in labels):
        raise LabelStudioError(f"{where}: a choice that is not a string")
    return list(dict.fromkeys(labels))


def ground_truth(export: list, source: str = "export") -> tuple[list[dict], int]:
    """`{"image": ID, "gt": labels}` per annotated task of a Label Studio JSON export, and
    how many tasks had no annotation (left out)."""
    if not isinstance(export, list):
        raise LabelStudioError(f"{source}: not a Label Studio JSON export (a list of tasks); export as JSON")
    rows, unannotated, seen = [], 0, set()
    for n, entry in enumerate(export):
        where = f"{source}: task {entry.get('id', n) if isinstance(entry, dict) else n}"
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), dict):
            raise LabelStudioError(f"{where}: not a task (no \"data\")")
        image = entry["data"].get("nxtrec_id", entry["data"].get("image"))
        if not isinstance(image, str):
            raise LabelStudioError(f"{where}: no image id (data.nxtrec_id or data.image)")
        annotation = _annotation(entry)
        if annotation is None:
            unannotated += 1
            continue
        if image in seen:
            raise LabelStudioError(f"{where}: image {image!r} appears in two tasks")
        seen.add(image)
        rows.append({"image": image, "gt": _labels(annotation, where)})
    return rows, unannotated
