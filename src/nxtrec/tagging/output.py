"""The output folder of `nxtrec tag`: numbered part files written atomically, the resume
state, errors.jsonl and manifest.json.

A run cuts the images that have no current record into parts of part_size, in input order,
numbered from the lowest free number (a first run: part p holds inputs [p * part_size,
(p + 1) * part_size)). A part file appears by an atomic rename, after its sidecar
`.tag/part-NNNNN.json` (counts, errors, and each image's id and fingerprint): a part file on
disk is a finished part, anything else is redone, so a killed run resumes without losing or
repeating a record. A finished part is never rewritten: an image that changed is tagged into
a new part, and manifest.json lists its old record as superseded (and the ids of images no
longer among the inputs as removed); `read_records` gives the current records. manifest.json
keeps the settings; a rerun with other settings is refused unless the caller overwrites."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nxtrec.data.shards import write_json_atomic
from nxtrec.errors import NxtrecError
from nxtrec.inference.ranking import rounded
from nxtrec.tagging.inputs import InputItem, same_image
from nxtrec.tagging.pipeline import TagResult

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
STATE_DIR = ".tag"
MANIFEST_FORMAT = "nxtrec-tag/1"
FORMATS = ("jsonl", "csv")
PART_RE = re.compile(r"^part-(\d{5,})\.(jsonl|csv)$")
CSV_COLUMNS = ["id", "label", "prob"]
ANY = "any"  # the fingerprint of an image in a part written before fingerprints were kept


class TagOutputError(NxtrecError):
    pass


@dataclass(frozen=True)
class PartEntry:
    """One image of a finished part: its id, fingerprint when tagged, and error if it failed."""

    part: int
    id: str
    fp: dict | str | None
    error: str | None


def format_part(results: list[TagResult], fmt: str) -> str:
    """jsonl: one record per tagged image. csv: a header, then `id,label,prob` rows, one per
    label; an image left without labels (all below --min-prob) has one row with an empty label."""
    if fmt == "jsonl":
        return "".join(json.dumps(r.to_record(), ensure_ascii=False) + "\n" for r in results)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in results:
        writer.writerows([[r.id, lab.label, repr(rounded(lab.prob))] for lab in r.labels] or [[r.id, "", ""]])
    return buf.getvalue()


def match_entries(inputs: Sequence[tuple[str, dict | None]], entries: Sequence[PartEntry]) -> list[int | None]:
    """For each input (id, fingerprint) in order, the entry holding its current record: an
    unused one of its id whose image is unchanged, the latest first; None: to be tagged."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for k, e in enumerate(entries):
        by_id[e.id].append(k)
    picks: list[int | None] = []
    for name, fp in inputs:
        candidates = by_id.get(name, [])
        k = next((k for k in reversed(candidates) if entries[k].fp == ANY or same_image(entries[k].fp, fp)), None)
        if k is not None:
            candidates.remove(k)
        picks.append(k)
    return picks


def _part_records(path: Path) -> Iterator[dict]:
    if path.suffix == ".jsonl":
        yield from (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line)
        return
    record: dict | None = None
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if record is None or record["id"] != row["id"]:
                if record is not None:
                    yield record
                record = {"id": row["id"], "labels": []}
            if row["label"]:
                record["labels"].append({"label": row["label"], "prob": float(row["prob"])})
    if record is not None:
        yield record


