"""`nxtrec tag` as a job: the inputs without a current record (new, changed, or left by a
killed run) cut into parts, this rank's parts decoded in worker processes and labelled batch
by batch, each part written when complete, then (rank 0) the merged manifest. Under
torchrun, rank r takes parts r, r + world, ... of this run's plan."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from nxtrec.distributed import RankInfo, setup_distributed
from nxtrec.engines import capabilities_of, check_engine_choice, load_engine
from nxtrec.errors import NxtrecError
from nxtrec.inference.engine import DecodeOptions, Engine
from nxtrec.model.image import MAX_PIXELS_ENV, max_image_bytes, max_image_pixels
from nxtrec.tagging.confidence import tag_confidence_settings
from nxtrec.tagging.formats import check_format, finish_format, part_format, part_writer
from nxtrec.tagging.inputs import InputItem, collect_inputs, fingerprint, inputs_digest
from nxtrec.tagging.output import PartEntry, TagOutput, match_entries
from nxtrec.tagging.pipeline import batch_ranges, tag_batches
from nxtrec.tagging.prefetch import BatchDecoder, prefetched_batches
from nxtrec.tagging.progress import Progress
from nxtrec.tagging.split import shard_folder, shard_inputs, share


@dataclass
class TagOptions:
    out: str
    inputs: list[str] = field(default_factory=list)
    list_file: str | None = None
    shards: list[str] = field(default_factory=list)
    model: str | None = None
    onnx: str | None = None
    top_k: int = 10
    extra_k: int = 0
    ranking: str = "prob"
    compat: str | None = None  # "reference": the reference implementation's outputs
    min_prob: float = 0.0
    max_labels: int | None = None
    fmt: str = "jsonl"
    batch_size: int = 32
    part_size: int = 1000
    workers: int = 2
    processes: int = 1  # ranks started by `nxtrec tag --processes` (nxtrec.tagging.launch)
    device: str = "cpu"
    dtype: str = "float32"
    overwrite: bool = False
    update: bool = False  # the inputs may differ: tag new and changed images, list removed ones
    content_hash: bool = False  # tell changed images by their SHA-256 instead of size and time
    log_every: float = 30.0
    maps: bool = False  # each label's grounding map in the records (nxtrec.inference.attention)
    vocab: str | None = None  # a tag list to decode into (nxtrec.inference.vocab)
    map_to: str | None = None  # a tag list to map free labels to (nxtrec.inference.mapping)
    map_threshold: float = 0.5
    exclude: str | None = None  # labels to drop (nxtrec.inference.label_rules)
    replace: str | None = None  # `from -> to` label renames (nxtrec.inference.label_rules)
    calibration: str | None = None  # a calibration file (default: the model's own; nxtrec.inference.calibration)
    min_confidence: float = 0.0
    profile: str | None = None  # precision, balanced, recall: the calibration's thresholds
    xmp_name: str = "image"  # --format xmp: photo.jpg.xmp ("image") or photo.xmp ("stem")
    xmp_parent: str = "nxtrec"  # --format xmp: the parent of nxtrec's hierarchical keywords
    shard_id: int | None = None  # this job's shard of the collection (nxtrec.tagging.split)
    num_shards: int | None = None
    adapter: str | None = None  # an adapter folder of `nxtrec teach` (nxtrec.model.adapter)

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(top_k=self.top_k, extra_k=self.extra_k, ranking=self.ranking, maps=self.maps,
                             vocab=self.vocab, map_to=self.map_to, map_threshold=self.map_threshold,
                             compat=self.compat, min_prob=self.min_prob, exclude=self.exclude,
                             replace=self.replace, min_confidence=self.min_confidence,
                             profile=self.profile)  # fmt: skip

    def validate(self) -> None:
        for name in ("top_k", "batch_size", "part_size"):
            if getattr(self, name) < 1:
                raise NxtrecError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_labels is not None and self.max_labels < 1:
            raise NxtrecError("--max-labels must be at least 1")
        if self.workers < 0 or self.extra_k < 0:
            raise NxtrecError("--workers and --extra-k cannot be negative")
        check_engine_choice(self.model, self.onnx, self.device, self.dtype)
        self.decode_options().check(capabilities_of(onnx=bool(self.onnx)))
        if self.processes > 1 and self.onnx:
            raise NxtrecError("--onnx runs in one process; use the PyTorch path (--model) with --processes")
        if self.processes > 1 and self.list_file == "-":
            raise NxtrecError("--processes cannot share standard input (--list -); write the list to a file")
        if self.maps and self.fmt != "jsonl":
            raise NxtrecError("--maps needs --format jsonl")
        if self.update and self.overwrite:
            raise NxtrecError("--update keeps the records in --out and --overwrite discards them: choose one")
        if (self.shard_id is None) != (self.num_shards is None):
            raise NxtrecError("--shard-id and --num-shards go together")
        if self.num_shards is not None and not 0 <= self.shard_id < self.num_shards:
            raise NxtrecError(f"--shard-id must be from 0 to {self.num_shards - 1} (--num-shards {self.num_shards})")
        if self.num_shards is not None and self.fmt == "hf":  # one metadata.jsonl for all the images
            raise NxtrecError("--format hf writes one metadata.jsonl for the whole collection: tag it without "
                              "--num-shards, or shard with --format jsonl, csv or parquet")
        # a bad $NXTREC_MAX_IMAGE_PIXELS or $NXTREC_MAX_IMAGE_BYTES is one usage error, not a failure per image
        max_image_pixels(), max_image_bytes()

    def settings(self, items: list[InputItem]) -> dict:
        """Everything the records depend on: a folder is resumed only with the same settings.
        Batch size, workers and device change speed, not results, so they may change."""
        if self.onnx:
            model = f"onnx:{os.path.abspath(self.onnx)}"
        else:
            model = os.path.abspath(self.model) if self.model else "bundled default model"
        options = {"top_k": self.top_k, "extra_k": self.extra_k, "min_prob": self.min_prob, "max_labels": self.max_labels,
                   "format": self.fmt, "part_size": self.part_size, "dtype": self.dtype, "maps": self.maps}  # fmt: skip
        # only when not the default, so that folders written before these options resume
        options.update({"ranking": self.ranking} if self.ranking != "prob" else {})
        options.update({"compat": self.compat} if self.compat else {})
        options.update({"vocab": self.vocab} if self.vocab else {})
        options.update({"map_to": self.map_to, "map_threshold": self.map_threshold} if self.map_to else {})
        options.update({name: getattr(self, name) for name in ("exclude", "replace") if getattr(self, name)})
        options.update(tag_confidence_settings(self))  # only with a calibration: older folders resume
        options.update({"xmp_name": self.xmp_name, "xmp_parent": self.xmp_parent} if self.fmt == "xmp" else {})
        options.update({"shard": [self.shard_id, self.num_shards]} if self.num_shards is not None else {})
        options.update({"adapter": os.path.abspath(self.adapter)} if self.adapter else {})
        return {"model": model, "inputs": {"count": len(items), "sha256": inputs_digest(items)}, "options": options}


@dataclass
class TagSummary:
    counts: dict
    new_images: int
    seconds: float
    out: Path
    changed: int = 0  # of new_images: images that had a record before (changed, or retried)

    def line(self) -> str:
        c = self.counts
        rate = self.new_images / max(self.seconds, 1e-9)
        state = "" if c["parts_done"] == c["parts"] else f", {c['parts'] - c['parts_done']} parts left"
        state += f", {c['removed']} removed" if c.get("removed") else ""
        state += f", {c['shard_errors']} damaged shards" if c.get("shard_errors") else ""
        changed = f" ({self.changed} changed)" if self.changed else ""
        return (f"{c['images']} images ({c['tagged']} tagged, {c['failed']} failed{state}) in {self.out}; "
                f"this run: {self.new_images} images{changed} in {self.seconds:.1f} s, {rate:.1f} images/s")  # fmt: skip


@dataclass
class TagPlan:
    """This run's work: the inputs without a current record, cut into parts numbered from the
    lowest free number (a first run, or its resumption: part p = inputs p * size ...)."""

    todo: list[int]  # indices into the inputs, in input order
    numbers: list[int]  # part number of todo[j * size : (j + 1) * size]
    changed: int  # todo images that have a record already

    @classmethod
    def of(cls, inputs: list[tuple[str, dict | None]], entries: list[PartEntry], size: int,
           retry: Callable[[PartEntry], bool] | None = None) -> TagPlan:  # fmt: skip
        picks = match_entries(inputs, entries, retry)
        todo = [i for i, k in enumerate(picks) if k is None]
        finished, known = {e.part for e in entries}, {e.id for e in entries}
        free = (n for n in range(len(finished) + len(todo) + 1) if n not in finished)
        numbers = [next(free) for _ in range(-(-len(todo) // size))]
        return cls(todo, numbers, sum(inputs[i][0] in known for i in todo))


def _join_ranks(opts: TagOptions) -> tuple[RankInfo, str]:
    """This process's place under torchrun (one process by default) and the device it runs on."""
    if "WORLD_SIZE" not in os.environ:
        return RankInfo(), opts.device
    if opts.onnx:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise NxtrecError("--onnx runs in one process; use the PyTorch path (--model) under torchrun")
        return RankInfo(), opts.device
    info = setup_distributed("cuda" if opts.device.startswith("cuda") else "cpu")
    return info, str(info.device)


