"""`nxtrec pack`, `nxtrec labels` and `nxtrec data`: build WebDataset shards with labels,
label captions or existing shards, and look at registered datasets."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from nxtrec.cli.help import DefaultsHelpFormatter, RawDescriptionDefaultsHelpFormatter
from nxtrec.cli.options import existing_dir, existing_file, int_between, positive_int
from nxtrec.errors import NxtrecError

BACKENDS = ("spacy", "nltk")  # nxtrec.labels.BACKENDS, repeated to keep spaCy out of start-up
JSON_HELP = 'one {"caption", "labels"} JSON object per caption'
COMPAT_HELP = "the reference's label rules: substring noise-word removal, duplicate lemmas kept"
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def register(sub) -> None:
    _register_pack(sub)
    _register_labels(sub)
    _register_data(sub)


# ---------------------------------------------------------------------------- pack


def _register_pack(sub) -> None:
    p = sub.add_parser("pack", help="pack an image-caption dataset into WebDataset shards with labels")
    kinds = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    coco = kinds.add_parser("coco", help="COCO images + captions_*.json (all captions of an image joined)")
    coco.add_argument("--images", required=True, type=existing_dir, help="folder of the images, e.g. coco/val2017")
    coco.add_argument("--captions", required=True, type=existing_file, help="captions_*.json")
    oi = kinds.add_parser("openimages", help="OpenImages images + Localized Narratives JSONL")
    oi.add_argument("--images", required=True, type=existing_dir, help="folder of IMAGE_ID.jpg")
    oi.add_argument("--narratives", required=True, type=existing_file, help="*_localized_narratives.jsonl")
    jl = kinds.add_parser("jsonl", help='lines {"image": PATH, "caption": TEXT} (optional "key")')
    jl.add_argument("file", type=existing_file, help="the JSONL file")
    jl.add_argument("--images", help="folder relative image paths start from (default: the file's folder)")
    folder = kinds.add_parser("folder", help="images with a same-name .txt caption beside each")
    folder.add_argument("folder", type=existing_dir, help="folder searched recursively")
    for k in (coco, oi, jl, folder):
        k.add_argument("--out", required=True, help="output folder of NNNNNN.tar shards and manifest.json")
        k.add_argument("--split", help="split name stored in every sample (default: from the file name, if any)")
        k.add_argument("--shard-size", type=positive_int, default=1000, help="records per shard (default 1000)")
        k.add_argument(
            "--resize-shorter", type=int, metavar="N",
            help="re-encode images whose shorter side exceeds N to N (JPEG); default: copy as they are",
        )  # fmt: skip
        k.add_argument("--quality", type=int_between(1, 100), default=95, help="JPEG quality when re-encoding (default 95)")
        k.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, help=f"processes (default {DEFAULT_WORKERS})")
        k.add_argument("--backend", choices=BACKENDS, default="spacy", help="label backend (default spacy)")
        k.add_argument("--compat", action="store_true", help=COMPAT_HELP)
        k.add_argument("--no-progress", action="store_true", help="no progress bar")
        k.set_defaults(func=run_pack)


def _split_from_name(path: str) -> str:
    import re

    name = os.path.basename(path)
    m = re.match(r"captions_(\w+)\.json$", name) or re.match(r"open_images_(\w+?)_localized_narratives", name)
    return m.group(1) if m else ""


def run_pack(args) -> int:
    from nxtrec.data import pack, sources

    if args.source == "coco":
        records, split = sources.coco_records(args.images, args.captions), _split_from_name(args.captions)
    elif args.source == "openimages":
        records, split = sources.openimages_records(args.images, args.narratives), _split_from_name(args.narratives)
    elif args.source == "jsonl":
        records, split = sources.jsonl_records(args.file, args.images), ""
    else:
        records, split = sources.folder_records(args.folder), ""
    if not records:
        raise NxtrecError(f"no records found for pack {args.source}")
    options = pack.PackOptions(args.shard_size, args.resize_shorter, args.quality, args.backend, args.compat)
    try:
        summary = pack.pack(
            records, args.out, args.source, split if args.split is None else args.split, options,
            workers=args.workers, progress=not args.no_progress,
        )  # fmt: skip
    except KeyboardInterrupt:
        print(f"interrupted: finished shards are kept; run the same command to finish {args.out}", file=sys.stderr)
        return 130
    print(summary.format())
    return 0


# ---------------------------------------------------------------------------- labels


LABELS_HELP = """\
nxtrec labels [--backend spacy|nltk] [--compat] [--json] TEXT...
    print the labels of a caption (TEXT words are joined); TEXT "-" reads one caption per
    line from standard input and prints one line of labels per caption
