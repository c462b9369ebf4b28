"""`nxtrec score`: score saved predictions (ours or another system's) without the model."""

from __future__ import annotations

from nxtrec.cli.metric_options import add_embedder_arguments
from nxtrec.cli.options import existing_file, positive_int
from nxtrec.errors import NxtrecError


def register(sub) -> None:
    s = sub.add_parser("score", help="R/P/F1 of saved predictions, without the model")
    s.add_argument("predictions", type=existing_file, help="JSONL: {\"image\" (or \"id\"): ID, \"labels\": [...] or [{\"label\", \"prob\"}...], \"gt\": [...]}")
    s.add_argument("--gt", type=existing_file, help="JSONL of {\"image\": ID, \"gt\": [...]} when the predictions file has no gt")
    s.add_argument("--top-k", type=positive_int, nargs="+", default=[10], help="one or more k: score the first k labels")
    s.add_argument("--out", help="summary JSON: the scores per k and the ground-truth ids without a prediction")
    add_embedder_arguments(s)
    s.set_defaults(func=run_score)


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; an empty file is an error."""
    from nxtrec.data.sources import read_jsonl

    rows = list(read_jsonl(path, "file"))
    if not rows:
        raise NxtrecError(f"{path}: no records (the file is empty)")
    return rows


def _image_id(row: dict, path: str, line: int, seen: dict[str, int]) -> str:
    where = f"{path}:{line}"
    field = "image" if "image" in row or "id" not in row else "id"  # id: the records of `nxtrec tag`
    if field not in row:
        raise NxtrecError(f"{where}: no \"image\" field")
    if not isinstance(row[field], (str, int)) or isinstance(row[field], bool):
        raise NxtrecError(f"{where}: \"{field}\" must be a string or an integer id, got {type(row[field]).__name__}")
    image = str(row[field])
    if image in seen:
        raise NxtrecError(f"{where}: image {image!r} appears twice (first on line {seen[image]}); ids must be unique")
    seen[image] = line
    return image


def _string_list(value, field: str, where: str) -> list[str]:
    """`value` must be a list of strings (a string is not split into its letters)."""
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        got = "a string" if isinstance(value, str) else type(value).__name__
        if isinstance(value, list):
            got = "a list with a non-string item"
        raise NxtrecError(f"{where}: \"{field}\" must be a list of strings, got {got}")
    return value


def _predictions(value, field: str, where: str) -> list:
    """Labels as strings or {"label": str, "prob": number} objects."""
    if isinstance(value, list) and all(isinstance(x, dict) for x in value):
        for item in value:
            if not isinstance(item.get("label"), str):
                raise NxtrecError(f"{where}: each object in \"{field}\" needs a string \"label\"")
            prob = item.get("prob", 0.0)
            if not isinstance(prob, (int, float)) or isinstance(prob, bool):
                raise NxtrecError(f"{where}: \"prob\" in \"{field}\" must be a number, got {type(prob).__name__}")
        return value
    return _string_list(value, field, where)


def _read_gt(gt_path: str) -> dict[str, list[str]]:
    gt, seen = {}, {}
    for n, row in _read_jsonl(gt_path):
        where = f"{gt_path}:{n}"
        image = _image_id(row, gt_path, n, seen)
        field = "gt" if "gt" in row else "labels"
        if field not in row:
            raise NxtrecError(f"{where}: image {image!r} lacks gt")
        gt[image] = _string_list(row[field], field, where)
    return gt


def load_prediction_records(path: str, gt_path: str | None = None) -> list[dict]:
    """Records {"image", "gt", "pred"} from a predictions JSONL (ours, or another system's).
    Every record is checked; an error names the file and line."""
    gt = _read_gt(gt_path) if gt_path else {}
    records, seen = [], {}
    for n, row in _read_jsonl(path):
        where = f"{path}:{n}"
        image = _image_id(row, path, n, seen)
        field = "pred" if "pred" in row else "labels"
        if field not in row:
            raise NxtrecError(f"{where}: image {image!r} lacks labels")
        pred = _predictions(row[field], field, where)
        if image in gt:
            truth = gt[image]
        elif "gt" in row:
            truth = _string_list(row["gt"], "gt", where)
        else:
            raise NxtrecError(f"{where}: image {image!r} lacks gt" + (f" (not in {gt_path})" if gt_path else ""))
        records.append({"image": image, "gt": list(truth), "pred": pred})
    return records


def missing_predictions(records: list[dict], gt_path: str | None) -> tuple[list[str], int]:
    """The ids of `gt_path` that no prediction record has (their images are not scored), and
    how many ids `gt_path` holds."""
    if not gt_path:
        return [], 0
    predicted, gt = {r["image"] for r in records}, _read_gt(gt_path)
    return [image for image in gt if image not in predicted], len(gt)


def run_score(args) -> int:
    import json
    import sys

    from nxtrec.evaluation.evaluate import format_table, score

    records = load_prediction_records(args.predictions, args.gt)
    missing, n_gt = missing_predictions(records, args.gt)
    summaries = score(records, sorted(args.top_k), args.embedder, "cpu", args.clip_file, args.clip_vocab,
                      args.metric_max_tokens)
    print(format_table(summaries))
    if args.out:
        summary = {"predictions": args.predictions, "gt": args.gt, "results": [s.row() for s in summaries.values()],
                   "missing_predictions": len(missing), "missing_ids": missing}
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        print(f"nxtrec score: {len(missing)} of {n_gt} ground-truth images have no prediction in "
              f"{args.predictions} ({shown}); the scores leave them out", file=sys.stderr)
        return 1
    return 0
