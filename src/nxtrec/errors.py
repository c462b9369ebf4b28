"""One exception type for every user-facing error: the CLI prints its message as one line."""

from __future__ import annotations


class NxtrecError(Exception):
    """Bad input, a missing or wrong file, a bad config: the message says what and where."""


class ArgumentError(NxtrecError, ValueError):
    """A bad argument to the Python API (top_k < 1, batch_size < 1, ...): a ValueError for
    callers, an NxtrecError (one line, exit 2) for the command line."""


_DISK_FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT (Linux)
_DISK_FULL_TEXTS = ("No space left", "Disk quota exceeded", "StorageFull", "code: 28,", "code: 122,", "file write failed")


def is_disk_full(e: BaseException) -> bool:
    """True for a write that failed because the disk (or the quota) is full: an OSError with
    ENOSPC / EDQUOT, or the same wrapped by safetensors (SafetensorError) or torch.save
    (RuntimeError)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", 122)):
        return True
    if isinstance(e, OSError) and e.errno is not None:
        return False
    text = str(e)
    return any(t in text for t in _DISK_FULL_TEXTS)


class DiskFullError(NxtrecError, OSError):
    """A write that failed for lack of space, as one line naming the path and the space it
    needed. Also an OSError (errno ENOSPC), for callers that catch those."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno, self.strerror = _DISK_FULL_ERRNOS[0], message

    def __str__(self) -> str:
        return self.strerror


def disk_space(path, needed_bytes: int | None = None) -> str:
    """"needed about N MB, F MB free", F for the nearest existing folder of `path`."""
    import os
    import shutil

    folder = os.path.abspath(str(path))
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return (f"needed about {max(needed_bytes, 0) / 1e6:.0f} MB, " if needed_bytes is not None else "") + free


def disk_full_error(path, needed_bytes: int | None = None, detail: str = "") -> DiskFullError:
    """The one-line error for a full disk: "PATH: no space left on the device (needed about
    N MB, F MB free[; detail])"."""
    return DiskFullError(f"{path}: no space left on the device ({disk_space(path, needed_bytes)}"
                         f"{'; ' + detail if detail else ''})")
