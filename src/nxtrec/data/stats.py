"""Label statistics of shards (`nxtrec data stats`) and a bar plot of the most frequent labels."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

from nxtrec.data.registry import Shard
from nxtrec.data.shards import member_ext, read_member, tar_samples


@dataclass
class LabelStats:
    samples: int = 0
    unlabelled: int = 0  # no "labels" field
    empty: int = 0  # "labels": []
    counts: Counter = field(default_factory=Counter)
    damaged: dict[str, str] = field(default_factory=dict)  # shard path -> what is wrong (its readable samples count)

    @property
    def labels_per_sample(self) -> float:
        labelled = self.samples - self.unlabelled
        return sum(self.counts.values()) / labelled if labelled else 0.0


def label_stats(shards: Sequence[Shard]) -> LabelStats:
    """Label frequencies from the json members (image data is not read)."""
    stats = LabelStats()
    for shard in shards:
        damage: list[str] = []
        for _, members, tf in tar_samples(Path(shard.path), damage):
            stats.samples += 1
            member = next((m for m in members if member_ext(m) == "json"), None)
            try:
                labels = json.loads(read_member(tf, member)).get("labels") if member else None
            except (ValueError, AttributeError):
                labels = None
            if not isinstance(labels, list):
                stats.unlabelled += 1
            elif not labels:
                stats.empty += 1
            stats.counts.update(list(dict.fromkeys(labels or [])))  # once per sample, in order
        if damage:
            stats.damaged[shard.path] = "; ".join(damage)
    return stats


def plot_label_counts(counts: Counter, top: int, path: Union[str, Path], title: str = "") -> None:
    """A horizontal bar chart of the `top` most frequent labels, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = counts.most_common(top)[::-1]  # most frequent at the top
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(items) + 1.2))
    ax.barh([label for label, _ in items], [n for _, n in items], color="#4c72b0")
    ax.set_xlabel("samples")
    ax.set_title(title or f"top {len(items)} labels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
