"""How well the calibrated confidence holds on scenes it was not fitted on, with the bundled
demo model (docs/calibration.md). The labels of N held-out synthetic scenes (top-k 10, the
bundled calibration switched off) are predicted once, then:

- halves: the scenes split in two at random (seed 0); fit on one half, measure on the other,
  then swap: the ECE of prob and of confidence, and for each profile its precision and recall
  against its target;
- transfer: the labels split by the category they name (the 127 categories in two random
  halves); fit on the labels of one half, measure on the other, and swap;
- the model's own calibration (the bundled one, fitted on other scenes), on all N scenes;
- the time to fit (median of 3) against the time to predict the labels, and peak memory.

Render the scenes with a seed the demo model was not trained on (it was trained on seed 0)
and that its bundled calibration was not fitted on (seed 1), then run it under the gate:

    nxtrec synth --out data/synth-bench --n 2000 --val 0 --seed 2
    flock /tmp/nxtrec-heavy.lock python benchmarks/bench_calibration.py --data data/synth-bench/train \\
        --diagram docs/images/calibration-demo.png
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nxtrec.data.loader import build_loader
from nxtrec.data.synth import write_tag_list
from nxtrec.engines import load_engine
from nxtrec.evaluation.calibration import (
    TARGET,
    ece,
    fit_calibration,
    reliability_bins,
)
from nxtrec.evaluation.correctness import exact_matches, normalise, synonym_table
from nxtrec.evaluation.evaluate import predict_records
from nxtrec.evaluation.reliability import write_reliability_diagram
from nxtrec.inference.calibration import calibration_for
from nxtrec.inference.engine import DecodeOptions
from nxtrec.inference.vocab import LabelList
from nxtrec.model.directory import default_model_dir


def labels_of(records: list[dict], synonyms: dict) -> dict[str, np.ndarray]:
    """Flat arrays over every predicted label: prob, right, image index, category."""
    right = exact_matches(records, synonyms)
    return {"prob": np.array([p["prob"] for r in records for p in r["pred"]]),
            "right": np.array([c for row in right for c in row], dtype=float),
            "image": np.array([i for i, r in enumerate(records) for _ in r["pred"]]),
            "category": np.array([normalise(p["label"], synonyms) for r in records for p in r["pred"]])}  # fmt: skip


def measure(fit: dict, test: dict) -> dict:
    """Fit on `fit`'s labels, measure on `test`'s."""
    return measure_calibration(fit_calibration(fit["prob"], fit["right"], fit["image"], "0" * 64), test)


def measure_calibration(calibration, test: dict) -> dict:
    conf = calibration.confidence(test["prob"])
    out = {"method": calibration.method, "labels": len(conf), "ece_raw": ece(test["prob"], test["right"]),
           "ece_calibrated": ece(conf, test["right"]), "conf": conf}  # fmt: skip
    total = max(test["right"].sum(), 1)
    for name, threshold in calibration.thresholds.items():
        kept = conf >= threshold
        out[name] = {"threshold": threshold, "precision": float(test["right"][kept].mean()) if kept.any() else 0.0,
                     "recall": float(test["right"][kept].sum() / total), "kept": int(kept.sum())}  # fmt: skip
    return out


def split(labels: dict, mask: np.ndarray) -> tuple[dict, dict]:
    return {k: v[mask] for k, v in labels.items()}, {k: v[~mask] for k, v in labels.items()}


def two_ways(labels: dict, mask: np.ndarray) -> list[dict]:
    a, b = split(labels, mask)
    return [measure(a, b), measure(b, a)]


def table(name: str, runs: list[dict]) -> list[str]:
    rows = []
    for i, r in enumerate(runs):
        profiles = " | ".join(f"{r[p]['precision']:.3f} / {r[p]['recall']:.3f} ({r[p]['kept']})"
                              for p in ("precision", "balanced", "recall"))  # fmt: skip
        rows.append(f"| {name} {'AB'[i]}->{'BA'[i]} | {r['labels']} | {r['method']} | {r['ece_raw']:.4f} | "
                    f"{r['ece_calibrated']:.4f} | {profiles} |")
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    engine = load_engine(args.model, calibration=False)
    loader = build_loader(args.data, batch_size=32, image_size=engine.preprocessing.size, num_workers=1)
    start = time.perf_counter()
    with torch.inference_mode():
        records = predict_records(engine, loader, DecodeOptions(top_k=args.top_k), args.n, progress=False)
    predict_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        tags = LabelList.load(write_tag_list(Path(tmp) / "tags.txt"))
    synonyms = synonym_table(tags)
    labels = labels_of(records, synonyms)
    rng = np.random.default_rng(0)
    half = rng.permutation(len(records)) < len(records) // 2
    halves = two_ways(labels, half[labels["image"]])
    categories = sorted({normalise(forms[0]) for forms in tags.entries})
    first = set(np.array(categories)[rng.permutation(len(categories)) < len(categories) // 2])
    known = np.isin(labels["category"], categories)
    named = {k: v[known] for k, v in labels.items()}
    transfer = two_ways(named, np.isin(named["category"], list(first)))
    fits = []
    for _ in range(3):
        t0 = time.perf_counter()
        fit_calibration(*(split(labels, half[labels["image"]])[0][k] for k in ("prob", "right", "image")), "0" * 64)
        fits.append(time.perf_counter() - t0)
    fit_s = statistics.median(fits)
    if args.diagram:
        conf = np.concatenate([halves[1]["conf"], halves[0]["conf"]])
        right = np.concatenate([split(labels, half[labels["image"]])[i]["right"] for i in (0, 1)])
        prob = np.concatenate([split(labels, half[labels["image"]])[i]["prob"] for i in (0, 1)])
        write_reliability_diagram(args.diagram, {
            "prob (raw)": (reliability_bins(prob, right), ece(prob, right)),
            "confidence, fitted on the other half": (reliability_bins(conf, right), ece(conf, right))},
            title=f"bundled demo model, {len(records)} held-out scenes")  # fmt: skip
    own = calibration_for(args.model or default_model_dir())
    shipped = measure_calibration(own, labels) if own is not None else None
    return {"shipped": shipped, "images": len(records), "labels": len(labels["prob"]), "right": int(labels["right"].sum()),
            "labels_naming_no_category": int((~known).sum()), "predict_s": predict_s, "fit_s": fit_s,
            "fit_labels": int(half[labels["image"]].sum()), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "halves": halves, "transfer": transfer}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="held-out synthetic scenes (shards)")
    p.add_argument("--model", help="model directory (default: the bundled demo model)")
    p.add_argument("--n", type=int, default=2000, help="scenes")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--diagram", help="write the held-out reliability diagram (PNG) here")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    result = run(args)
    print(f"{result['images']} scenes, {result['labels']} labels ({result['right']} right, "
          f"{result['labels_naming_no_category']} naming no category); predict {result['predict_s']:.1f} s, "
          f"fit on {result['fit_labels']} labels {result['fit_s']:.2f} s ({result['fit_s'] / result['predict_s']:.3f} of "
          f"predicting), peak RSS {result['peak_rss_mb']:.0f} MB")
    print(f"target: precision profile {TARGET}, recall profile {TARGET}; cells: precision / recall (labels kept)")
    print("| split | labels | method | ECE raw | ECE calibrated | precision profile | balanced | recall profile |")
    print("|---|---|---|---|---|---|---|---|")
    runs = table("halves", result["halves"]) + table("categories", result["transfer"])
    if result["shipped"]:
        runs += [table("model's own calibration", [result["shipped"]])[0].replace(" A->B", "")]
    print("\n".join(runs))
    if args.json:
        for run_ in result["halves"] + result["transfer"] + [result["shipped"] or {}]:
            run_.pop("conf", None)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
