"""The label options shared by the commands that decode labels (predict, tag, serve, eval):
`--vocab`, `--map-to`, `--map-threshold`, `--compat`, and the label rules `--exclude`,
`--replace`, `--min-prob` (docs/vocab.md). Every file is read and checked here, before any
model loads."""

from __future__ import annotations

import argparse

from nxtrec.cli.options import existing_file, fraction
from nxtrec.inference.compat import COMPAT_MODES
from nxtrec.inference.label_rules import as_exclude_list, as_replace_rules
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
    p.add_argument("--exclude", metavar="FILE", type=existing_file,
                   help="drop these labels: one per line, synonyms separated by '|' (case and spacing ignored)")
    p.add_argument("--replace", metavar="FILE", type=existing_file,
                   help="rename labels: one 'from -> to' rule per line ('a | b -> to' for synonyms); "
                        "labels renamed alike merge, their probabilities summed")
    if p.get_default("min_prob") is None:  # `nxtrec tag` defines the same option itself
        p.add_argument("--min-prob", type=fraction, default=0.0, help="drop labels with a lower probability")
    if compat:
        p.add_argument("--compat", choices=COMPAT_MODES,
                       help="reference: reproduce the reference implementation's outputs, deviations included "
                            "(docs/compat.md)")


def vocab_kwargs(args) -> dict:
    """`DecodeOptions` fields from the parsed options (only those given; `DecodeOptions.check`
    says which go together). Also checks --top-k against the model's vocabulary (its
    config.json) before the weights load."""
    check_top_k_early(args)
    out = {}
    if args.vocab:
        out["vocab"] = as_label_list(args.vocab)  # a bad list fails here, before any model loads
    if args.map_to:
        out.update(map_to=as_label_list(args.map_to), map_threshold=args.map_threshold)
    if getattr(args, "compat", None):
        out["compat"] = args.compat
    if getattr(args, "exclude", None):
        out["exclude"] = as_exclude_list(args.exclude)
    if getattr(args, "replace", None):
        out["replace"] = as_replace_rules(args.replace)
    if getattr(args, "min_prob", 0.0):
        out["min_prob"] = args.min_prob
    return out


def check_top_k_early(args) -> None:
    """--top-k (+ --extra-k) against the vocabulary size in the model directory's config.json,
    so that a top-k too large fails before the weights load (the same check as after loading;
    an ONNX export or an unreadable directory is left to that one)."""
    top_k = getattr(args, "top_k", None)
    if not top_k or getattr(args, "onnx", None):
        return
    from pathlib import Path

    from nxtrec.inference.engine import DecodeOptions, check_top_k
    from nxtrec.model.config import ConfigError, ModelConfig

    if getattr(args, "model", None):
        model = Path(args.model)
    else:
        # (imports torch, which the PyTorch path loads anyway)
        from nxtrec.model.directory import default_model_dir

        model = default_model_dir()
    try:
        config = ModelConfig.load(model / "config.json")
    except (ConfigError, OSError):
        return
    k = max(top_k) if isinstance(top_k, list) else top_k
    check_top_k(DecodeOptions(top_k=k, extra_k=getattr(args, "extra_k", 0) or 0), config.decoder.vocab_size)