nxtrec labels add DIR [--out DIR] [--workers N] [--backend ...] [--compat]
    add the `labels` field to the KEY.json of every sample of the shards in DIR
    (img2dataset output or ours), in place or into --out; each shard is rewritten to a
    temporary file and renamed, and a re-run skips shards already labelled"""


def _register_labels(sub) -> None:
    p = sub.add_parser(
        "labels",
        help="the noun labels of a caption, or `labels add DIR` for existing shards",
        description=LABELS_HELP,
        formatter_class=RawDescriptionDefaultsHelpFormatter,
        usage="nxtrec labels [options] TEXT... | nxtrec labels add DIR [options]",
    )
    _label_options(p)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="caption words, or `add DIR ...`")
    p.set_defaults(func=run_labels)


def _label_options(p, defaults=None) -> None:
    defaults = defaults or argparse.Namespace(backend="spacy", compat=False)
    p.add_argument("--backend", choices=BACKENDS, default=defaults.backend, help="label backend (default spacy)")
    p.add_argument("--compat", action="store_true", default=defaults.compat, help=COMPAT_HELP)


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
        _label_options(p, args)
        return _labels_add(p.parse_args(args.rest[1:]))
    p = argparse.ArgumentParser(prog="nxtrec labels", usage="nxtrec labels [options] TEXT...",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("text", nargs="+", help='caption words, or "-" for one caption per line on standard input')
    p.add_argument("--json", action="store_true", default=args.json, help=JSON_HELP)
    _label_options(p, args)
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


# ---------------------------------------------------------------------------- data


def _register_data(sub) -> None:
    p = sub.add_parser("data", help="registered datasets: list them, label statistics")
    kinds = p.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    stats = kinds.add_parser("stats", help="samples, shards, label counts and the most frequent labels")
    stats.add_argument("name", help="a dataset of the registry, or a shard folder / pattern")
    stats.add_argument("--top", type=positive_int, default=20, help="how many frequent labels to show (default 20)")
    stats.add_argument("--png", help="save a bar chart of the most frequent labels here")
    lst = kinds.add_parser("list", help="the datasets of the registry with their lengths")
    for k in (stats, lst):
        k.add_argument("--registry", help="registry file (default: $NXTREC_REGISTRY, else ./datasets.toml)")
    stats.set_defaults(func=run_stats)
    lst.set_defaults(func=run_list)


def run_stats(args) -> int:
    from nxtrec.data.registry import dataset_shards
    from nxtrec.data.stats import label_stats, plot_label_counts

    with warnings.catch_warnings():  # damaged shards are reported below, once, with the others
        warnings.simplefilter("ignore")
        (spec, shards), = dataset_shards(args.name, args.registry)  # fmt: skip
    stats = label_stats(shards)
    labelled = stats.samples - stats.unlabelled
    print(f"dataset   {spec.name}" + (f" (split {spec.split})" if spec.split else ""))
    print(f"shards    {len(shards)}" + (f" ({len(stats.damaged)} damaged)" if stats.damaged else ""))
    print(f"samples   {stats.samples}")
    print(f"labelled  {labelled} ({stats.empty} with no labels, {stats.unlabelled} without a labels field)")
    print(f"labels    {sum(stats.counts.values())} in all, {len(stats.counts)} distinct, "
          f"{stats.labels_per_sample:.2f} per labelled sample")  # fmt: skip
    if stats.counts:
        print(f"top {min(args.top, len(stats.counts))} labels (samples with the label):")
        width = max(len(label) for label, _ in stats.counts.most_common(args.top))
        for i, (label, n) in enumerate(stats.counts.most_common(args.top), 1):
            print(f"  {i:3d}  {label:<{width}}  {n:8d}  {100.0 * n / max(labelled, 1):5.1f}%")
    if args.png:
        if not stats.counts:
            raise NxtrecError(f"{spec.name}: no labels to plot")
        plot_label_counts(stats.counts, args.top, args.png, f"{spec.name}: top {args.top} labels")
        print(f"saved {args.png}")
    return report_damaged_shards(stats.damaged)


def report_damaged_shards(damaged: dict[str, str]) -> int:
    """Name each damaged shard on stderr, then a count; the exit code (1 when any)."""
    for path, reason in damaged.items():
        print(f"nxtrec: damaged shard {path}: {reason}", file=sys.stderr)
    if damaged:
        print(f"nxtrec: {len(damaged)} damaged shards (their readable samples are counted above)", file=sys.stderr)
    return 1 if damaged else 0


def run_list(args) -> int:
    from nxtrec.data.registry import (
        Registry,
        default_registry_path,
        expand_shards,
        shard_lengths,
    )

    registry = Registry.load(args.registry or default_registry_path())
    print(f"{'name':<24} {'split':<12} {'weight':>6} {'shards':>7} {'samples':>10}")
    for name, spec in registry.datasets.items():
        shards = shard_lengths(expand_shards(spec.shards))
        print(f"{name:<24} {spec.split:<12} {spec.weight:>6g} {len(shards):>7} {sum(s.samples for s in shards):>10}")
    return 0
