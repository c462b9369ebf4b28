"""Checkpoints: `RUN_DIR/checkpoints/ckpt-STEP/` with the trainable tensors (safetensors) and
`state.pt` (optimizer, scheduler, scaler, step, RNG, data positions), written atomically."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

import torch

from nxtrec.errors import disk_space, is_disk_full
from nxtrec.training.errors import TrainError

CKPT_PREFIX = "ckpt-"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = re.fullmatch(CKPT_PREFIX + r"(\d+)", d.name)
            if m and (d / TRAINABLE_FILE).is_file() and (d / STATE_FILE).is_file():
                out.append((int(m.group(1)), d))
    return sorted(out)


def retained_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    keep = set(sorted(steps)[-keep_last:])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(run_dir: Path, step: int, tensors: dict, state: dict, keep_last: int, keep_every: int) -> Path:
    """Write `ckpt-STEP/` atomically (temporary folder, then rename), then apply retention."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TRAINABLE_FILE),
                  metadata={"format": "pt", "step": str(step)})
        torch.save(state, tmp / STATE_FILE)
        for name in (TRAINABLE_FILE, STATE_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
    except Exception as e:  # torch.save: RuntimeError, safetensors: SafetensorError, else OSError
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            needed = sum(v.numel() * v.element_size() for v in tensors.values())
            raise TrainError(f"{final}: checkpoint not written: disk full; the temporary folder was removed and the "
                             f"earlier checkpoints are intact: no space left on the device ({disk_space(final, needed)}; "
                             "free space, then resume)") from None
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        raise TrainError(f"{final}: checkpoint not written: {_write_failure(e)}; the temporary folder was removed and "
                         "the earlier checkpoints are intact (free space, then resume)") from None
    if final.exists():  # e.g. resumed from an older checkpoint: replace the stale one
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    ckpts = checkpoint_dirs(run_dir)
    keep = retained_steps([s for s, _ in ckpts], keep_last, keep_every)
    for s, d in ckpts:
        if s not in keep:
            shutil.rmtree(d, ignore_errors=True)
    return final


def _write_failure(e: Exception) -> str:
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "file write failed" in str(e):
        return "disk full"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / TRAINABLE_FILE))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise TrainError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]})") from None
    return tensors, state


def read_newest_readable(run_dir: Path) -> tuple[Path, dict, dict, list[str]]:
    """The newest checkpoint that reads, its tensors and state, and why each newer one did
    not (a damaged newest checkpoint falls back to the one before it)."""
    problems = []
    for _, path in reversed(checkpoint_dirs(run_dir)):
        try:
            return (path, *read_checkpoint(path), problems)
        except TrainError as e:
            problems.append(str(e))
    raise TrainError(f"{run_dir}: no readable checkpoint ({'; '.join(problems) or 'none found'})")


def find_resume(run_dir: Path, resume: str | bool | None) -> Path | None:
    """`resume`: None = automatic (the newest checkpoint if any), True = must exist, a path
    = that checkpoint."""
    if isinstance(resume, (str, Path)):
        p = Path(resume)
        if not ((p / TRAINABLE_FILE).is_file() and (p / STATE_FILE).is_file()):
            raise TrainError(f"{p}: not a checkpoint folder (expected {TRAINABLE_FILE} and {STATE_FILE})")
        return p
    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        if resume is True:
            raise TrainError(f"{run_dir}: no checkpoint to resume from")
        return None
    return ckpts[-1][1]
