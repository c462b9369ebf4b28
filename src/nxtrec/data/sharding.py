"""Which samples each process and loader worker reads: an epoch's shard order cut into
contiguous pieces per rank and worker, without repetition or loss."""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass
from typing import Sequence

from nxtrec.data.registry import Shard

BALANCE_MODES = ("exact", "drop", "pad")


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard, in tar order."""

    path: str
    start: int
    stop: int
    padded: bool = False  # repeats added by balance="pad"


def epoch_sequence(
    groups: Sequence[tuple[Sequence[Shard], float]], seed: int, epoch: int, shuffle: bool
) -> list[Piece]:
    """The epoch's samples as pieces of shards. A dataset of weight w contributes
    round(w * its length) samples: whole passes over its shards, then a cut one."""
    rng = random.Random(f"nxtrec:{seed}:{epoch}")
    pieces = []
    for shards, weight in groups:
        shards = [s for s in shards if s.samples > 0]
        want = round(weight * sum(s.samples for s in shards))
        while want > 0:
            order = rng.sample(shards, len(shards)) if shuffle else shards
            for shard in order:
                take = min(shard.samples, want)
                pieces.append(Piece(shard.path, 0, take))
                want -= take
                if want == 0:
                    break
    if shuffle:
        rng.shuffle(pieces)
    return pieces


def rank_range(total: int, rank: int, world_size: int, balance: str) -> tuple[int, int]:
    """The rank's range of epoch positions; positions >= total wrap around (pad)."""
    if balance == "exact":
        return rank * total // world_size, (rank + 1) * total // world_size
    per_rank = total // world_size if balance == "drop" else -(-total // world_size)
    return rank * per_rank, (rank + 1) * per_rank


def worker_range(lo: int, hi: int, worker: int, num_workers: int) -> tuple[int, int]:
    n = hi - lo
    return lo + worker * n // num_workers, lo + (worker + 1) * n // num_workers


def cut_sequence(pieces: Sequence[Piece], lo: int, hi: int) -> list[Piece]:
    """Positions [lo, hi) of the sequence as pieces; positions past its end wrap around and
    are flagged padded."""
    lengths = [p.stop - p.start for p in pieces]
    starts = list(itertools.accumulate([0] + lengths[:-1]))
    total = sum(lengths)
    out = []
    pos = lo
    while pos < hi and total > 0:
        lap, offset = divmod(pos, total)
        i = bisect.bisect_right(starts, offset) - 1
        piece, inside = pieces[i], offset - starts[i]
        take = min(hi - pos, lengths[i] - inside)
        out.append(Piece(piece.path, piece.start + inside, piece.start + inside + take, lap > 0))
        pos += take
    return out
