"""The output folder of `nxtrec tag`: numbered part files written atomically, the resume
state, errors.jsonl and manifest.json.

Part p holds the results of inputs [p * part_size, (p + 1) * part_size). Its file appears by
an atomic rename, after its sidecar `.tag/part-NNNNN.json` (counts and errors): a part file
on disk is a finished part, anything else is redone, so a killed run resumes without losing
or repeating a record. manifest.json keeps the settings the folder was started with; a rerun
with other settings is refused unless the caller overwrites."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

from nxtrec.data.shards import write_json_atomic
from nxtrec.errors import NxtrecError
from nxtrec.tagging.pipeline import TagResult

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
STATE_DIR = ".tag"
MANIFEST_FORMAT = "nxtrec-tag/1"
FORMATS = ("jsonl", "csv")
PART_RE = re.compile(r"^part-(\d{5,})\.(jsonl|csv)$")


class TagOutputError(NxtrecError):
    pass


def format_part(results: list[TagResult], fmt: str) -> str:
    """jsonl: one record per tagged image. csv: `id,label,prob`, one row per label."""
    if fmt == "jsonl":
        return "".join(json.dumps(r.to_record(), ensure_ascii=False) + "\n" for r in results)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "label", "prob"])
    writer.writerows([r.id, lab.label, repr(lab.prob)] for r in results for lab in r.labels)
    return buf.getvalue()


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

    def check(self, settings: dict, overwrite: bool) -> None:
        """Refuse to mix results of different settings, or to write into someone else's folder."""
        if overwrite or not self.folder.exists():
            return
        if not self.folder.is_dir():
            raise TagOutputError(f"--out {self.folder}: exists and is not a folder")
        manifest = self.read_manifest()
        if manifest is None:
            if any(self.folder.iterdir()):
                raise TagOutputError(f"--out {self.folder}: not empty and not an nxtrec tag folder; choose another folder")
            return
        diff = _differences(manifest.get("settings", {}), settings)
        if diff:
            raise TagOutputError(
                f"{self.folder} was tagged with other settings ({'; '.join(diff)}); rerun with the same "
                "inputs and options to resume, or pass --overwrite to start over"
            )

    def prepare(self, settings: dict, overwrite: bool) -> None:
        """Create the folder (after removing our files when overwriting) and its manifest."""
        if overwrite and self.folder.is_dir():
            for path in self.folder.iterdir():
                if PART_RE.match(path.name) or path.name in (MANIFEST, ERRORS):
                    path.unlink()
            shutil.rmtree(self.state, ignore_errors=True)
        self.state.mkdir(parents=True, exist_ok=True)
        for stale in [*self.folder.glob("*.tmp"), *self.state.glob("*.tmp")]:
            stale.unlink(missing_ok=True)  # left by a killed run
        if self.read_manifest() is None:
            write_json_atomic(self.folder / MANIFEST, {"format": MANIFEST_FORMAT, "status": "running", "settings": settings})

    def done_parts(self) -> set[int]:
        return {
            int(m.group(1)) for path in self.folder.glob(f"part-*.{self.fmt}")
            if (m := PART_RE.match(path.name)) and self._sidecar(int(m.group(1))).is_file()
        }  # fmt: skip

    def write_part(self, part: int, results: list[TagResult]) -> None:
        errors = [{"id": r.id, "reason": r.error} for r in results if r.error is not None]
        write_json_atomic(self._sidecar(part), {"images": len(results), "failed": len(errors), "errors": errors})
        _write_text_atomic(self.part_path(part), format_part([r for r in results if r.error is None], self.fmt))

    def finish(self, settings: dict, num_parts: int, extra: dict) -> dict:
        """Merge the finished parts' errors into errors.jsonl and write the final manifest.
        Returns the counts over all finished parts (earlier runs included)."""
        done = sorted(p for p in self.done_parts() if p < num_parts)
        counts = {"images": 0, "tagged": 0, "failed": 0, "parts_done": len(done), "parts": num_parts}
        lines = []
        for part in done:
            side = json.loads(self._sidecar(part).read_text(encoding="utf-8"))
            counts["images"] += side["images"]
            counts["failed"] += side["failed"]
            lines += [json.dumps(e, ensure_ascii=False) + "\n" for e in side["errors"]]
        counts["tagged"] = counts["images"] - counts["failed"]
        _write_text_atomic(self.folder / ERRORS, "".join(lines))
        status = "complete" if len(done) == num_parts else "incomplete"
        manifest = {"format": MANIFEST_FORMAT, "status": status, "settings": settings, "counts": counts, **extra}
        write_json_atomic(self.folder / MANIFEST, manifest)
        return counts
