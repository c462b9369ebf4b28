"""`nxtrec pack`: WebDataset shards with labels from an image-caption dataset."""

from __future__ import annotations

import os
import sys

from nxtrec.cli.label_options import DEFAULT_WORKERS, add_label_options
from nxtrec.cli.options import existing_dir, existing_file, int_between, positive_int
from nxtrec.errors import NxtrecError


def register(sub) -> None:
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
        add_label_options(k)
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
