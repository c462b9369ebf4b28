"""Pack image-caption datasets into WebDataset shards with their labels (`nxtrec pack`).

A shard `NNNNNN.tar` holds, per sample, `KEY.jpg` (or .png/.webp), `KEY.txt` (the caption)
and `KEY.json` ({"caption", "source", "split", "labels"}). `manifest.json` beside the shards
records the sample count of every finished shard, how the labels were made and what was
skipped.

Packing is deterministic and resumable: records are sorted by key and cut into shards of a
fixed size, each shard is written to `NNNNNN.tar.tmp` and renamed when complete (so a killed
run never leaves a half shard under a final name), and a re-run skips the shards the
manifest lists. Byte-identical shards come out of identical inputs."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from nxtrec.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    TAR_MTIME,
    folder_lock,
    read_manifest,
    removed_on_error,
    shard_is_done,
    write_json_atomic,
)
from nxtrec.data.sources import Record
from nxtrec.errors import NxtrecError

STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> kept as is


def encode_image(path: str, resize_shorter: Optional[int], quality: int) -> tuple[bytes, str]:
    """The bytes to store for an image and their extension. The image is fully decoded
    first (a corrupt or truncated file raises ImageError). Bytes are kept as they are
    unless the shorter side exceeds `resize_shorter` (then resized, bicubic, and stored as
    JPEG) or the format is not one the loader reads (then stored as JPEG)."""
    from PIL import Image

    from nxtrec.model.image import load_image, resize_shorter_side

    img = load_image(path)
    data = Path(path).read_bytes()
    if resize_shorter and min(img.size) > resize_shorter:
        img = resize_shorter_side(img, resize_shorter)
    else:
        fmt = Image.open(io.BytesIO(data)).format
        if fmt in STORED_FORMATS:
            return data, STORED_FORMATS[fmt]
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), "jpg"


@dataclass
class PackOptions:
    shard_size: int = 1000
    resize_shorter: Optional[int] = None  # None: store images as they are
    quality: int = 95  # JPEG quality when re-encoding
    backend: str = "spacy"
    compat: bool = False


@dataclass
class ShardResult:
    name: str
    samples: int
    bytes: int
    skipped: Counter
    examples: dict[str, str]  # reason -> one message, for the summary
    damage: str = ""  # a damaged input shard, left as it is (labels add)


@dataclass
class PackSummary:
    out: Path
    shards: int = 0
    shards_done_before: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    damaged: dict[str, str] = field(default_factory=dict)  # shard name -> what is wrong

    def add(self, result: ShardResult) -> None:
        if result.damage:
            self.damaged[result.name] = result.damage
        self.written += result.samples
        self.skipped.update(result.skipped)
        for reason, message in result.examples.items():
            self.examples.setdefault(reason, message)

    def format(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"wrote {self.written} samples into {self.shards - self.shards_done_before} shards of {self.out} "
            f"in {self.seconds:.1f}s ({rate:.1f} samples/s)"
        ]
        if self.shards_done_before:
            lines.append(f"{self.shards_done_before} of {self.shards} shards were already finished (resumed)")
        total = sum(self.skipped.values())
        lines.append(f"skipped {total} records" + (":" if total else ""))
        for reason, n in self.skipped.most_common():
            lines.append(f"  {reason}: {n} (e.g. {self.examples.get(reason, '')})")
        if self.damaged:
            lines.append(f"{len(self.damaged)} damaged shards left unchanged (not labelled, not marked done):")
            lines += [f"  {name}: {reason}" for name, reason in sorted(self.damaged.items())]
        return "\n".join(lines)


@dataclass
class ShardTask:
    out: str
    index: int
    records: list[Record]
    split: str
    options: PackOptions

    @property
    def name(self) -> str:
        return f"{self.index:06d}.tar"


def _sample(key: str, ext: str, image: bytes, meta: dict) -> dict:
    return {
        "__key__": key,
        ext: image,
        "txt": meta["caption"].encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }


def pack_shard(task: ShardTask, on_record: Callable[[], None] = lambda: None) -> ShardResult:
    """Write one shard atomically: to NNNNNN.tar.tmp, renamed when complete."""
    import webdataset as wds

    from nxtrec.data.labels import extract_labels_batch
    from nxtrec.model.image import ImageError

    opts = task.options
    captions = [(r.caption or "").strip() for r in task.records]
    labels = extract_labels_batch(captions, opts.backend, opts.compat)
    skipped, examples = Counter(), {}
    path = Path(task.out) / task.name
    tmp = Path(str(path) + ".tmp")
    written = 0
    with removed_on_error(tmp, lambda: _input_bytes(task.records)), open(tmp, "wb") as f:
        with wds.TarWriter(f, encoder=False, mtime=TAR_MTIME) as writer:
            for record, caption, record_labels in zip(task.records, captions, labels):
                reason = None
                if record.caption is None:
                    reason, message = "no caption", f"{record.source}: no caption"
                elif not caption:
                    reason, message = "empty caption", f"{record.source}: empty caption"
                elif not os.path.exists(record.image):
                    reason, message = "missing image", f"{record.image}: no such file"
                else:
                    try:
                        image, ext = encode_image(record.image, opts.resize_shorter, opts.quality)
                    except (ImageError, OSError) as e:
                        reason, message = "bad image", str(e)
                if reason:
                    skipped[reason] += 1
                    examples.setdefault(reason, message)
                else:
                    meta = {"caption": caption, "source": record.source, "split": task.split, "labels": record_labels,
                            **record.extra}
                    writer.write(_sample(record.key, ext, image, meta))
                    written += 1
                on_record()
        f.flush()
        os.fsync(f.fileno())
        os.replace(tmp, path)
    return ShardResult(task.name, written, path.stat().st_size, skipped, examples)


def _input_bytes(records) -> int:
    """About the size of a shard of `records`: their image files."""
    total = 0
    for r in records:
        with contextlib.suppress(OSError, TypeError):
            total += os.path.getsize(r.image)
    return total


def remove_partial_shards(out: Path) -> None:
    """Delete the `*.tar.tmp` files of an interrupted pack (the caller holds the folder lock,
    so they are all its own): a worker stopped by the pool (another worker failed) leaves
    its partial shard behind."""
    for tmp in Path(out).glob("*.tar.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


_worker_counter = None  # records done, shared with the parent for the progress bar


def _init_worker(counter) -> None:
    global _worker_counter
    _worker_counter = counter


def _count_record() -> None:
    with _worker_counter.get_lock():
        _worker_counter.value += 1


def _run_in_worker(work_and_task):
    work, task = work_and_task
    return work(task, _count_record)


def run_tasks(tasks: list, work, workers: int, progress) -> Iterator:
    """Results of `work(task, on_record)` for every task, in completion order, on `workers`
    processes (in this process when 1); `progress.update(n)` is called as records finish."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield work(task, lambda: progress.update(1))
        return
    ctx = multiprocessing.get_context()
    counter = ctx.Value("q", 0)
    seen = 0
    with ctx.Pool(min(workers, len(tasks)), initializer=_init_worker, initargs=(counter,)) as pool:
        results = pool.imap_unordered(_run_in_worker, [(work, task) for task in tasks])
        while True:
            try:
                result = results.next(timeout=0.25)
            except multiprocessing.TimeoutError:
                result = None
            except StopIteration:
                break
            done = counter.value
            progress.update(done - seen)
            seen = done
            if result is not None:
                yield result
    progress.update(counter.value - seen)


