"""`nxtrec import labelstudio EXPORT.json --out GT.jsonl` and `nxtrec import xmp IMAGES...
--out GT.jsonl`: people's labels (Label Studio annotations, or the keywords of XMP sidecars
that nxtrec did not write) as the ground-truth JSONL that `nxtrec score --gt` reads.
(`import_`: `import` is a Python keyword.)"""

from __future__ import annotations

from nxtrec.data.xmp import SIDECAR_NAMES


def register(sub) -> None:
    p = sub.add_parser("import", help="people's labels from another tool as ground truth for `nxtrec score --gt`")
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    ls = sources.add_parser("labelstudio", help="the annotations of a Label Studio JSON export")
    ls.add_argument("export", help="Label Studio export, JSON format (tasks with annotations)")
    ls.add_argument("--out", required=True, help="ground-truth JSONL: {\"image\": ID, \"gt\": [...]} per annotated task")
    ls.set_defaults(func=run_labelstudio)
    xmp = sources.add_parser("xmp", help="the keywords of the images' XMP sidecars that nxtrec did not add")
    xmp.add_argument("inputs", nargs="+", help="image files, folders (recursive) and globs, as given to `nxtrec tag`")
    xmp.add_argument("--out", required=True, help="ground-truth JSONL: {\"image\": ID, \"gt\": [...]} per image")
    xmp.add_argument("--xmp-name", default="image", choices=SIDECAR_NAMES,
                     help="sidecar photo.jpg.xmp or photo.xmp, as `nxtrec tag --xmp-name`")
    xmp.set_defaults(func=run_xmp)


def _write(rows: list[dict], out: str, what: str, left_out: int) -> int:
    import json
    import sys
    from pathlib import Path

    from nxtrec.tagging.output import write_atomic

    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    write_atomic(Path(out), data)
    print(f"nxtrec import: {len(rows)} images with ground truth in {out}; {left_out} {what}", file=sys.stderr)
    return 0


def run_labelstudio(args) -> int:
    from nxtrec.data.labelstudio import ground_truth, read_export

    rows, unannotated = ground_truth(read_export(args.export), args.export)
    return _write(rows, args.out, "tasks without an annotation left out", unannotated)


def run_xmp(args) -> int:
    from nxtrec.data.xmp import ground_truth
    from nxtrec.errors import NxtrecError
    from nxtrec.tagging.inputs import collect_inputs

    items = collect_inputs(args.inputs)
    if not items:
        raise NxtrecError("no images found in the given inputs")
    rows, without = ground_truth([(item.id, item.source) for item in items], args.xmp_name)
    return _write(rows, args.out, "images without a sidecar keyword of their own left out", without)
