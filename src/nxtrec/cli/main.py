"""`nxtrec` command line. Each sub-command lives in `nxtrec/cli/<name>.py` (`export-onnx`
in `export_onnx.py`), which defines `register(subparsers)`; heavy imports (torch, onnxruntime) happen inside the
handlers so that, e.g., the ONNX path never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys

from nxtrec.cli.failures import handle_unexpected, one_line_warnings
from nxtrec.cli.options import ArgumentParser
from nxtrec.errors import NxtrecError
from nxtrec.extras import missing_dependency

COMMAND_MODULES = [
    "predict",
    "init_model",
    "convert",
    "bench",
    "pack",
    "labels",
    "data",
    "eval",
    "score",
    "train",
    "plot",
    "export_onnx",
    "synth",
    "tag",
    "attention",
    "serve",
    "download",
    "verify",
    "quantize",
    "info",
    "calibrate",
    "export",
    "import_",
    "teach",
    "merge_adapter",
]


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="nxtrec", description="Open-vocabulary object recognition as next-token prediction."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"nxtrec.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    with one_line_warnings():
        return _run_command(argv)


def _run_command(argv) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed in one line
        return int(e.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `tag --processes` runs it again per rank
    try:
        return int(args.func(args) or 0)
    except (NxtrecError, ModuleNotFoundError) as e:
        # a missing optional dependency says which `pip install 'nxtrec[EXTRA]'` to run
        error = e if isinstance(e, NxtrecError) else missing_dependency(e, args.command)
        if error is None:
            return handle_unexpected(args.command, e)
        print(f"nxtrec {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- a bug, or the machine (disk full, ...): see cli/failures.py
        return handle_unexpected(args.command, e)


if __name__ == "__main__":
    sys.exit(main())