def _records_digest(records: list[Record]) -> str:
    h = hashlib.sha1()
    for r in records:
        h.update(json.dumps([r.key, r.source, r.caption, r.extra], sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def label_entry(backend: str, compat: bool) -> dict:
    """The manifest's `labels` entry: the label setting and the tagger that produced the labels."""
    from nxtrec.data.labels import get_tagger, label_setting

    return {"setting": label_setting(backend, compat), "tagger": get_tagger(backend).description}


def pack(
    records: list[Record],
    out: Path,
    kind: str,
    split: str = "",
    options: Optional[PackOptions] = None,
    workers: int = 1,
    progress: bool = True,
) -> PackSummary:
    """Pack `records` into shards under `out`, skipping shards a previous run finished.
    The folder is locked meanwhile (a second packer into it is refused)."""
    opts = options or PackOptions()
    if opts.shard_size < 1:
        raise NxtrecError(f"shard size must be at least 1, not {opts.shard_size}")
    start = time.monotonic()
    records = sorted(records, key=lambda r: r.key)
    dupes = [a.key for a, b in zip(records, records[1:]) if a.key == b.key]
    if dupes:
        raise NxtrecError(f"{len(dupes)} records share a key with another (first: {dupes[0]!r}); keys must be unique")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NxtrecError(f"{out}: exists and is not a folder; --out takes a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NxtrecError(f"{out}: cannot create the output folder ({e.strerror})") from None
    with folder_lock(out, f"pack {kind}"):
        return _pack_locked(records, out, kind, split, opts, workers, progress, start)


def _pack_locked(records, out: Path, kind: str, split: str, opts: PackOptions, workers: int, progress: bool,
                 start: float) -> PackSummary:
    from tqdm import tqdm

    wanted = {
        "format": MANIFEST_FORMAT,
        "source": {"kind": kind, "split": split, "records": len(records), "digest": _records_digest(records)},
        "options": {"shard_size": opts.shard_size, "resize_shorter": opts.resize_shorter, "quality": opts.quality},
        "labels": label_entry(opts.backend, opts.compat),
    }
    manifest = read_manifest(out)
    if manifest is None:
        manifest = dict(wanted, shards={}, complete=False)
    else:
        for part in ("source", "options"):
            if manifest.get(part) != wanted[part]:
                raise NxtrecError(
                    f"{out} holds shards packed from other inputs or options ({part}: {manifest.get(part)} "
                    f"vs now {wanted[part]}); pack into a new --out folder, or delete {out}"
                )
        if manifest["labels"]["setting"] != wanted["labels"]["setting"]:
            raise NxtrecError(
                f"{out} was packed with labels {manifest['labels']['setting']!r}, not "
                f"{wanted['labels']['setting']!r}; use the same --backend/--compat, or a new --out folder"
            )
    size = opts.shard_size
    tasks = [
        ShardTask(str(out), i, records[i * size : (i + 1) * size], split, opts)
        for i in range((len(records) + size - 1) // size)
    ]
    todo = [t for t in tasks if not shard_is_done(out, manifest, t.name)]
    summary = PackSummary(out, len(tasks), len(tasks) - len(todo))
    done_records = len(records) - sum(len(t.records) for t in todo)
    with tqdm(total=len(records), initial=done_records, unit="sample", desc=f"pack {kind}",
              disable=None if progress else True, dynamic_ncols=True) as bar:  # fmt: skip
        results = run_tasks(todo, pack_shard, workers, bar)
        try:
            with contextlib.closing(results):  # stops the worker pool before the clean-up below
                for result in results:
                    manifest["shards"][result.name] = {
                        "samples": result.samples,
                        "bytes": result.bytes,
                        "labels": wanted["labels"]["setting"],
                        "skipped": dict(result.skipped),
                    }
                    write_json_atomic(out / MANIFEST_NAME, manifest)
                    summary.add(result)
                    bar.set_postfix(skipped=sum(summary.skipped.values()), refresh=False)
        except BaseException:
            remove_partial_shards(out)
            raise
    manifest["complete"] = True
    write_json_atomic(out / MANIFEST_NAME, manifest)
    summary.seconds = time.monotonic() - start
    return summary
