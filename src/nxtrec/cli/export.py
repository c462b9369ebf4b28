"""`nxtrec export labelstudio TAGS_DIR --out DIR`: a tag folder's records as Label Studio
tasks with predictions (DIR/tasks.json) and the labelling config of a matching project
(DIR/config.xml). See docs/formats.md."""

from __future__ import annotations

from nxtrec.cli.options import existing_dir
from nxtrec.data.labelstudio import LOCAL_FILES


def register(sub) -> None:
    p = sub.add_parser("export", help="export a tag folder's records to another tool (Label Studio)")
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    ls = targets.add_parser("labelstudio", help="Label Studio tasks with predictions, and the labelling config")
    ls.add_argument("tags_dir", type=existing_dir, help="a folder written by `nxtrec tag`")
    ls.add_argument("--out", required=True, help="folder for tasks.json and config.xml")
    ls.add_argument("--image-url", default=LOCAL_FILES,
                    help="prefix of each task's image URL, followed by the image's id (Label Studio's local files: "
                         "ids relative to LOCAL_FILES_DOCUMENT_ROOT)")
    ls.add_argument("--control", default="choices", choices=["choices", "taxonomy"],
                    help="the labelling control: multiple choice, or a taxonomy (one level)")
    ls.set_defaults(func=run_labelstudio)


def run_labelstudio(args) -> int:
    import json
    import sys
    from pathlib import Path

    from nxtrec.data.labelstudio import labelling_config, task
    from nxtrec.errors import NxtrecError
    from nxtrec.tagging.output import MANIFEST, read_records, write_atomic

    try:
        manifest = json.loads((Path(args.tags_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise NxtrecError(f"{args.tags_dir}: not a folder written by `nxtrec tag` ({MANIFEST}: {e})") from None
    records = list(read_records(args.tags_dir))
    model = manifest.get("settings", {}).get("model", "nxtrec")
    tasks = [task(r, model, args.image_url, args.control) for r in records]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "tasks.json", (json.dumps(tasks, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    config = labelling_config((lab["label"] for r in records for lab in r["labels"]), args.control)
    write_atomic(out / "config.xml", config.encode("utf-8"))
    print(f"nxtrec export: {len(tasks)} tasks in {out / 'tasks.json'}, labelling config in {out / 'config.xml'}",
          file=sys.stderr)  # fmt: skip
    return 0
