"""`nxtrec tag` as a job: inputs cut into parts, the parts of this rank that are not done yet
decoded in worker processes and labelled batch by batch, each part written when complete,
then (rank 0) the merged manifest. Under torchrun, rank r takes parts r, r + world, ..."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from nxtrec.distributed import RankInfo, setup_distributed
from nxtrec.engines import capabilities_of, check_engine_choice, load_engine
from nxtrec.errors import NxtrecError
from nxtrec.inference.engine import DecodeOptions, Engine
from nxtrec.tagging.inputs import InputItem, collect_inputs, inputs_digest
from nxtrec.tagging.output import TagOutput
from nxtrec.tagging.pipeline import batch_ranges, tag_batches
from nxtrec.tagging.prefetch import BatchDecoder, prefetched_batches
from nxtrec.tagging.progress import Progress


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
    log_every: float = 30.0
    maps: bool = False  # each label's grounding map in the records (nxtrec.inference.attention)
    vocab: str | None = None  # a tag list to decode into (nxtrec.inference.vocab)
    map_to: str | None = None  # a tag list to map free labels to (nxtrec.inference.mapping)
    map_threshold: float = 0.5

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(top_k=self.top_k, extra_k=self.extra_k, ranking=self.ranking, maps=self.maps,
                             vocab=self.vocab, map_to=self.map_to, map_threshold=self.map_threshold,
                             compat=self.compat)  # fmt: skip

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
        return {"model": model, "inputs": {"count": len(items), "sha256": inputs_digest(items)}, "options": options}


@dataclass
class TagSummary:
    counts: dict
    new_images: int
    seconds: float
    out: Path

    def line(self) -> str:
        c = self.counts
        rate = self.new_images / max(self.seconds, 1e-9)
        state = "" if c["parts_done"] == c["parts"] else f", {c['parts'] - c['parts_done']} parts left"
        return (f"{c['images']} images ({c['tagged']} tagged, {c['failed']} failed{state}) in {self.out}; "
                f"this run: {self.new_images} images in {self.seconds:.1f} s, {rate:.1f} images/s")  # fmt: skip


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


def _tag_parts(engine: Engine, items: list[InputItem], parts: list[int], opts: TagOptions,
               output: TagOutput, progress: Progress) -> None:  # fmt: skip
    """Label the given parts in order and write each one as soon as it is complete."""
    n, size = len(items), opts.part_size
    plan = [r for p in parts for r in batch_ranges(p * size, min((p + 1) * size, n), opts.batch_size)]
    if not plan:
        return
    batches = prefetched_batches(BatchDecoder(items, plan, engine.preprocessing), opts.workers)
    options = opts.decode_options()
    results = tag_batches(lambda pixels: engine.predict_batch(pixels, options), items, batches, opts.min_prob,
                          opts.max_labels)  # fmt: skip
    for p in parts:
        part = []
        for result in islice(results, min((p + 1) * size, n) - p * size):
            part.append(result)
            progress.update(1, result.error is not None)
        output.write_part(p, part)


def run_tag(opts: TagOptions) -> TagSummary:
    opts.validate()
    items = collect_inputs(opts.inputs, opts.list_file, opts.shards)
    if not items:
        raise NxtrecError("no images found in the given inputs")
    output = TagOutput(opts.out, opts.fmt)
    settings = opts.settings(items)
    output.check(settings, opts.overwrite)
    ranks, device = _join_ranks(opts)
    try:
        engine = load_engine(opts.model, opts.onnx, device=device, dtype=opts.dtype)
        if ranks.rank == 0:
            output.prepare(settings, opts.overwrite)
        ranks.barrier()
        num_parts = -(-len(items) // opts.part_size)
        done = output.done_parts()
        mine = [p for p in range(ranks.rank, num_parts, ranks.world) if p not in done]
        part_images = [min((p + 1) * opts.part_size, len(items)) - p * opts.part_size for p in range(num_parts)]
        if ranks.world == 1:
            progress = Progress(len(items), sum(part_images[p] for p in done if p < num_parts), log_every=opts.log_every)
        else:  # rank 0 shows its own share: the ranks' shares differ by at most a part
            progress = Progress(sum(part_images[p] for p in mine), 0, enabled=ranks.rank == 0,
                                log_every=opts.log_every, desc=f"tag (rank 0 of {ranks.world})")
        start = time.monotonic()
        try:
            _tag_parts(engine, items, mine, opts, output, progress)
        finally:
            progress.close()
        stats = ranks.gather((progress.new, time.monotonic() - start))
        ranks.barrier()
        new_images, seconds = sum(s[0] for s in stats), max(s[1] for s in stats)
        counts = {}
        if ranks.rank == 0:
            this_run = {"images": new_images, "seconds": round(seconds, 3), "images_per_s": round(new_images / max(seconds, 1e-9), 2)}
            name = "onnxruntime cpu" if opts.onnx else f"pytorch {device} {opts.dtype}"
            extra = {"engine": name, "world_size": ranks.world, "batch_size": opts.batch_size, "this_run": this_run}
            counts = output.finish(settings, num_parts, extra)
        return TagSummary(counts, new_images, seconds, output.folder)
    finally:
        ranks.close()
