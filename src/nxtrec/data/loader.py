"""The streaming loader (WebDataset shards -> batches of CLIP pixels and labels).

Every epoch the shards of all datasets are laid end to end (shuffled at shard
level by (seed, epoch) when shuffling) as one sequence of N samples; each rank takes a
contiguous range of it and splits that range among its DataLoader workers. A stream (one
worker of one rank) reads only the shards its range covers, a boundary shard partly, so
every sample is read by exactly one stream, whatever the shard count. `balance` decides
what happens when N does not divide by the world size:
- "exact": ranks get N // W or N // W + 1 samples, every sample exactly once (evaluation);
- "drop": every rank gets N // W samples, the last N % W of the epoch's order are left out
  (they change from epoch to epoch when shuffling);
- "pad": every rank gets ceil(N / W) samples, the missing ones are repeats of the first
  samples, flagged in `ShardBatch.padded` so that an evaluation can ignore them.
Each stream then shuffles through a buffer seeded by (seed, epoch, stream), decodes with
CLIP preprocessing and batches. Corrupt samples are skipped and counted by reason.

Resuming: a batch carries its stream and the number of that stream's samples consumed so
far; `StreamLoader.state_dict()` keeps these positions, and after `load_state_dict()` each
stream replays its deterministic order without decoding and starts after its position."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import group_by_keys, tar_file_expander

from nxtrec.data.registry import Registry, Shard, dataset_shards
from nxtrec.data.sharding import (
    BALANCE_MODES,
    Piece,
    cut_sequence,
    epoch_sequence,
    rank_range,
    worker_range,
)
from nxtrec.data.shards import IMAGE_EXTS
from nxtrec.distributed import current_ranks
from nxtrec.errors import NxtrecError
from nxtrec.model.image import ImageError, load_image, preprocess

EMPTY_LABELS = ("keep", "skip")


@dataclass
class ShardBatch:
    pixels: torch.Tensor  # [B, 3, S, S] float, CLIP-normalised
    labels: list[list[str]]
    keys: list[str]
    captions: list[str]
    padded: torch.Tensor  # [B] bool: a repeat added by balance="pad"
    stream: int = 0  # which (rank, worker) stream made it
    position: int = 0  # that stream's samples consumed, this batch included
    skipped: dict[str, int] = field(default_factory=dict)  # skipped since the stream's previous batch

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> "ShardBatch":
        self.pixels = self.pixels.pin_memory()
        self.padded = self.padded.pin_memory()
        return self


class _Skip(Exception):
    pass


class StreamDataset(IterableDataset):
    """An IterableDataset of `ShardBatch`es for one rank: see the module docstring. Batching
    happens here (DataLoader batch_size=None), so each worker's last batch may be short,
    and a stream ends with an empty batch when it has counters or a position to report."""

    def __init__(
        self,
        groups: Sequence[tuple[Sequence[Shard], float]],
        batch_size: int,
        image_size: int = 224,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        balance: str = "exact",
        empty_labels: str = "keep",
        drop_last: bool = False,
    ):
        super().__init__()
        if balance not in BALANCE_MODES:
            raise NxtrecError(f"balance must be one of {', '.join(BALANCE_MODES)}, not {balance!r}")
        if empty_labels not in EMPTY_LABELS:
            raise NxtrecError(f"empty_labels must be one of {', '.join(EMPTY_LABELS)}, not {empty_labels!r}")
        if not 0 <= rank < world_size:
            raise NxtrecError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise NxtrecError(f"batch size must be at least 1, not {batch_size}")
        self.groups = [(list(shards), float(weight)) for shards, weight in groups]
        self.batch_size = batch_size
        self.image_size = image_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.balance = balance
        self.empty_labels = empty_labels
        self.drop_last = drop_last
        self.epoch = 0
        self.resume: dict[int, int] = {}  # stream -> samples to skip (set by StreamLoader)
        self.total = sum(round(w * sum(s.samples for s in shards)) for shards, w in self.groups)

    # -- sizes, known before reading anything
    def stream_range(self, worker: int) -> tuple[int, int]:
        lo, hi = rank_range(self.total, self.rank, self.world_size, self.balance)
        return worker_range(lo, hi, worker, self.num_workers)

    def stream_id(self, worker: int) -> int:
        return self.rank * self.num_workers + worker

    def num_samples(self) -> int:
        """Samples this rank reads per epoch (repeats included with balance="pad")."""
        lo, hi = rank_range(self.total, self.rank, self.world_size, self.balance)
        return hi - lo

    def num_batches(self) -> int:
        """Batches this rank yields per epoch when no sample is skipped."""
        n = 0
        for worker in range(self.num_workers):
            lo, hi = self.stream_range(worker)
            full, rest = divmod(hi - lo, self.batch_size)
            n += full + (1 if rest and not self.drop_last else 0)
        return n

    def fingerprint(self) -> dict:
        """What a saved position depends on."""
        h = hashlib.sha1()
        for shards, weight in self.groups:
            h.update(json.dumps([weight, [[s.path, s.samples] for s in shards]]).encode("utf-8"))
        return {
            "shards": h.hexdigest(),
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "shuffle_buffer": self.shuffle_buffer,
            "balance": self.balance,
        }

    def pieces(self, worker: int) -> list[Piece]:
        lo, hi = self.stream_range(worker)
        return cut_sequence(epoch_sequence(self.groups, self.seed, self.epoch, self.shuffle), lo, hi)

    # -- iteration
    def __iter__(self) -> Iterator[ShardBatch]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if num_workers != self.num_workers:
            raise NxtrecError(
                f"StreamDataset was built for {self.num_workers} loader workers but runs in {num_workers}"
            )
        stream = self.stream_id(worker)
        yield from self._batches(stream, self.pieces(worker), self.resume.get(stream, 0))

    def _samples(self, stream: int, pieces: list[Piece], skipped: Counter) -> Iterator[dict]:
        """Raw samples (undecoded) in the stream's deterministic order."""
        stages = [lambda: _read_pieces(pieces, skipped)]
        if self.shuffle:
            rng = random.Random(f"nxtrec:{self.seed}:{self.epoch}:{stream}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        return iter(wds.DataPipeline(*stages))

    def _batches(self, stream: int, pieces: list[Piece], start: int) -> Iterator[ShardBatch]:
        skipped: Counter = Counter()
        samples = self._samples(stream, pieces, skipped)
        # Replay up to the saved position without decoding; what the replay finds unreadable
        # was counted before the position was saved.
        for _ in itertools.islice(samples, start):
            pass
        skipped.clear()
        position, reported, items = start, start, []
        for sample in samples:
            position += 1
            try:
                items.append(self._decode(sample))
            except _Skip as reason:
                skipped[str(reason)] += 1
            if len(items) == self.batch_size:
                yield self._collate(items, stream, position, skipped)
                items, reported = [], position
        if items and not self.drop_last:
            yield self._collate(items, stream, position, skipped)
        elif position > reported or skipped:
            yield self._collate([], stream, position, skipped)

    def _decode(self, sample: dict) -> tuple:
        image = next((sample[ext] for ext in IMAGE_EXTS if ext in sample), None)
        if image is None:
            raise _Skip("no image")
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except (ValueError, UnicodeDecodeError):
            raise _Skip("bad json") from None
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if labels is None:
            raise _Skip("unlabelled")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise _Skip("bad json")
        if not labels and self.empty_labels == "skip":
            raise _Skip("no labels")
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8", errors="replace")
        else:
            caption = str(meta.get("caption", ""))
        try:
            pixels = preprocess(load_image(image), self.image_size)
        except ImageError:
            raise _Skip("corrupt image") from None
        return pixels, labels, sample["__key__"], caption, sample["__padded__"]

    def _collate(self, items: list[tuple], stream: int, position: int, skipped: Counter) -> ShardBatch:
        delta = dict(skipped)
        skipped.clear()
        if items:
            pixels, labels, keys, captions, padded = (list(x) for x in zip(*items))
            pixels = torch.stack(pixels)
        else:
            pixels, labels, keys, captions, padded = torch.empty(0, 3, self.image_size, self.image_size), [], [], [], []
        return ShardBatch(pixels, labels, keys, captions, torch.tensor(padded, dtype=torch.bool), stream, position, delta)


def _read_pieces(pieces: Sequence[Piece], skipped: Counter) -> Iterator[dict]:
    """Samples of each piece via webdataset's tar reader. A shard that cannot be read to the
    end (missing, truncated, corrupt) ends its piece early (the reader keeps the samples
    completed before the damage); the samples it owed are counted as "unreadable shard"."""
    for piece in pieces:
        got = 0
        try:
            stream = open(piece.path, "rb")
        except OSError:
            stream = None
        if stream is not None:
            with stream:  # webdataset's own opener leaves closing to the garbage collector
                files = tar_file_expander([{"url": piece.path, "stream": stream}], handler=wds.ignore_and_continue)
                samples = group_by_keys(files, handler=wds.ignore_and_continue)
                for sample in itertools.islice(samples, piece.start, piece.stop):
                    sample["__padded__"] = piece.padded
                    got += 1
                    yield sample
        if got < piece.stop - piece.start:
            skipped["unreadable shard"] += piece.stop - piece.start - got


class StreamLoader:
    """A torch DataLoader over a StreamDataset, plus the bookkeeping that needs the main
    process: resume positions, skip counters, epoch. Iterate this object, not
    `.dataloader` (which also yields the empty batches that carry counters)."""

    def __init__(self, dataset: StreamDataset, num_workers: int = 0, pin_memory: bool = False, prefetch_factor=None):
        self.dataset = dataset
        self.dataloader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            persistent_workers=False,  # workers must see the new epoch and positions
        )
        self.epoch = 0
        self.positions: dict[int, int] = {}
        self.skipped: Counter = Counter()
        self._resuming = False

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch: the shuffle is seeded by (seed, epoch)."""
        if epoch != self.epoch:
            self.epoch, self.positions, self.skipped, self._resuming = epoch, {}, Counter(), False

    def __iter__(self) -> Iterator[ShardBatch]:
        if not self._resuming:
            self.positions, self.skipped = {}, Counter()
        self._resuming = False
        self.dataset.epoch = self.epoch
        self.dataset.resume = dict(self.positions)
        for batch in self.dataloader:
            self.positions[batch.stream] = batch.position
            self.skipped.update(batch.skipped)
            if len(batch):
                yield batch

    def __len__(self) -> int:
        return self.dataset.num_batches()

    @property
    def num_samples(self) -> int:
        return self.dataset.num_samples()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "positions": {str(k): v for k, v in self.positions.items()},
            "skipped": dict(self.skipped),
            "fingerprint": self.dataset.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """The next iteration continues the saved epoch after the saved batches. The loader
        must be built the same way (shards, rank, world size, workers, batch size, seed,
        shuffle); batches of different workers may interleave differently than before."""
        mine = self.dataset.fingerprint()
        diff = {k: (v, mine.get(k)) for k, v in state["fingerprint"].items() if mine.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise NxtrecError(f"cannot resume the data stream: the loader differs from the saved one ({changes})")
        self.epoch = state["epoch"]
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self.skipped = Counter(state["skipped"])
        self._resuming = True


def build_loader(
    datasets: Union[str, Sequence[str]],
    registry: Union[None, str, Path, Registry] = None,
    *,
    batch_size: int = 32,
    image_size: int = 224,
    num_workers: int = 2,
    shuffle: bool = False,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    balance: str = "exact",
    empty_labels: str = "keep",
    drop_last: bool = False,
    pin_memory: bool = False,
) -> StreamLoader:
    """A StreamLoader over registry datasets (names) or shard folders / patterns, mixed by
    their registry weights. Rank and world size default to `nxtrec.distributed.current_ranks()`:
    the initialised process group's, else torchrun's RANK / WORLD_SIZE, else 0 and 1."""
    found = dataset_shards(datasets, registry)
    # A shard without a single labelled sample was never labelled: say how to fix it now
    # rather than skip all of it. Odd unlabelled samples are skipped and counted.
    unlabelled = sorted({os.path.dirname(s.path) for _, group in found for s in group if s.samples and not s.labelled})
    if unlabelled:
        raise NxtrecError(
            f"shards without labels in {', '.join(unlabelled)}: add them with `nxtrec labels add {unlabelled[0]}`"
        )
    if rank is None or world_size is None:
        ranks = current_ranks()
        rank = ranks.rank if rank is None else rank
        world_size = ranks.world if world_size is None else world_size
    dataset = StreamDataset(
        [(shards, spec.weight) for spec, shards in found],
        batch_size=batch_size,
        image_size=image_size,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        balance=balance,
        empty_labels=empty_labels,
        drop_last=drop_last,
    )
    return StreamLoader(dataset, num_workers=num_workers, pin_memory=pin_memory)
