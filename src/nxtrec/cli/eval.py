"""`nxtrec eval`: predict labels for validation shards and score them."""

from __future__ import annotations

import os
import sys

from nxtrec.cli.adapter_options import add_adapter_argument
from nxtrec.cli.metric_options import add_embedder_arguments, add_match_arguments, calibration_lines
from nxtrec.cli.notices import demo_notice, loading
from nxtrec.cli.options import device, existing_dir, fraction, non_negative_int, positive_int
from nxtrec.cli.vocab_options import add_vocab_arguments, vocab_kwargs

# Samples eval may skip (corrupt image, unreadable shard...) before its exit code says so:
# none by default, so that a lost sample never goes unnoticed.
DEFAULT_MAX_SKIPPED = 0.0


def register(sub) -> None:
    p = sub.add_parser("eval", help="R/P/F1 at top-k of a model on validation shards")
    p.add_argument("--model", help="model directory (default: the bundled default model)")
    p.add_argument("--onnx", metavar="DIR", type=existing_dir, help="evaluate an exported ONNX directory with ONNX Runtime")
    p.add_argument("--data", required=True, help="a registry dataset name, or a shard folder / pattern")
    p.add_argument("--registry", help="dataset registry file (default: $NXTREC_REGISTRY, else ./datasets.toml)")
    p.add_argument("--top-k", type=positive_int, nargs="+", default=[10], help="one or more k; predictions are made once")
    p.add_argument("--ranking", default="prob", choices=["prob", "ppl", "sim", "none"], help="label order, as predict --ranking")
    add_embedder_arguments(p)
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
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no note on stderr about the bundled demo model, no loading line")
    add_vocab_arguments(p)
    add_match_arguments(p)
    add_adapter_argument(p)
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from nxtrec.engines import capabilities_of, check_engine_choice, load_engine
    from nxtrec.evaluation.evaluate import evaluate, format_table
    from nxtrec.inference.engine import DecodeOptions

    check_engine_choice(args.model, args.onnx, args.device, args.dtype)
    DecodeOptions(ranking=args.ranking, **vocab_kwargs(args)).check(capabilities_of(onnx=bool(args.onnx)))

    demo_notice(args.model, args.onnx, quiet=args.quiet or os.environ.get("RANK", "0") != "0")  # torchrun: rank 0

    def load(device: str):
        with loading("eval", args.model, args.onnx, quiet=args.quiet):
            return load_engine(args.model, args.onnx, device=device, dtype=args.dtype, adapter=args.adapter)

    skipped: dict[str, int] = {}
    damaged: list[dict] = []
    calibration: dict = {}
    summaries = evaluate(args.onnx or args.model, args.data, args.top_k, args.ranking, args.embedder, args.out, args.registry,
                         args.batch_size, args.device, args.dtype, args.limit, args.workers,
                         clip_file=args.clip_file, clip_vocab=args.clip_vocab, max_tokens=args.metric_max_tokens,
                         predict_kwargs=vocab_kwargs(args), skipped=skipped, load=load, damaged=damaged,
                         match=args.match, synonyms=args.synonyms or args.vocab, calibration=calibration)
    if summaries is None:
        return 0  # not the main rank
    print(format_table(summaries))
    # on stderr: stdout stays the R/P/F1 table, the one `nxtrec score` reproduces
    print(calibration_lines(calibration), file=sys.stderr)
    return report_skipped(skipped, next(iter(summaries.values())).n_images, args.max_skipped, damaged)


def report_skipped(skipped: dict[str, int], evaluated: int, max_fraction: float, damaged: list[dict] = ()) -> int:
    """A line under the table with the skipped samples by reason (when any) and one with the
    damaged shards (when any); exit code 1 above `max_fraction`, or when a damaged shard lost
    an unknown number of samples."""
    total = sum(skipped.values())
    fraction = total / max(total + evaluated, 1)
    if total:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
        print(f"skipped {total} of {total + evaluated} samples ({fraction:.1%}: {reasons})")
    if damaged:
        shards = ", ".join(f"{d['shard']} ({d['damage']}; " + ("samples lost: unknown" if d["lost"] is None
                           else f"{d['lost']} samples lost") + ")" for d in damaged)
        print(f"{len(damaged)} damaged shard{'s' if len(damaged) > 1 else ''}: {shards}")
    if any(d["lost"] is None for d in damaged) and fraction <= max_fraction:
        print("nxtrec eval: damaged shards lost samples (how many is unknown: no manifest); the scores above leave "
              "them out", file=sys.stderr)
        return 1
    if fraction > max_fraction:
        print(f"nxtrec eval: {fraction:.1%} of the samples were skipped, more than --max-skipped {max_fraction:g}; "
              "the scores above leave them out", file=sys.stderr)
        return 1
    return 0