def _tag_parts(engine: Engine, items: list[InputItem], fps: list, parts: list[tuple[int, range]], opts: TagOptions,
               output: TagOutput, progress: Progress) -> None:  # fmt: skip
    """Label the given parts (number, range of `items`) in order and write each one as soon
    as it is complete, with the fingerprints its images had when the run started."""
    plan = [r for _, span in parts for r in batch_ranges(span.start, span.stop, opts.batch_size)]
    if not plan:
        return
    batches = prefetched_batches(BatchDecoder(items, plan, engine.preprocessing), opts.workers)
    options = opts.decode_options()
    results = tag_batches(lambda pixels: engine.predict_batch(pixels, options), items, batches, opts.max_labels)
    outputs = part_writer(opts.fmt, output.model, opts.xmp_name, opts.xmp_parent)
    if outputs is not None:  # sidecars are written beside the model, in a thread
        results = outputs.started(results, items)
    for number, span in parts:
        part = []
        for result in islice(results, len(span)):
            part.append(result)
            progress.update(1, result.error is not None)
        if outputs is not None:  # written before the part: a killed run writes them again
            part = outputs.finished(part)
        output.write_part(number, part, [fps[i] for i in span])


# failures that a plain rerun tries again once the image can be read (the file is back, its
# permissions were fixed); a bad $NXTREC_MAX_IMAGE_PIXELS of an earlier version, always
TRANSIENT = ("no such file", "permission denied", "cannot access", "input/output error")


