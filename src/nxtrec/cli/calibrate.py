"""`nxtrec calibrate --model DIR --data VAL [--out FILE]`: fit the map from a label's prob to
the chance that it is right, on ground truth `nxtrec eval` reads (docs/calibration.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nxtrec.cli.metric_options import add_match_arguments
from nxtrec.cli.notices import loading
from nxtrec.cli.options import device, non_negative_int, positive_int
from nxtrec.errors import NxtrecError


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit a calibrated confidence for a model's labels on validation data "
                       "(extra: calibrate)")
    p.add_argument("--model", help="model directory (default: the bundled default model)")
    p.add_argument("--data", required=True, help="ground truth: a registry dataset name, or a shard folder / pattern")
    p.add_argument("--registry", help="dataset registry file (default: $NXTREC_REGISTRY, else ./datasets.toml)")
    p.add_argument("--out", help="calibration file (default: MODEL/calibration.json, where predict, tag and serve "
                   "find it); the reliability diagram goes beside it (.png)")
    p.add_argument("--top-k", type=positive_int, default=10, help="labels scored per image, as predict --top-k")
    add_match_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward pass")
    p.add_argument("--workers", type=non_negative_int, default=1, help="data loader workers")
    p.add_argument("--limit", type=positive_int, help="use only the first N images")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and activations")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no loading line")
    p.set_defaults(func=run)


def data_digest(records: list[dict]) -> str:
    """SHA-256 of the ground truth used: every image's key and labels, in key order."""
    rows = sorted((str(r["image"]), list(r["gt"])) for r in records)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def run(args) -> int:
    import numpy as np
    import torch

    from nxtrec.data.loader import build_loader
    from nxtrec.engines import load_engine
    from nxtrec.evaluation.calibration import (
        Bin,
        bins_table,
        fit_calibration,
        reliability_bins,
    )
    from nxtrec.evaluation.correctness import right_labels
    from nxtrec.evaluation.evaluate import predict_records
    from nxtrec.evaluation.reliability import write_reliability_diagram
    from nxtrec.extras import require
    from nxtrec.digests import model_digest
    from nxtrec.inference.calibration import CALIBRATION_FILE
    from nxtrec.inference.engine import DecodeOptions
    from nxtrec.model.directory import default_model_dir
    from nxtrec.tagging.output import write_atomic

    require("scipy", "matplotlib", command="calibrate")
    model_dir = Path(args.model) if args.model else default_model_dir()
    out = Path(args.out) if args.out else model_dir / CALIBRATION_FILE
    digest = model_digest(model_dir)
    with loading("calibrate", args.model, quiet=args.quiet):
        engine = load_engine(str(model_dir), device=args.device, dtype=args.dtype, calibration=False)
    loader = build_loader(args.data, args.registry, batch_size=args.batch_size, image_size=engine.preprocessing.size,
                          num_workers=args.workers, balance="exact")  # fmt: skip
    with torch.inference_mode():
        records = predict_records(engine, loader, DecodeOptions(top_k=args.top_k), args.limit, not args.quiet)
    right = right_labels(records, args.match, args.synonyms)
    probs = np.array([p["prob"] for r in records for p in r["pred"]], dtype=np.float64)
    correct = np.array([c for row in right for c in row], dtype=np.float64)
    groups = np.array([i for i, r in enumerate(records) for _ in r["pred"]])
    if len(probs) < 2 or correct.sum() == 0:
        raise NxtrecError(f"{args.data}: {len(records)} images gave {len(probs)} labels, {int(correct.sum())} of them "
                          "right; a calibration needs right and wrong labels (more images, or another --match)")
    info = {"model": {"digest": digest, "name": model_dir.resolve().name},
            "data": {"source": str(args.data), "digest": data_digest(records), "images": len(records)},
            "decoding": {"top_k": args.top_k, "sampler": "one-shot", "ranking": "prob", "dtype": args.dtype},
            "match": args.match, "synonyms": args.synonyms}  # fmt: skip
    calibration = fit_calibration(probs, correct, groups, digest, info)
    record = calibration.to_dict()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, (json.dumps(record, indent=1) + "\n").encode("utf-8"))
    except PermissionError as e:  # e.g. the bundled model inside a read-only install
        raise NxtrecError(f"{out}: cannot write the calibration ({e.strerror}); choose another place with --out "
                          "and pass it to predict, tag and serve with --calibration FILE") from None
    # the confidences of maps fitted without each label's image (an isotonic fit is exact on its own data)
    diagram = write_reliability_diagram(out.with_suffix(".png"), {
        "prob (raw)": ([Bin(**b) for b in record["bins_raw"]], record["ece_raw"]),
        "confidence (cross-validated)": ([Bin(**b) for b in record["bins_calibrated"]], record["ece_calibrated"])},
        title=f"{model_dir.resolve().name} on {args.data}")  # fmt: skip
    print(bins_table(reliability_bins(probs, correct)))
    print(summary_lines(record, out, diagram))
    return 0


def summary_lines(record: dict, out: Path, diagram: Path) -> str:
    profiles = ", ".join(f"{name} >= {p['threshold']:.4g} (precision {p['precision']:.3f}, recall {p['recall']:.3f})"
                         for name, p in record["profiles"].items())  # fmt: skip
    return (f"{record['n']} labels of {record['n_images']} images, {record['right']} right; method {record['method']} "
            f"(cross-validated ECE: {', '.join(f'{m} {v:.4f}' for m, v in record['cv']['ece'].items())})\n"
            f"ECE {record['ece_raw']:.4f} raw -> {record['ece_calibrated']:.4f} calibrated (cross-validated)\n"
            f"profiles: {profiles}\nwrote {out} and {diagram}")
