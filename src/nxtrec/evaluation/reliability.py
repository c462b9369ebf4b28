"""The reliability diagram: the fraction of right labels against their mean score, bin by bin,
for one or more scores (the raw prob, the calibrated confidence), as a PNG (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

from nxtrec.evaluation.calibration import Bin


def write_reliability_diagram(path: str | Path, curves: dict[str, tuple[list[Bin], float]], title: str = "") -> Path:
    """`curves`: name -> (bins, ECE). Written to a temporary file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    for (name, (bins, error)), marker in zip(curves.items(), "os^D"):
        used = [b for b in bins if b.n]
        top.plot([b.score for b in used], [b.accuracy for b in used], marker=marker, label=f"{name} (ECE {error:.3f})")
        bottom.bar([(b.lo + b.hi) / 2 for b in bins], [b.n for b in bins], width=1 / len(bins), alpha=0.5,
                   label=name)  # fmt: skip
    top.set(ylabel="fraction right", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend(loc="upper left", fontsize=8)
    bottom.set(xlabel="score (mean of the bin)", ylabel="labels")
    bottom.set_yscale("log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
