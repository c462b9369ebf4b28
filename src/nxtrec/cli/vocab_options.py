"""The tag-list and compatibility options shared by the commands that decode labels (predict,
eval, and any command that passes them on): `--vocab`, `--map-to`, `--map-threshold`,
`--compat`."""

from __future__ import annotations

import argparse

from nxtrec.cli.options import existing_file
from nxtrec.inference.compat import COMPAT_MODES
from nxtrec.inference.mapping import DEFAULT_MAP_THRESHOLD
from nxtrec.inference.vocab import as_label_list


def cosine(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [-1, 1], got {text!r}") from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [-1, 1], got {text}")
    return value


def add_vocab_arguments(p, compat: bool = True) -> None:
    p.add_argument("--vocab", metavar="FILE", type=existing_file,
                   help="decode only into this tag list: one entry per line, synonyms separated by '|' "
                        "(reported as the first form); one-shot sampling")
    p.add_argument("--map-to", metavar="FILE", type=existing_file,
                   help="decode freely, then map each label to the nearest entry of this tag list (MiniLM cosine)")
    p.add_argument("--map-threshold", type=cosine, default=DEFAULT_MAP_THRESHOLD,
                   help=f"--map-to: drop labels less similar than this to every entry (default {DEFAULT_MAP_THRESHOLD})")
    if compat:
        p.add_argument("--compat", choices=COMPAT_MODES,
                       help="reference: reproduce the reference implementation's outputs, deviations included "
                            "(docs/compat.md)")


def vocab_kwargs(args) -> dict:
    """`DecodeOptions` fields from the parsed options (only those given; `DecodeOptions.check`
    says which go together)."""
    out = {}
    if args.vocab:
        out["vocab"] = as_label_list(args.vocab)  # a bad list fails here, before any model loads
    if args.map_to:
        out.update(map_to=as_label_list(args.map_to), map_threshold=args.map_threshold)
    if getattr(args, "compat", None):
        out["compat"] = args.compat
    return out
