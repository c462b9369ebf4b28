"""The training data stream: the configured shards as an endless sequence of micro-batches
whose order survives restarts."""

from __future__ import annotations

from collections import Counter

from nxtrec.distributed import RankInfo
from nxtrec.training.config import TrainConfig


class LoaderStream:
    """Micro-batches `(pixels, labels)` from the data pipeline's `StreamLoader` as an endless
    stream over epochs, in a canonical order that does not depend on when the loader was
    (re)started: batch k of loader worker w comes before batch k of worker w+1 and before
    batch k+1 of any worker (the order torch's DataLoader yields in an uninterrupted epoch).
    A restarted DataLoader begins its round-robin at worker 0 again; holding back batches
    that arrive early keeps a resumed run on exactly the uninterrupted run's sequence.

    `state_dict()` holds the epoch and, per worker stream, the position of the last batch
    *consumed* (not merely received: the loader prefetches), which the loader replays."""

    def __init__(self, loader):
        self.loader = loader
        self.dataset = loader.dataset
        self.n = self.dataset.num_workers
        self.first_stream = self.dataset.stream_id(0)
        self.epoch = 0
        self._skipped_before = Counter()  # samples skipped in earlier epochs (and runs), by reason
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.counts = [0] * self.n  # batches consumed per worker this epoch
        self.positions: dict[int, int] = {}  # stream -> samples consumed (last consumed batch)
        self.queues = [[] for _ in range(self.n)]
        self._it = None
        self._done = False

    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def _finished(self, w: int) -> bool:
        if self.queues[w]:
            return False
        if self._done:
            return True
        lo, hi = self.dataset.stream_range(w)
        return self.loader.positions.get(self.first_stream + w, 0) >= hi - lo

    def next_batch(self):
        while True:
            if self._it is None:
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
            live = [w for w in range(self.n) if not self._finished(w)]
            if not live:
                self._skipped_before.update(self.loader.skipped)
                self.epoch += 1
                self._new_epoch()
                continue
            w = min(live, key=lambda i: (self.counts[i], i))
            if self.queues[w]:
                batch = self.queues[w].pop(0)
                self.counts[w] += 1
                self.positions[batch.stream] = batch.position
                return batch.pixels, batch.labels
            try:
                batch = next(self._it)
            except StopIteration:
                self._done = True
                continue
            self.queues[batch.stream - self.first_stream].append(batch)

    def skipped_counts(self) -> dict[str, int]:
        """Samples this rank's loader skipped since the run began, by reason."""
        return dict(self._skipped_before + self.loader.skipped)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "skipped": self.skipped_counts(),
            "counts": list(self.counts),
            "positions": {str(k): v for k, v in self.positions.items()},
            "fingerprint": self.dataset.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._new_epoch()
        self.counts = [int(c) for c in state["counts"]]
        self.positions = {int(k): int(v) for k, v in state["positions"].items()}
        self._skipped_before = Counter(state.get("skipped", {}))  # absent in older checkpoints
        self.loader.load_state_dict({"epoch": self.epoch, "positions": dict(state["positions"]), "skipped": {},
                                     "fingerprint": state["fingerprint"]})


def make_data(cfg: TrainConfig, model_config, info: RankInfo) -> LoaderStream:
    """This process's share of the configured datasets (registry names in `data.datasets`,
    shard files / folders / globs in `data.shards`): each rank reads N // world samples per
    epoch, in full micro-batches."""
    from nxtrec.data.loader import build_loader

    names = list(cfg.data.datasets) + list(cfg.data.shards)
    loader = build_loader(
        names,
        cfg.data.registry or None,
        batch_size=cfg.train.micro_batch_size,
        image_size=model_config.encoder.image_size,
        num_workers=cfg.data.num_workers,
        shuffle=cfg.data.shuffle,
        shuffle_buffer=max(cfg.data.shuffle_buffer, 1),
        seed=cfg.run.seed,
        rank=info.rank,
        world_size=info.world,
        balance="drop",
        empty_labels=cfg.data.empty_labels,
        drop_last=True,
        pin_memory=info.device_type == "cuda",
    )
    return LoaderStream(loader)
