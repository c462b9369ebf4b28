"""Threads for each of several model processes on one machine (`tag --processes`, `serve
--processes`). Torch-free: the launchers decide before any model is loaded."""

from __future__ import annotations

import os


def threads_per_process(processes: int) -> str:
    """OMP_NUM_THREADS for each of `processes` model processes: the user's own setting when
    there is one, else the cores shared evenly (at least one each)."""
    return os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // processes))
