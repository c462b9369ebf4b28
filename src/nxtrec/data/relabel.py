"""`nxtrec labels add`: write labels (from the captions) into the JSON metadata of existing
shards, shard by shard, resumably."""

from __future__ import annotations

import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from nxtrec.data.pack import PackSummary, ShardResult, label_entry, run_tasks
from nxtrec.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    bytes_member,
    folder_lock,
    list_tars,
    member_ext,
    read_manifest,
    read_member,
    removed_on_error,
    shard_is_done,
    tar_samples,
    write_json_atomic,
)
from nxtrec.errors import NxtrecError


@dataclass
class LabelTask:
    src: str
    dst: str
    backend: str
    compat: bool

    @property
    def name(self) -> str:
        return Path(self.dst).name


def _caption_of(members: dict[str, bytes], meta: dict) -> str:
    if "txt" in members:
        return members["txt"].decode("utf-8", errors="replace")
    return str(meta.get("caption") or meta.get("cap") or "")


def label_shard(task: LabelTask, on_record: Callable[[], None] = lambda: None) -> ShardResult:
    """Rewrite one shard with `labels` added to every KEY.json (created when missing). All
    other members are copied byte for byte; the new tar replaces `dst` atomically."""
    from nxtrec.data.labels import extract_labels_batch

    samples = []  # (key, {ext: bytes of txt/json}, json member or None)
    damage: list[str] = []
    for key, members, tf in tar_samples(Path(task.src), damage):
        texts = {member_ext(m): read_member(tf, m) for m in members if member_ext(m) in ("txt", "json")}
        json_member = next((m for m in members if member_ext(m) == "json"), None)
        samples.append((key, texts, json_member))
    if damage:  # rewriting it would drop what follows the damage for good: leave it to the user
        return ShardResult(Path(task.dst).name, 0, 0, Counter(), {}, damage="; ".join(damage))
    metas, skipped, examples = [], Counter(), {}
    for key, texts, _ in samples:
        try:
            meta = json.loads(texts["json"]) if "json" in texts else {}
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            skipped["bad json (replaced)"] += 1
            examples.setdefault("bad json (replaced)", f"{task.src}: {key}.json: {e}")
            meta = {}
        metas.append(meta)
    captions = [_caption_of(texts, meta) for (_, texts, _), meta in zip(samples, metas)]
    labels = extract_labels_batch(captions, task.backend, task.compat)
    new_json = {}
    for (key, _, _), meta, sample_labels in zip(samples, metas, labels):
        meta["labels"] = sample_labels
        new_json[key] = json.dumps(meta, ensure_ascii=False).encode("utf-8")

    dst = Path(task.dst)
    tmp = Path(str(dst) + ".tmp")
    with removed_on_error(tmp), open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w") as out:
            for key, members, tf in tar_samples(Path(task.src)):
                for m in members:
                    if member_ext(m) == "json":
                        out.addfile(*bytes_member(m.name, new_json[key], like=m))
                    else:
                        out.addfile(m, tf.extractfile(m))
                if not any(member_ext(m) == "json" for m in members):
                    out.addfile(*bytes_member(f"{key}.json", new_json[key], like=members[0]))
                on_record()
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, dst)
    return ShardResult(dst.name, len(samples), dst.stat().st_size, skipped, examples)


def add_labels(
    folder: Path,
    out: Optional[Path] = None,
    backend: str = "spacy",
    compat: bool = False,
    workers: int = 1,
    progress: bool = True,
) -> PackSummary:
    """Add `labels` to the samples of the shards in `folder` (img2dataset output or ours),
    in place or into `out`. Resumable: shards the destination manifest lists with the same
    label setting are skipped."""
    from tqdm import tqdm

    from nxtrec.data.labels import label_setting

    start = time.monotonic()
    folder = Path(folder)
    dest = Path(out) if out else folder
    shards = list_tars(folder)
    if not shards:
        raise NxtrecError(f"{folder}: no .tar shards")
    dest.mkdir(parents=True, exist_ok=True)
    setting = label_setting(backend, compat)
    manifest = read_manifest(dest) or read_manifest(folder) or {"format": MANIFEST_FORMAT, "shards": {}}
    manifest = json.loads(json.dumps(manifest))  # a copy: `folder`'s manifest stays as it is
    manifest["labels"] = label_entry(backend, compat)
    manifest["complete"] = False
    entries = manifest.setdefault("shards", {})
    tasks = [
        LabelTask(str(p), str(dest / p.name), backend, compat)
        for p in shards
        if not (entries.get(p.name, {}).get("labels") == setting and shard_is_done(dest, manifest, p.name))
    ]
    summary = PackSummary(dest, len(shards), len(shards) - len(tasks))
    with folder_lock(dest, "labels add"), tqdm(unit="sample", desc="labels", disable=None if progress else True,
                                               dynamic_ncols=True) as bar:  # fmt: skip
        for result in run_tasks(tasks, label_shard, workers, bar):
            summary.add(result)
            if result.damage:
                continue
            entries[result.name] = dict(
                entries.get(result.name, {}),
                samples=result.samples,
                bytes=result.bytes,
                labels=setting,
            )
            write_json_atomic(dest / MANIFEST_NAME, manifest)
    manifest["complete"] = all(entries.get(p.name, {}).get("labels") == setting for p in shards)
    write_json_atomic(dest / MANIFEST_NAME, manifest)
    summary.seconds = time.monotonic() - start
    return summary
