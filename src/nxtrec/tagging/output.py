"""The output folder of `nxtrec tag`: numbered part files written atomically, the resume
state, errors.jsonl and manifest.json.

A run cuts the images that have no current record into parts of part_size, in input order,
numbered from the lowest free number (a first run: part p holds inputs [p * part_size,
(p + 1) * part_size)). A part file appears by an atomic rename, after its sidecar
`.tag/part-NNNNN.json` (counts, errors, each image's id and fingerprint, and the part file's
record count, size and SHA-256), both written to disk (fsync) before their rename: a part file
whose bytes match its sidecar is a finished part, anything else (no sidecar, truncated,
altered) is removed and redone, so a killed run or a damaged file resumes without losing or
repeating a record. A finished part is never rewritten: an image that changed is tagged into
a new part, and manifest.json lists its old record as superseded (and the ids of images no
longer among the inputs as removed); `read_records` gives the current records. manifest.json
keeps the settings; a rerun with other settings is refused unless the caller overwrites."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nxtrec.data.shards import LOCK_NAME, folder_lock, removed_on_error
from nxtrec.errors import NxtrecError
from nxtrec.inference.ranking import rounded
from nxtrec.tagging.inputs import InputItem, same_image
from nxtrec.tagging.parquet_part import (
    parquet_bytes,
    parquet_records,
    parquet_row_count,
)
from nxtrec.tagging.pipeline import TagResult

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
STATE_DIR = ".tag"
MANIFEST_FORMAT = "nxtrec-tag/1"
MERGED_FORMAT = "nxtrec-tag-merged/1"  # of `nxtrec tag --merge` (nxtrec.tagging.merge)
FORMATS = ("jsonl", "csv", "parquet")
PART_RE = re.compile(r"^part-(\d{5,})\.(jsonl|csv|parquet)$")
# temporary files of an atomic write (ours, and write_json_atomic's of earlier versions)
TMP_RE = re.compile(r"^(\.(part-\d{5,}\.(jsonl|csv|parquet)|manifest\.json|errors\.jsonl)|manifest\.json)\.\d+\.tmp$")
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
    # a calibrated model's confidence in a fourth column (nxtrec.inference.calibration)
    conf = any(lab.confidence is not None for r in results for lab in r.labels)
    writer.writerow(CSV_COLUMNS + ["confidence"] * conf)
    for r in results:
        writer.writerows([[r.id, lab.label, repr(rounded(lab.prob))] + ([repr(rounded(lab.confidence))] if conf else [])
                          for lab in r.labels] or [[r.id, "", ""] + [""] * conf])  # fmt: skip
    return buf.getvalue()


def match_entries(inputs: Sequence[tuple[str, dict | None]], entries: Sequence[PartEntry],
                  retry: Callable[[PartEntry], bool] | None = None) -> list[int | None]:  # fmt: skip
    """For each input (id, fingerprint) in order, the entry holding its current record: an
    unused one of its id whose image is unchanged, the latest first; None: to be tagged, also
    when `retry` says that entry's failure is worth another try."""
    by_id: dict[str, list[int]] = defaultdict(list)
    for k, e in enumerate(entries):
        by_id[e.id].append(k)
    picks: list[int | None] = []
    for name, fp in inputs:
        candidates = by_id.get(name, [])
        k = next((k for k in reversed(candidates) if entries[k].fp == ANY or same_image(entries[k].fp, fp)), None)
        if k is not None and retry is not None and entries[k].error is not None and retry(entries[k]):
            k = None
        if k is not None:
            candidates.remove(k)
        picks.append(k)
    return picks


