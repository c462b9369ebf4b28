"""`nxtrec tag --merge OUT`: check that the shard folders under OUT (`--shard-id I
--num-shards N` jobs, nxtrec.tagging.split) hold every shard of one collection exactly once,
each complete and tagged with the same settings, then write OUT/manifest.json (the shards,
their part files and the summed counts) and OUT/errors.jsonl. Nothing is copied: the part
files stay in the shard folders, and `read_records(OUT)` reads them through the manifest.
A problem is one line each; with any, nothing is written."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nxtrec.data.shards import folder_lock
from nxtrec.errors import NxtrecError
from nxtrec.tagging.output import (
    ERRORS,
    MANIFEST,
    MERGED_FORMAT,
    PART_RE,
    TagOutput,
    write_atomic,
)
from nxtrec.tagging.split import SHARD_DIR_RE, shard_folder, shard_size

SIDECAR_RE = re.compile(r"^part-(\d{5,})\.json$")


class TagMergeError(NxtrecError):
    """The shards cannot be merged; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__(f"{len(problems)} problem(s) with the shards:\n" + "\n".join(problems))
        self.problems = problems


@dataclass
class ShardFolder:
    folder: Path
    shard_id: int
    num_shards: int
    manifest: dict


def _read_shard(folder: Path, problems: list[str]) -> ShardFolder | None:
    m = SHARD_DIR_RE.match(folder.name)
    manifest = TagOutput(folder).read_manifest()
    if manifest is None:
        problems.append(f"{folder}: no manifest of `nxtrec tag` (its job has not started, or is not one)")
        return None
    shard = manifest.get("settings", {}).get("options", {}).get("shard")
    named = [int(m.group(1)), int(m.group(2))]
    if shard != named:
        problems.append(f"{folder}: its manifest says shard {shard!r}, its name {named} (renamed or copied?)")
        return None
    return ShardFolder(folder, named[0], named[1], manifest)


def _unsharded(settings: dict) -> dict:
    options = {k: v for k, v in settings.get("options", {}).items() if k != "shard"}
    return {**settings, "options": options}


def _main_count(shards: list[ShardFolder], problems: list[str]) -> int:
    """The --num-shards of most folders; a folder of another count (a rerun with another N)
    holds images that those also hold: one line each."""
    counts = [s.num_shards for s in shards]
    n = max(sorted(set(counts)), key=counts.count)
    for s in shards:
        if s.num_shards != n:
            problems.append(f"{s.folder}: of --num-shards {s.num_shards}, the others of {n}: its images are "
                            "duplicated there; remove the folders of one run")  # fmt: skip
    return n


def _damaged_parts(shard: ShardFolder) -> list[str]:
    """The part files of a shard that are gone or do not match their checksums."""
    output = TagOutput(shard.folder, shard.manifest["settings"]["options"]["format"])
    done = {output.part_path(p).name for p in output.done_parts()}
    written = {output.part_path(int(m.group(1))).name for p in output.state.glob("part-*.json")
               if (m := SIDECAR_RE.match(p.name))}  # fmt: skip
    on_disk = {p.name for p in shard.folder.iterdir() if PART_RE.match(p.name)}
    return sorted((written | on_disk) - done)


def check_shards(out: Path, shards: list[ShardFolder], problems: list[str]) -> None:
    """Append one line per missing, duplicated, unfinished, damaged or mismatched shard."""
    n = _main_count(shards, problems)
    by_id = {s.shard_id: s for s in shards if s.num_shards == n}
    reference = _unsharded(shards[0].manifest["settings"])
    total, part_size = reference["inputs"]["count"], reference["options"]["part_size"]
    for i in range(n):
        name, shard = f"shard {i} of {n}", by_id.get(i)
        if shard is None:
            problems.append(f"{name}: missing (no {shard_folder(out, i, n)}): run its job")
            continue
        counts = shard.manifest.get("counts", {})
        if _unsharded(shard.manifest["settings"]) != reference:
            problems.append(f"{name}: tagged with other settings or inputs than {shards[0].folder.name}")
        elif shard.manifest.get("status") != "complete":
            problems.append(f"{name}: not finished ({counts.get('parts_done', 0)} of {counts.get('parts', '?')} "
                            "parts): rerun its job to resume")  # fmt: skip
        elif counts["images"] != (want := shard_size(total, part_size, i, n)):
            problems.append(f"{name}: {counts['images']} images, {want} expected")
        elif damaged := _damaged_parts(shard):
            problems.append(f"{name}: {', '.join(damaged)} gone or damaged: rerun its job to redo them")


def _merged_manifest(shards: list[ShardFolder]) -> dict:
    keys = ("images", "tagged", "failed", "parts", "superseded", "removed")
    counts = {k: sum(s.manifest["counts"].get(k, 0) for s in shards) for k in keys}
    entries = []
    for s in shards:
        parts = sorted(p.name for p in s.folder.iterdir() if PART_RE.match(p.name))
        entries.append({"id": s.shard_id, "folder": s.folder.name, "counts": s.manifest["counts"], "parts": parts})
    return {"format": MERGED_FORMAT, "status": "complete", "num_shards": len(shards),
            "settings": _unsharded(shards[0].manifest["settings"]), "counts": counts, "shards": entries}  # fmt: skip


def _merged_errors(shards: list[ShardFolder]) -> bytes:
    """The shards' errors.jsonl in shard order; a damaged tar every shard reported, once."""
    lines, seen = [], set()
    for s in shards:
        path = s.folder / ERRORS
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            error = json.loads(line)
            if error.get("shard"):
                if error["id"] in seen:
                    continue
                seen.add(error["id"])
            lines.append(line + "\n")
    return "".join(lines).encode("utf-8")


def merge_shards(out: str | Path) -> dict:
    """Check the shard folders under `out` and write its merged manifest (returned) and errors."""
    out = Path(out)
    if not out.is_dir():
        raise NxtrecError(f"--merge {out}: no such folder")
    folders = sorted(p for p in out.iterdir() if p.is_dir() and SHARD_DIR_RE.match(p.name))
    if not folders:
        raise NxtrecError(f"--merge {out}: no shard folders (shard-IIIII-of-NNNNN) of `nxtrec tag --shard-id`")
    problems: list[str] = []
    with folder_lock(out, "tag --merge"):
        shards = []
        for folder in folders:
            with folder_lock(folder, "tag --merge"):  # refused while that shard's job runs
                shards.append(_read_shard(folder, problems))
        shards = [s for s in shards if s is not None]
        if shards:
            check_shards(out, shards, problems)
        if problems:
            raise TagMergeError(problems)
        shards.sort(key=lambda s: s.shard_id)
        manifest = _merged_manifest(shards)
        write_atomic(out / ERRORS, _merged_errors(shards))
        write_atomic(out / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return manifest
