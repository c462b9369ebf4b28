"""`nxtrec data`: registered datasets, their lengths and label statistics."""

from __future__ import annotations

import sys
import warnings

from nxtrec.cli.options import positive_int
from nxtrec.errors import NxtrecError


def register(sub) -> None:
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
