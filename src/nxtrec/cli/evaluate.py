"""`nxtrec eval` (predict + score validation shards) and `nxtrec score` (score saved predictions)."""

from __future__ import annotations

import sys

from nxtrec.cli.options import (
    device,
    existing_file,
    fraction,
    non_negative_int,
    positive_int,
)
from nxtrec.cli.vocab_options import add_vocab_arguments, vocab_kwargs
from nxtrec.errors import NxtrecError

# Samples eval may skip (corrupt image, unreadable shard...) before its exit code says so.
DEFAULT_MAX_SKIPPED = 0.01


def register(sub) -> None:
    p = sub.add_parser("eval", help="R/P/F1 at top-k of a model on validation shards")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="a registry dataset name, or a shard folder / pattern")
    p.add_argument("--registry", help="dataset registry file (default: $NXTREC_REGISTRY, else ./datasets.toml)")
    p.add_argument("--top-k", type=positive_int, nargs="+", default=[10], help="one or more k; predictions are made once")
    p.add_argument("--ranking", default="prob", choices=["prob", "ppl", "sim", "none"], help="label order, as predict --ranking")
    _embedder_arguments(p)
    p.add_argument("--out", help="summary JSON; per-image rows go to the same name with .jsonl, and a row per k "
                   "is appended to results.md / results.csv beside it")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    p.add_argument("--workers", type=non_negative_int, default=1, help="data loader workers")
    p.add_argument("--limit", type=positive_int, help="evaluate only the first N images (per process)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ... (torchrun: each rank its own GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations")
    p.add_argument("--max-skipped", type=fraction, default=DEFAULT_MAX_SKIPPED, metavar="FRACTION",
                   help="exit with code 1 when more than this fraction of the samples was skipped (corrupt image, "
                   f"unreadable shard, ...; default {DEFAULT_MAX_SKIPPED})")
    add_vocab_arguments(p)
    p.set_defaults(func=run_eval)

    s = sub.add_parser("score", help="R/P/F1 of saved predictions, without the model")
    s.add_argument("predictions", type=existing_file, help="JSONL: {\"image\": ID, \"labels\": [...] or [{\"label\", \"prob\"}...], \"gt\": [...]}")
    s.add_argument("--gt", type=existing_file, help="JSONL of {\"image\": ID, \"gt\": [...]} when the predictions file has no gt")
    s.add_argument("--top-k", type=positive_int, nargs="+", default=[10], help="one or more k: score the first k labels")
    _embedder_arguments(s)
    s.set_defaults(func=run_score)


def _embedder_arguments(p) -> None:
    p.add_argument("--embedder", default="minilm", choices=["minilm", "clip"],
                   help="label embedding model: MiniLM (the published numbers) or CLIP ViT-L/14's text tower")
    p.add_argument("--clip-file", type=existing_file, help="for --embedder clip: OpenAI's ViT-L-14.pt (TorchScript or state dict)")
    p.add_argument("--clip-vocab", type=existing_file, help="for --embedder clip: CLIP's BPE file bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--metric-max-tokens", type=int, choices=[128, 512], default=512,
                   help="MiniLM's word-piece limit: 512 as the reference's evaluation (default), or 128, its metric "
                        "class's default (only labels over 128 pieces differ)")


def run_eval(args) -> int:
    from nxtrec.evaluation.evaluate import evaluate, format_table

    skipped: dict[str, int] = {}
    summaries = evaluate(args.model, args.data, args.top_k, args.ranking, args.embedder, args.out, args.registry,
                         args.batch_size, args.device, args.dtype, args.limit, args.workers,
                         clip_file=args.clip_file, clip_vocab=args.clip_vocab, max_tokens=args.metric_max_tokens,
                         predict_kwargs=vocab_kwargs(args), skipped=skipped)
    if summaries is None:
        return 0  # not the main rank
    print(format_table(summaries))
    return report_skipped(skipped, next(iter(summaries.values())).n_images, args.max_skipped)


def report_skipped(skipped: dict[str, int], evaluated: int, max_fraction: float) -> int:
    """A line under the table with the skipped samples by reason (when any); exit code 1 above
    `max_fraction`."""
    total = sum(skipped.values())
    fraction = total / max(total + evaluated, 1)
    if total:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
        print(f"skipped {total} of {total + evaluated} samples ({fraction:.1%}: {reasons})")
    if fraction > max_fraction:
        print(f"nxtrec eval: {fraction:.1%} of the samples were skipped, more than --max-skipped {max_fraction:g}; "
              "the scores above leave them out", file=sys.stderr)
        return 1
    return 0


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; an empty file is an error."""
    from nxtrec.data.sources import read_jsonl

    rows = list(read_jsonl(path, "file"))
    if not rows:
        raise NxtrecError(f"{path}: no records (the file is empty)")
    return rows


def _image_id(row: dict, path: str, line: int, seen: dict[str, int]) -> str:
    where = f"{path}:{line}"
    if "image" not in row:
        raise NxtrecError(f"{where}: no \"image\" field")
    if not isinstance(row["image"], (str, int)) or isinstance(row["image"], bool):
        raise NxtrecError(f"{where}: \"image\" must be a string or an integer id, got {type(row['image']).__name__}")
    image = str(row["image"])
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


def run_score(args) -> int:
    from nxtrec.evaluation.evaluate import format_table, score

    records = load_prediction_records(args.predictions, args.gt)
    print(format_table(score(records, sorted(args.top_k), args.embedder, "cpu", args.clip_file, args.clip_vocab,
                             args.metric_max_tokens)))
    return 0