def retry_failed(items: list[InputItem]) -> Callable[[PartEntry], bool]:
    """Whether a failed image's record is to be replaced: its failure was transient and its
    file is readable now (a file still missing is not tagged into a new part on every rerun)."""
    sources = {item.id: item.source for item in items}

    def retry(entry: PartEntry) -> bool:
        reason = (entry.error or "").lower()
        if MAX_PIXELS_ENV.lower() in reason:
            return True
        source = sources.get(entry.id)
        return (any(t in reason for t in TRANSIENT) and isinstance(source, str) and os.path.isfile(source)
                and os.access(source, os.R_OK))  # fmt: skip

    return retry


def _inputs(opts: TagOptions, output: TagOutput, shard_errors: list[dict]) -> tuple[list[InputItem], dict]:
    """The inputs, with the ids their folders had in --out before, and the folders' roots."""
    manifest = None if opts.overwrite or not output.folder.is_dir() else output.read_manifest()
    roots = dict((manifest or {}).get("roots", {}))
    items = collect_inputs(opts.inputs, opts.list_file, opts.shards, roots=roots, shard_errors=shard_errors)
    if not items:
        raise NxtrecError("no images found in the given inputs")
    return items, roots


def _prepare(output: TagOutput, opts: TagOptions, settings: dict, roots: dict) -> None:
    """Rank 0: the folder and its manifest; damaged parts are removed and said."""
    for line in output.prepare(settings, opts.overwrite, roots):
        print(f"nxtrec tag: {line}", file=sys.stderr)