def _part_records(path: Path) -> Iterator[dict]:
    if path.suffix == ".parquet":
        yield from parquet_records(path)
        return
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
    those of removed images (csv rows come back as one `{"id", "labels"}` per image); of a
    merged folder (`nxtrec tag --merge`), those of its shards."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    for shard in manifest.get("shards", []) if manifest.get("format") == MERGED_FORMAT else []:
        yield from read_records(folder / shard["folder"])  # `nxtrec tag --merge`: the shards in order
    removed, superseded = set(manifest.get("removed", [])), manifest.get("superseded", {})
    parts = sorted((int(m.group(1)), path) for path in folder.iterdir() if (m := PART_RE.match(path.name)))
    for _, path in parts:
        skip = removed | set(superseded.get(path.name, []))
        yield from (r for r in _part_records(path) if r["id"] not in skip)


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file, fsync it, rename it to `path` and fsync the folder:
    after a crash or power loss `path` holds the old or the new bytes, never a short file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with removed_on_error(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    with contextlib.suppress(OSError):  # not every file system can sync a folder
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, obj) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def _count_records(data: bytes, suffix: str) -> int | None:
    """The number of records in a part file's bytes; None when they cannot be read."""
    if suffix == ".parquet":
        return parquet_row_count(data)
    try:
        text = data.decode("utf-8")
        if suffix == ".jsonl":
            if text and not text.endswith("\n"):
                return None
            return sum(1 for line in text.splitlines() if line and json.loads(line) is not None)
        ids = [row["id"] for row in csv.DictReader(io.StringIO(text, newline=""))]
        return sum(1 for k, name in enumerate(ids) if k == 0 or ids[k - 1] != name)
    except (ValueError, KeyError, csv.Error):
        return None


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
        self.model = ""  # the settings' model, a column of parquet parts
        self._verified: dict[int, tuple] = {}  # part -> (size, mtime_ns) of a file checked good

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

    def _is_tag_folder(self) -> bool:
        """Written by `nxtrec tag`: its manifest, or the state folder of a run killed early."""
        with contextlib.suppress(TagOutputError):
            if self.read_manifest() is not None:
                return True
        return self.state.is_dir()

    def check(self, settings: dict, overwrite: bool, update: bool = False) -> None:
        """Refuse to mix results of different settings, or to write into (or, overwriting,
        empty) someone else's folder; with `update` the inputs may differ."""
        if not self.folder.exists():
            return
        if not self.folder.is_dir():
            raise TagOutputError(f"--out {self.folder}: exists and is not a folder")
        if any(p.name != LOCK_NAME for p in self.folder.iterdir()) and not self._is_tag_folder():
            what = " (--overwrite only replaces an earlier `nxtrec tag` output)" if overwrite else ""
            raise TagOutputError(f"--out {self.folder}: not empty and not an nxtrec tag folder{what}; "
                                 "choose another folder")  # fmt: skip
        manifest = None if overwrite else self.read_manifest()
        if manifest is None:
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

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's lock (`.nxtrec.lock`, flock: the kernel lets go when the holder
        dies, so a killed job's lock is simply taken over); a second job is refused."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TagOutputError(f"--out {self.folder}: cannot create ({e.strerror})") from None
        with folder_lock(self.folder, "tag"):
            yield

    def prepare(self, settings: dict, overwrite: bool, roots: dict | None = None) -> list[str]:
        """Create the folder (after removing our files when overwriting) and its manifest;
        remove the parts whose bytes do not match their sidecars (returned, one line each)."""
        if overwrite and self.folder.is_dir() and self._is_tag_folder():
            for path in self.folder.iterdir():
                if PART_RE.match(path.name) or path.name in (MANIFEST, ERRORS):
                    path.unlink()
            shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True, exist_ok=True)
        stale = [p for p in self.folder.iterdir() if TMP_RE.match(p.name)] + list(self.state.glob("*.tmp"))
        for path in stale:
            path.unlink(missing_ok=True)  # left by a killed run
        damaged = []
        for part, reason in self._damaged_parts():
            damaged.append(f"{self.part_path(part)}: {reason}; its images are tagged again")
            self.part_path(part).unlink(missing_ok=True)
            self._sidecar(part).unlink(missing_ok=True)
        manifest = self.read_manifest() or {}
        roots = {**manifest.get("roots", {}), **(roots or {})}
        _write_json(self.folder / MANIFEST, {**manifest, "format": MANIFEST_FORMAT, "status": "running",
                                             "settings": settings, "roots": roots})  # fmt: skip
        return damaged

    def _written_parts(self) -> list[int]:
        return sorted(
            int(m.group(1)) for path in self.folder.glob(f"part-*.{self.fmt}")
            if (m := PART_RE.match(path.name)) and self._sidecar(int(m.group(1))).is_file()
        )  # fmt: skip

    def _damage(self, part: int) -> str | None:
        """Why part `part` cannot be trusted (its bytes do not match its sidecar), or None."""
        path = self.part_path(part)
        try:
            st = path.stat()
            if self._verified.get(part) == (st.st_size, st.st_mtime_ns):
                return None
            side = json.loads(self._sidecar(part).read_text(encoding="utf-8"))
            data = path.read_bytes()
        except (OSError, ValueError) as e:
            return f"unreadable ({e})"
        want = side.get("records", side.get("images", 0) - side.get("failed", 0))
        got = _count_records(data, path.suffix)
        if got != want:
            return f"{'unreadable' if got is None else got} of {want} records (truncated or damaged)"
        if "sha256" in side and (len(data), hashlib.sha256(data).hexdigest()) != (side["bytes"], side["sha256"]):
            return "its bytes differ from those written (SHA-256)"
        self._verified[part] = (st.st_size, st.st_mtime_ns)
        return None

    def _damaged_parts(self) -> list[tuple[int, str]]:
        return [(part, reason) for part in self._written_parts() if (reason := self._damage(part)) is not None]

    def done_parts(self) -> set[int]:
        """The finished parts: on disk with a sidecar that their bytes match."""
        return {part for part in self._written_parts() if self._damage(part) is None}

    def write_part(self, part: int, results: list[TagResult], fingerprints: Sequence[dict | None]) -> None:
        errors = [{"id": r.id, "reason": r.error} for r in results if r.error is not None]
        inputs = [[r.id, fp] for r, fp in zip(results, fingerprints, strict=True)]
        tagged = [r for r in results if r.error is None]
        if self.fmt == "parquet":
            data = parquet_bytes([r.to_record() for r in tagged], self.model)
        else:
            data = format_part(tagged, self.fmt).encode("utf-8")
        _write_json(self._sidecar(part), {"images": len(results), "failed": len(errors), "errors": errors,
                                          "inputs": inputs, "records": len(results) - len(errors), "bytes": len(data),
                                          "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
        write_atomic(self.part_path(part), data)

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
               extra: dict, shard_errors: Sequence[dict] = ()) -> dict:  # fmt: skip
        """Write errors.jsonl (the current records' errors, then the damaged shards of this
        run's inputs) and the final manifest: counts, superseded records (per part file) and
        removed ids. Returns the counts."""
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
        lines = [json.dumps(e, ensure_ascii=False) + "\n" for e in [*errors, *shard_errors]]
        write_atomic(self.folder / ERRORS, "".join(lines).encode("utf-8"))
        parts_done, left = len({e.part for e in entries}), picks.count(None)
        counts = {"images": len(current), "tagged": len(current) - len(errors), "failed": len(errors),
                  "parts_done": parts_done, "parts": parts_done + -(-left // settings["options"]["part_size"]),
                  "superseded": sum(map(len, superseded.values())), "removed": len(removed),
                  "shard_errors": len(shard_errors)}  # fmt: skip
        manifest = {**(self.read_manifest() or {}), "format": MANIFEST_FORMAT, "settings": settings,
                    "status": "incomplete" if left else "complete", "counts": counts,
                    "superseded": dict(superseded), "removed": sorted(removed), **extra}  # fmt: skip
        _write_json(self.folder / MANIFEST, manifest)
        return counts
