"""`nxtrec eval` (predict + score validation shards) and `nxtrec score` (score saved predictions)."""

from __future__ import annotations

import json

from nxtrec.errors import NxtrecError


def register(sub) -> None:
    p = sub.add_parser("eval", help="R/P/F1 at top-k of a model on validation shards")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", required=True, help="a registry dataset name, or a shard folder / pattern")
    p.add_argument("--registry", help="dataset registry file (default: $NXTREC_REGISTRY, else ./datasets.toml)")
    p.add_argument("--top-k", type=int, nargs="+", default=[10], help="one or more k; predictions are made once")
    p.add_argument("--ranking", default="prob", choices=["prob", "ppl", "sim", "none"])
    _embedder_arguments(p)
    p.add_argument("--out", help="summary JSON; per-image rows go to the same name with .jsonl, and a row per k "
                   "is appended to results.md / results.csv beside it")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=1, help="data loader workers")
    p.add_argument("--limit", type=int, help="evaluate only the first N images (per process)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=run_eval)

    s = sub.add_parser("score", help="R/P/F1 of saved predictions, without the model")
    s.add_argument("predictions", help="JSONL: {\"image\": ID, \"labels\": [...] or [{\"label\", \"prob\"}...], \"gt\": [...]}")
    s.add_argument("--gt", help="JSONL of {\"image\": ID, \"gt\": [...]} when the predictions file has no gt")
    s.add_argument("--top-k", type=int, nargs="+", default=[10])
    _embedder_arguments(s)
    s.set_defaults(func=run_score)


def _embedder_arguments(p) -> None:
    p.add_argument("--embedder", default="minilm", choices=["minilm", "clip"],
                   help="label embedding model: MiniLM (the published numbers) or CLIP ViT-L/14's text tower")
    p.add_argument("--clip-file", help="for --embedder clip: OpenAI's ViT-L-14.pt (TorchScript or state dict)")
    p.add_argument("--clip-vocab", help="for --embedder clip: CLIP's BPE file bpe_simple_vocab_16e6.txt.gz")


def run_eval(args) -> int:
    from nxtrec.evaluation.evaluate import evaluate, format_table

    summaries = evaluate(args.model, args.data, args.top_k, args.ranking, args.embedder, args.out, args.registry,
                         args.batch_size, args.device, args.dtype, args.limit, args.workers,
                         clip_file=args.clip_file, clip_vocab=args.clip_vocab)
    if summaries is not None:
        print(format_table(summaries))
    return 0


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise NxtrecError(f"{path}:{n}: invalid JSON ({e.msg})") from None
    except FileNotFoundError:
        raise NxtrecError(f"{path}: no such file") from None
    return rows


def load_prediction_records(path: str, gt_path: str | None = None) -> list[dict]:
    """Records {"image", "gt", "pred"} from a predictions JSONL (ours, or another system's)."""
    gt = {str(r["image"]): r.get("gt", r.get("labels")) for r in _read_jsonl(gt_path)} if gt_path else {}
    records = []
    for n, row in enumerate(_read_jsonl(path), 1):
        if "image" not in row:
            raise NxtrecError(f"{path}:{n}: no \"image\" field")
        image = str(row["image"])
        pred = row.get("pred", row.get("labels"))
        truth = gt.get(image, row.get("gt"))
        if pred is None or truth is None:
            raise NxtrecError(f"{path}:{n}: image {image!r} lacks {'labels' if pred is None else 'gt'}")
        records.append({"image": image, "gt": list(truth), "pred": pred})
    return records


def run_score(args) -> int:
    from nxtrec.evaluation.evaluate import format_table, score

    records = load_prediction_records(args.predictions, args.gt)
    print(format_table(score(records, sorted(args.top_k), args.embedder, "cpu", args.clip_file, args.clip_vocab)))
    return 0
