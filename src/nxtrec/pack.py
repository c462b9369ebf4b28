"""Pack image-caption datasets into WebDataset shards with their labels, and add labels to
existing shards (img2dataset output).

A shard `NNNNNN.tar` holds, per sample, `KEY.jpg` (or .png/.webp), `KEY.txt` (the caption)
and `KEY.json` ({"caption", "source", "split", "labels"}). `manifest.json` beside the shards
records the sample count of every finished shard, how the labels were made and what was
skipped.

Packing is deterministic and resumable: records are sorted by key and cut into shards of a
fixed size, each shard is written to `NNNNNN.tar.tmp` and renamed when complete (so a killed
run never leaves a half shard under a final name), and a re-run skips the shards the
manifest lists. Byte-identical shards come out of identical inputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from nxtrec.errors import NxtrecError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "nxtrec-shards/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members the loader reads
STORED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> kept as is
TAR_MTIME = 1_700_000_000  # fixed member time: identical inputs give identical shards


# ---------------------------------------------------------------------------- sources


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


def _read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise NxtrecError(f"{path}: no such {what}") from None
    with f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise NxtrecError(f"{path}:{line_no}: not a JSON line ({e})") from None
            if not isinstance(obj, dict):
                raise NxtrecError(f"{path}:{line_no}: expected a JSON object")
            yield line_no, obj


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
    for line_no, obj in _read_jsonl(Path(narratives), "narratives file"):
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
    for line_no, obj in _read_jsonl(path, "JSONL file"):
        image = _field(obj, "image", path, line_no)
        caption = _field(obj, "caption", path, line_no)
        key = obj.get("key") or f"{line_no:09d}"
        records.append(Record(safe_key(str(key)), str(root / image), caption, image))
    return records


def folder_records(folder: Path) -> list[Record]:
    """Every image under `folder` with the caption in the same-name .txt beside it; key =
    the relative path without extension."""
    from nxtrec.image import list_images

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


# ---------------------------------------------------------------------------- manifests


def read_manifest(folder: Path) -> Optional[dict]:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NxtrecError(f"{path}: unreadable manifest ({e}); delete it to rebuild") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None  # someone else's manifest.json: ignore it
    return manifest


def write_json_atomic(path: Path, obj) -> None:
    tmp = Path(f"{path}.{os.getpid()}.tmp")  # per process: ranks may write a count cache at once
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def shard_is_done(folder: Path, manifest: dict, name: str) -> bool:
    """Listed in the manifest and still the size it had when written."""
    entry = manifest.get("shards", {}).get(name)
    path = Path(folder) / name
    return entry is not None and path.is_file() and path.stat().st_size == entry["bytes"]


# ---------------------------------------------------------------------------- tar reading


def tar_samples(path: Path) -> Iterator[tuple[str, list[tarfile.TarInfo], tarfile.TarFile]]:
    """(key, members, open tar) per sample, reading headers only (image data is seeked
    over). Members are grouped exactly as webdataset groups them (consecutive members whose
    names share the part before the first dot of the base name), so counts agree with the
    loader. A truncated tar ends at its last complete member."""
    from webdataset.tariterators import base_plus_ext

    size = os.path.getsize(path)
    with tarfile.open(path, "r:") as tf:
        key, members = None, []
        while True:
            try:
                member = tf.next()
            except tarfile.ReadError:
                break
            if member is None or member.offset_data + member.size > size:
                break
            if not member.isreg() or re.match(r"__[^/]*__($|/)", member.name):
                continue
            prefix, _ = base_plus_ext(member.name)
            if prefix is None:
                continue
            if prefix != key and members:
                yield key, members, tf
                members = []
            key = prefix
            members.append(member)
        if members:
            yield key, members, tf


def member_ext(member: tarfile.TarInfo) -> str:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(member.name)[1].lower()


def read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    return tf.extractfile(member).read()


# ---------------------------------------------------------------------------- images


def encode_image(path: str, resize_shorter: Optional[int], quality: int) -> tuple[bytes, str]:
    """The bytes to store for an image and their extension. The image is fully decoded
    first (a corrupt or truncated file raises ImageError). Bytes are kept as they are
    unless the shorter side exceeds `resize_shorter` (then resized, bicubic, and stored as
    JPEG) or the format is not one the loader reads (then stored as JPEG)."""
    from PIL import Image

    from nxtrec.image import load_image, resize_shorter_side

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


# ---------------------------------------------------------------------------- packing


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


@dataclass
class PackSummary:
    out: Path
    shards: int = 0
    shards_done_before: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, result: ShardResult) -> None:
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

    from nxtrec.image import ImageError
    from nxtrec.labels import extract_labels_batch

    opts = task.options
    captions = [(r.caption or "").strip() for r in task.records]
    labels = extract_labels_batch(captions, opts.backend, opts.compat)
    skipped, examples = Counter(), {}
    path = Path(task.out) / task.name
    tmp = Path(str(path) + ".tmp")
    written = 0
    with open(tmp, "wb") as f:
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


def _label_entry(backend: str, compat: bool) -> dict:
    from nxtrec.labels import get_tagger, label_setting

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
    """Pack `records` into shards under `out`, skipping shards a previous run finished."""
    from tqdm import tqdm

    opts = options or PackOptions()
    if opts.shard_size < 1:
        raise NxtrecError(f"shard size must be at least 1, not {opts.shard_size}")
    start = time.monotonic()
    records = sorted(records, key=lambda r: r.key)
    dupes = [a.key for a, b in zip(records, records[1:]) if a.key == b.key]
    if dupes:
        raise NxtrecError(f"{len(dupes)} records share a key with another (first: {dupes[0]!r}); keys must be unique")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {
        "format": MANIFEST_FORMAT,
        "source": {"kind": kind, "split": split, "records": len(records), "digest": _records_digest(records)},
        "options": {"shard_size": opts.shard_size, "resize_shorter": opts.resize_shorter, "quality": opts.quality},
        "labels": _label_entry(opts.backend, opts.compat),
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
        for result in run_tasks(todo, pack_shard, workers, bar):
            manifest["shards"][result.name] = {
                "samples": result.samples,
                "bytes": result.bytes,
                "labels": wanted["labels"]["setting"],
                "skipped": dict(result.skipped),
            }
            write_json_atomic(out / MANIFEST_NAME, manifest)
            summary.add(result)
            bar.set_postfix(skipped=sum(summary.skipped.values()), refresh=False)
    manifest["complete"] = True
    write_json_atomic(out / MANIFEST_NAME, manifest)
    summary.seconds = time.monotonic() - start
    return summary


# ---------------------------------------------------------------------------- labels add


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
    from nxtrec.labels import extract_labels_batch

    samples = []  # (key, {ext: bytes of txt/json}, json member or None)
    for key, members, tf in tar_samples(Path(task.src)):
        texts = {member_ext(m): read_member(tf, m) for m in members if member_ext(m) in ("txt", "json")}
        json_member = next((m for m in members if member_ext(m) == "json"), None)
        samples.append((key, texts, json_member))
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
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w") as out:
            for key, members, tf in tar_samples(Path(task.src)):
                for m in members:
                    if member_ext(m) == "json":
                        out.addfile(*_bytes_member(m.name, new_json[key], like=m))
                    else:
                        out.addfile(m, tf.extractfile(m))
                if not any(member_ext(m) == "json" for m in members):
                    out.addfile(*_bytes_member(f"{key}.json", new_json[key], like=members[0]))
                on_record()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    return ShardResult(dst.name, len(samples), dst.stat().st_size, skipped, examples)


def _bytes_member(name: str, data: bytes, like: tarfile.TarInfo) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime, info.mode, info.uid, info.gid = like.mtime, like.mode, like.uid, like.gid
    info.uname, info.gname = like.uname, like.gname
    return info, io.BytesIO(data)


def list_tars(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise NxtrecError(f"{folder}: not a folder")
    return sorted(p for p in folder.glob("*.tar") if p.is_file())


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

    from nxtrec.labels import label_setting

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
    manifest["labels"] = _label_entry(backend, compat)
    manifest["complete"] = False
    entries = manifest.setdefault("shards", {})
    tasks = [
        LabelTask(str(p), str(dest / p.name), backend, compat)
        for p in shards
        if not (entries.get(p.name, {}).get("labels") == setting and shard_is_done(dest, manifest, p.name))
    ]
    summary = PackSummary(dest, len(shards), len(shards) - len(tasks))
    with tqdm(unit="sample", desc="labels", disable=None if progress else True, dynamic_ncols=True) as bar:
        for result in run_tasks(tasks, label_shard, workers, bar):
            entries[result.name] = dict(
                entries.get(result.name, {}),
                samples=result.samples,
                bytes=result.bytes,
                labels=setting,
            )
            write_json_atomic(dest / MANIFEST_NAME, manifest)
            summary.add(result)
    manifest["complete"] = all(entries.get(p.name, {}).get("labels") == setting for p in shards)
    write_json_atomic(dest / MANIFEST_NAME, manifest)
    summary.seconds = time.monotonic() - start
    return summary
