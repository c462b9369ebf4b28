"""`nxtrec` command line. Each sub-command lives in `nxtrec/cli/<name>.py`, which
defines `register(subparsers)`; heavy imports (torch, onnxruntime) happen inside the
handlers so that, e.g., the ONNX path never imports torch."""

from __future__ import annotations

import argparse
import importlib
import sys

from nxtrec.errors import NxtrecError

COMMAND_MODULES = [
    "predict",
    "models",
    "bench",
    "data",
    "evaluate",
    "train",
    "onnx",
    "synth",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nxtrec", description="Open-vocabulary object recognition as next-token prediction."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"nxtrec.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"nxtrec.cli.{name}":
                continue  # a command module not written yet
            raise
        module.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NxtrecError as e:
        print(f"nxtrec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
