"""What the commands that run a model (predict, tag, serve, eval, attention) say on stderr
besides their results, and the check of their input paths:

- `loading(command, model, onnx)`: "nxtrec CMD: loading MODEL ..." while the model loads
  (seconds), only when stderr is a terminal; the line is erased once the model is in.
- `demo_notice(model, onnx)`: `DEMO_NOTICE`, once per command, when the bundled demo model
  runs (no --model, no --onnx).
- `check_input_paths(paths)`: `nxtrec tag`'s positional inputs, checked as `predict`'s are
  (`list_images(strict=True)`): a missing path is a usage error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# One line, on stderr, whenever the bundled model runs (silenced by --quiet, and by predict's --json).
DEMO_NOTICE = ("note: bundled demo model: it knows only 127 emoji categories (synthetic scenes), not real photos; "
               "get the released weights with `nxtrec download nxtp-1.78b-g70m --out DIR` and pass --model DIR "
               "(docs/models.md)")
GLOB_CHARACTERS = "*?["


def uses_bundled_model(model: str | None, onnx: str | None = None) -> bool:
    return model is None and onnx is None


def demo_notice(model: str | None, onnx: str | None = None, quiet: bool = False, stream=None) -> bool:
    """Print `DEMO_NOTICE` when the bundled demo model runs and not `quiet`; True if printed."""
    if quiet or not uses_bundled_model(model, onnx):
        return False
    print(DEMO_NOTICE, file=stream or sys.stderr, flush=True)
    return True


def model_name(model: str | None, onnx: str | None = None) -> str:
    if onnx is not None:
        return f"ONNX {onnx}"
    return "the bundled demo model" if model is None else f"model {model}"


@contextmanager
def loading(command: str, model: str | None, onnx: str | None = None, quiet: bool = False,
            stream=None) -> Iterator[None]:  # fmt: skip
    """Show "nxtrec COMMAND: loading MODEL ..." on stderr while the body runs, when stderr is
    a terminal and not `quiet`; the line is erased when the body returns (and ended with a
    newline if it raises, so that the error starts on its own line)."""
    stream = stream or sys.stderr
    show = not quiet and _is_terminal(stream)
    if show:
        stream.write(f"nxtrec {command}: loading {model_name(model, onnx)} ...")
        stream.flush()
    try:
        yield
    except BaseException:
        if show:
            stream.write("\n")
            stream.flush()
        raise
    if show:
        stream.write("\r\033[K")  # back to the start of the line, erase it
        stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def check_input_paths(paths: list[str]) -> None:
    """Raise `NxtrecError` (exit code 2, one line naming it) for a positional input that does
    not exist and is no glob pattern; folders are not listed here (`tag` lists them itself)."""
    from nxtrec.model.image import list_images

    list_images([p for p in paths if not os.path.isdir(p) and not any(c in p for c in GLOB_CHARACTERS)], strict=True)