def read_records(folder: str | Path) -> Iterator[dict]:
    """The current records of a tag folder, in part order, without the superseded ones and
    those of removed images (csv rows come back as one `{"id", "labels"}` per image)."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    removed, superseded = set(manifest.get("removed", [])), manifest.get("superseded", {})
    parts = sorted((int(m.group(1)), path) for path in folder.iterdir() if (m := PART_RE.match(path.name)))
    for _, path in parts:
        skip = removed | set(superseded.get(path.name, []))
        yield from (r for r in _part_records(path) if r["id"] not in skip)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


class TagOutput:
    def __init__(self, folder: str | Path, fmt: str = "jsonl"):
        if fmt not in FORMATS:
            raise TagOutputError(f"--format {fmt}: choose from {', '.join(FORMATS)}")
        self.folder, self.fmt = Path(folder), fmt
        self.state = self.folder / STATE_DIR

    def part_path(self, part: int) -> Path:
        return self.folder / f"part-{part:05d}.{self.fmt}"

    def _sidecar(self, part: int) -> Path:
        return self.state / f"part-{part:05d}.json"

    def read_manifest(self) -> dict | None:
        path = self.folder / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise TagOutputError(f"{path}: unreadable ({e}); pass --overwrite to start over") from None
        return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None

    def check(self, settings: dict, overwrite: bool, update: bool = False) -> None:
        """Refuse to mix results of different settings, or to write into someone else's folder;
        with `update` the inputs may differ."""
        if overwrite or not self.folder.exists():
            return
        if not self.folder.is_dir():
            raise TagOutputError(f"--out {self.folder}: exists and is not a folder")
        manifest = self.read_manifest()
        if manifest is None:
            if any(self.folder.iterdir()):
                raise TagOutputError(f"--out {self.folder}: not empty and not an nxtrec tag folder; choose another folder")
            return
        old = manifest.get("settings", {})
        diff = _differences({k: v for k, v in old.items() if k != "inputs"} if update else old,
                            {k: v for k, v in settings.items() if k != "inputs"} if update else settings)  # fmt: skip
        if diff:
            hint = "" if update or any(not d.startswith("inputs.") for d in diff) else (
                ", pass --update to tag only new and changed images")  # fmt: skip
            raise TagOutputError(
                f"{self.folder} was tagged with other settings ({'; '.join(diff)}); rerun with the same "
                f"inputs and options to resume{hint}, or pass --overwrite to start over"
            )

    def prepare(self, settings: dict, overwrite: bool, roots: dict | None = None) -> None:
        """Create the folder (after removing our files when overwriting) and its manifest."""
        if overwrite and self.folder.is_dir():
            for path in self.folder.iterdir():
                if PART_RE.match(path.name) or path.name in (MANIFEST, ERRORS):
                    path.unlink()
            shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True, exist_ok=True)
        for stale in [*self.folder.glob("*.tmp"), *self.state.glob("*.tmp")]:
            stale.unlink(missing_ok=True)  # left by a killed run
        manifest = self.read_manifest() or {}
        roots = {**manifest.get("roots", {}), **(roots or {})}
        write_json_atomic(self.folder / MANIFEST, {**manifest, "format": MANIFEST_FORMAT, "status": "running",
                                                   "settings": settings, "roots": roots})  # fmt: skip

    def done_parts(self) -> set[int]:
        return {
            int(m.group(1)) for path in self.folder.glob(f"part-*.{self.fmt}")
            if (m := PART_RE.match(path.name)) and self._sidecar(int(m.group(1))).is_file()
        }  # fmt: skip

    def write_part(self, part: int, results: list[TagResult], fingerprints: Sequence[dict | None]) -> None:
        errors = [{"id": r.id, "reason": r.error} for r in results if r.error is not None]
        inputs = [[r.id, fp] for r, fp in zip(results, fingerprints, strict=True)]
        write_json_atomic(self._sidecar(part), {"images": len(results), "failed": len(errors), "errors": errors,
                                                "inputs": inputs})  # fmt: skip
        _write_text_atomic(self.part_path(part), format_part([r for r in results if r.error is None], self.fmt))

    def read_entries(self, items: Sequence[InputItem] | None, part_size: int) -> list[PartEntry]:
        """The images of the finished parts, in part order. A part written before fingerprints
        were kept holds inputs [p * part_size, (p + 1) * part_size) of `items`, the list it was
        started with (the settings check saw to it); without `items` such a part is refused."""
        entries = []
        for part in sorted(self.done_parts()):
            side = json.loads(self._sidecar(part).read_text(encoding="utf-8"))
            errors = {e["id"]: e["reason"] for e in side["errors"]}
            if "inputs" in side:
                entries += [PartEntry(part, name, fp, errors.get(name)) for name, fp in side["inputs"]]
            elif items is None:
                raise TagOutputError(f"{self.part_path(part)} was written by an earlier nxtrec, without the images' "
                                     "fingerprints that --update needs; pass --overwrite to start over")  # fmt: skip
            else:
                old = items[part * part_size : (part + 1) * part_size]
                entries += [PartEntry(part, it.id, ANY, errors.get(it.id)) for it in old]
        return entries

    def finish(self, settings: dict, inputs: Sequence[tuple[str, dict | None]], entries: list[PartEntry],
               extra: dict) -> dict:  # fmt: skip
        """Write errors.jsonl (the current records' errors) and the final manifest: counts,
        superseded records (per part file) and removed ids. Returns the counts."""
        picks = match_entries(inputs, entries)
        current = [entries[k] for k in picks if k is not None]
        picked, ids, current_ids = set(picks), {name for name, _ in inputs}, {e.id for e in current}
        superseded: dict[str, list[str]] = defaultdict(list)
        removed = set()
        for k, e in enumerate(entries):
            if k in picked:
                continue
            if e.id not in ids:
                removed.add(e.id)
            elif e.id in current_ids:
                superseded[self.part_path(e.part).name].append(e.id)
        errors = [{"id": e.id, "reason": e.error} for e in current if e.error is not None]
        _write_text_atomic(self.folder / ERRORS, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in errors))
        parts_done, left = len({e.part for e in entries}), picks.count(None)
        counts = {"images": len(current), "tagged": len(current) - len(errors), "failed": len(errors),
                  "parts_done": parts_done, "parts": parts_done + -(-left // settings["options"]["part_size"]),
                  "superseded": sum(map(len, superseded.values())), "removed": len(removed)}  # fmt: skip
        manifest = {**(self.read_manifest() or {}), "format": MANIFEST_FORMAT, "settings": settings,
                    "status": "incomplete" if left else "complete", "counts": counts,
                    "superseded": dict(superseded), "removed": sorted(removed), **extra}  # fmt: skip
        write_json_atomic(self.folder / MANIFEST, manifest)
        return counts
