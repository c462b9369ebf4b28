"""What the CLI prints, and which exit code it returns, for errors that are not `NxtrecError`s.

Exit codes (docs/limits.md): 0 success; 1 some inputs were skipped (each named on stderr) or a
check failed; 2 user or environment error, one line on stderr (bad option, bad file, disk
full, permission denied); 70 a bug in nxtrec (the traceback, then how to report it); 130
interrupted; 141 the reader of stdout went away (`nxtrec predict ... | head`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
import warnings

EXIT_USER_ERROR = 2
EXIT_BUG = 70  # EX_SOFTWARE of sysexits.h
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell pipeline expects
# The project's issue tracker; bug reports go there.
BUG_REPORT = "the nxtrec issue tracker (include the command line, the traceback above and the output of `nxtrec info`)"

# Errors of the machine or the file system, not of nxtrec: reported in one line.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "symbolic link loop",
    errno.EMFILE: "too many open files",
}


def describe_os_error(e: OSError) -> str | None:
    """One line for an environment OSError, None for any other."""
    reason = ENVIRONMENT_ERRNOS.get(e.errno)
    if reason is None:
        return None
    where = e.filename if e.filename is not None else "writing output"
    return f"{where}: {reason}"


def handle_unexpected(command: str, e: BaseException) -> int:
    """The exit code for an exception that escaped a command, after printing about it."""
    if isinstance(e, BrokenPipeError):
        # Python would complain again when flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    if isinstance(e, OSError) and describe_os_error(e):
        print(f"nxtrec {command}: error: {describe_os_error(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    if isinstance(e, MemoryError):
        print(f"nxtrec {command}: error: out of memory (try a smaller --batch-size)", file=sys.stderr)
        return EXIT_USER_ERROR
    traceback.print_exc()
    print(f"nxtrec {command}: internal error: this is a bug in nxtrec ({type(e).__name__}), "
          f"please report it at {BUG_REPORT}", file=sys.stderr)
    return EXIT_BUG


@contextlib.contextmanager
def one_line_warnings():
    """While a command runs, warnings (a damaged shard, a changed file) print as
    `nxtrec: warning: ...`, without the source line Python adds."""
    previous = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *_, **__: f"nxtrec: warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = previous
