"""`nxtrec labels`: the noun labels of captions, and `labels add` for existing shards."""

from __future__ import annotations

import argparse
import json
import sys

from nxtrec.cli.help import DefaultsHelpFormatter, RawDescriptionDefaultsHelpFormatter
from nxtrec.cli.label_options import DEFAULT_WORKERS, add_label_options
from nxtrec.cli.options import existing_dir, positive_int

JSON_HELP = 'one {"caption", "labels"} JSON object per caption'
LABELS_HELP = """\
nxtrec labels [--backend spacy|nltk] [--compat] [--json] TEXT...
    print the labels of a caption (TEXT words are joined); TEXT "-" reads one caption per
    line from standard input and prints one line of labels per caption
nxtrec labels add DIR [--out DIR] [--workers N] [--backend ...] [--compat]
    add the `labels` field to the KEY.json of every sample of the shards in DIR
    (img2dataset output or ours), in place or into --out; each shard is rewritten to a
    temporary file and renamed, and a re-run skips shards already labelled"""


def register(sub) -> None:
    p = sub.add_parser(
        "labels",
        help="the noun labels of a caption, or `labels add DIR` for existing shards",
        description=LABELS_HELP,
        formatter_class=RawDescriptionDefaultsHelpFormatter,
        usage="nxtrec labels [options] TEXT... | nxtrec labels add DIR [options]",
    )
    add_label_options(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="caption words, or `add DIR ...`")
    p.set_defaults(func=run_labels)


def run_labels(args) -> int:
    # Options may come before the caption (parsed by the `labels` parser) or after it (in
    # `rest`); both are honoured.
    if args.rest and args.rest[0] == "add":
        p = argparse.ArgumentParser(prog="nxtrec labels add", description="add labels to existing shards",
                                    formatter_class=DefaultsHelpFormatter)
        p.add_argument("dir", type=existing_dir, help="folder of .tar shards")
        p.add_argument("--out", help="write the labelled shards here instead of replacing the originals")
        p.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, help=f"processes (default {DEFAULT_WORKERS})")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        add_label_options(p, args)
        return _labels_add(p.parse_args(args.rest[1:]))
    p = argparse.ArgumentParser(prog="nxtrec labels", usage="nxtrec labels [options] TEXT...",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("text", nargs="+", help='caption words, or "-" for one caption per line on standard input')
    p.add_argument("--json", action="store_true", default=args.json, help=JSON_HELP)
    add_label_options(p, args)
    if not args.rest:
        p.error("give a caption, or `add DIR`")
    opts = p.parse_args(args.rest)
    return _labels_print(opts)


def _labels_print(opts) -> int:
    from nxtrec.data.labels import extract_labels_batch

    if opts.text == ["-"]:
        captions = [line.rstrip("\n") for line in sys.stdin]
    else:
        captions = [" ".join(opts.text)]
    for caption, labels in zip(captions, extract_labels_batch(captions, opts.backend, opts.compat)):
        if opts.json:
            print(json.dumps({"caption": caption, "labels": labels}, ensure_ascii=False))
        else:
            print(", ".join(labels))
    return 0


def _labels_add(opts) -> int:
    from nxtrec.data.relabel import add_labels

    try:
        summary = add_labels(opts.dir, opts.out, opts.backend, opts.compat, opts.workers, not opts.no_progress)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to finish", file=sys.stderr)
        return 130
    print(summary.format().replace("wrote", "labelled", 1))
    return 1 if summary.damaged else 0
