"""How one collection is shared out: among the ranks of one job (torchrun, `--processes`),
and among the independent jobs of `--shard-id I --num-shards N` (a Slurm array, a Kubernetes
indexed job, GNU parallel). Both take every N-th part, so the same rule splits both levels.

A shard is a whole `nxtrec tag` job with its own folder under --out, `shard-IIIII-of-NNNNN`,
resumed on its own; it takes the parts I, I + N, ... of the collection's first-run parts
(inputs [p * part_size, (p + 1) * part_size)), whatever the other shards have done.
`nxtrec tag --merge OUT` (nxtrec.tagging.merge) checks and joins them."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SHARD_DIR_RE = re.compile(r"^shard-(\d{5,})-of-(\d{5,})$")


def share(parts: Sequence[T], index: int, count: int) -> list[T]:
    """The parts that worker `index` of `count` takes: index, index + count, ..."""
    return list(parts[index::count])


def shard_folder(out: str | Path, shard_id: int, num_shards: int) -> Path:
    """The folder of shard `shard_id` of `num_shards` under `out`."""
    return Path(out) / f"shard-{shard_id:05d}-of-{num_shards:05d}"


def shard_inputs(items: Sequence[T], part_size: int, shard_id: int, num_shards: int) -> list[T]:
    """The inputs of one shard: its share of the collection's parts, in input order."""
    parts = [items[p : p + part_size] for p in range(0, len(items), part_size)]
    return [item for part in share(parts, shard_id, num_shards) for item in part]


def shard_size(total: int, part_size: int, shard_id: int, num_shards: int) -> int:
    """How many of `total` inputs shard `shard_id` holds."""
    return len(shard_inputs(range(total), part_size, shard_id, num_shards))