def _progress(opts: TagOptions, ranks: RankInfo, items: list, plan: TagPlan, mine: list[tuple[int, range]]) -> Progress:
    if ranks.world == 1:
        return Progress(len(items), len(items) - len(plan.todo), log_every=opts.log_every)
    # rank 0 shows its own share: the ranks' shares differ by at most a part
    return Progress(sum(len(span) for _, span in mine), 0, enabled=ranks.rank == 0, log_every=opts.log_every,
                    desc=f"tag (rank 0 of {ranks.world})")  # fmt: skip


def run_tag(opts: TagOptions, loading: Callable[[], AbstractContextManager] = nullcontext) -> TagSummary:
    """Tag what is not tagged yet; `loading()` wraps the model's load (the CLI shows a line).
    The process that reports (rank 0) holds the folder's lock for the whole job."""
    opts.validate()
    sharded = opts.num_shards is not None
    output = TagOutput(shard_folder(opts.out, opts.shard_id, opts.num_shards) if sharded else opts.out,
                       part_format(opts.fmt))
    shard_errors: list[dict] = []
    items, roots = _inputs(opts, output, shard_errors)
    settings = opts.settings(items)  # of the whole collection: every shard names the same inputs
    output.model = settings["model"]
    if sharded:
        items = shard_inputs(items, opts.part_size, opts.shard_id, opts.num_shards)
    check_format(opts.fmt, items, output.state, opts.xmp_name)
    output.check(settings, opts.overwrite, opts.update)
    reports = os.environ.get("RANK", "0") == "0"
    with output.locked() if reports else nullcontext():
        output.check(settings, opts.overwrite, opts.update)  # again: another job may have written meanwhile
        for error in shard_errors if reports else []:
            print(f"nxtrec tag: {error['reason']}", file=sys.stderr)
        return _run_job(opts, output, items, roots, settings, shard_errors, loading)


def _run_job(opts: TagOptions, output: TagOutput, items: list[InputItem], roots: dict, settings: dict,
             shard_errors: list[dict], loading: Callable[[], AbstractContextManager]) -> TagSummary:  # fmt: skip
    if opts.update:  # refuse a folder without fingerprints before its manifest names the new inputs
        output.read_entries(None, opts.part_size)
    ranks, device = _join_ranks(opts)
    try:
        with loading():
            engine = load_engine(opts.model, opts.onnx, device=device, dtype=opts.dtype, calibration=opts.calibration,
                                 adapter=opts.adapter)
        if ranks.rank == 0:
            _prepare(output, opts, settings, roots)
        ranks.barrier()
        inputs = [(item.id, fingerprint(item, opts.content_hash)) for item in items]
        legacy = None if opts.update else items  # parts written before fingerprints: positional
        plan = TagPlan.of(inputs, output.read_entries(legacy, opts.part_size), opts.part_size, retry_failed(items))
        ranks.barrier()  # every rank has its plan before any part of this run appears
        todo, size = [items[i] for i in plan.todo], opts.part_size
        parts = [(n, range(j * size, min((j + 1) * size, len(todo)))) for j, n in enumerate(plan.numbers)]
        mine = share(parts, ranks.rank, ranks.world)
        progress = _progress(opts, ranks, items, plan, mine)
        start = time.monotonic()
        try:
            _tag_parts(engine, todo, [inputs[i][1] for i in plan.todo], mine, opts, output, progress)
        finally:
            progress.close()
        stats = ranks.gather((progress.new, time.monotonic() - start))
        ranks.barrier()
        new_images, seconds = sum(s[0] for s in stats), max(s[1] for s in stats)
        counts = {}
        if ranks.rank == 0:
            this_run = {"images": new_images, "new": len(plan.todo) - plan.changed, "changed": plan.changed,
                        "seconds": round(seconds, 3), "images_per_s": round(new_images / max(seconds, 1e-9), 2)}  # fmt: skip
            name = "onnxruntime cpu" if opts.onnx else f"pytorch {device} {opts.dtype}"
            extra = {"engine": name, "world_size": ranks.world, "batch_size": opts.batch_size, "this_run": this_run}
            entries = output.read_entries(legacy, opts.part_size)
            counts = output.finish(settings, inputs, entries, extra, shard_errors)
            finish_format(opts.fmt, output.folder, output.state, items)
        return TagSummary(counts, new_images, seconds, output.folder, plan.changed)
    finally:
        ranks.close()
