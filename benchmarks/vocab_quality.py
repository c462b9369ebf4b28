"""Free decoding vs `--vocab` vs `--map-to` on the held-out synthetic scenes, with the scene
categories as the tag list: R/P/F1 at 5 and 10 (MiniLM, as `nxtrec eval`), how often the top
label is right, and how many ground-truth labels are among the top 5. A label counts as
right when it names the same category as a ground-truth label (a synonym counts: "dog" for a
caption's "puppy"), so the three rows are judged alike.

    nxtrec synth --out data/synth --n 0 --val 1000 --seed 0     # the held-out scenes only
    python benchmarks/vocab_quality.py --data data/synth/val
"""

from __future__ import annotations

import argparse
import time

import torch

from nxtrec.data.loader import build_loader
from nxtrec.data.synth import CATEGORIES
from nxtrec.evaluation.evaluate import predict_records, score
from nxtrec.inference.mapping import DEFAULT_MAP_THRESHOLD, LabelMapper
from nxtrec.inference.ranking import Label
from nxtrec.inference.recognizer import Recognizer
from nxtrec.inference.vocab import LabelList
from nxtrec.model.embedders import MiniLMEmbedder

CATEGORY_OF = {form: c.name for c in CATEGORIES for form in (c.name, *c.synonyms)}


def plain_figures(records: list[dict]) -> tuple[int, int, int]:
    """(scenes whose top label is right, ground-truth labels among the top 5, all of them)."""
    top1 = found = total = 0
    for r in records:
        gt = {CATEGORY_OF.get(g, g) for g in r["gt"]}
        preds = [CATEGORY_OF.get(p["label"], p["label"]) for p in r["pred"]]
        top1 += bool(preds) and preds[0] in gt
        found += len(gt & set(preds[:5]))
        total += len(gt)
    return top1, found, total


def mapped(records: list[dict], mapper: LabelMapper) -> list[dict]:
    out = []
    for r in records:
        labels = mapper.map([Label(p["label"], p["prob"]) for p in r["pred"]])
        out.append({**r, "pred": [lab.to_dict() for lab in labels]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="held-out shards (nxtrec synth ... /val)")
    ap.add_argument("--model", help="model directory (default: the bundled demo model)")
    ap.add_argument("--map-threshold", type=float, default=DEFAULT_MAP_THRESHOLD)
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    tags = LabelList.from_lines([" | ".join((c.name, *c.synonyms)) for c in CATEGORIES], "synth categories")
    rec = Recognizer.from_pretrained(args.model)
    rows = {}
    with torch.inference_mode():
        for name, kwargs in (("free decoding", {}), ("--vocab", {"vocab": tags})):
            loader = build_loader(args.data, None, batch_size=32, image_size=rec.config.encoder.image_size,
                                  num_workers=0, balance="exact")
            start = time.perf_counter()
            rows[name] = predict_records(rec, loader, 10, limit=args.limit, progress=False, **kwargs)
            print(f"{name}: predicted in {time.perf_counter() - start:.0f} s")
    mapper = LabelMapper(tags, args.map_threshold, MiniLMEmbedder())
    rows[f"--map-to (threshold {args.map_threshold})"] = mapped(rows["free decoding"], mapper)
    print("| decoding | R@5 | P@5 | F1@5 | R@10 | P@10 | F1@10 | top-1 right | GT in top 5 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, records in rows.items():
        s = score(records, [5, 10])
        top1, found, total = plain_figures(records)
        print(f"| {name} | {s[5].recall:.4f} | {s[5].precision:.4f} | {s[5].f1:.4f} | {s[10].recall:.4f} | "
              f"{s[10].precision:.4f} | {s[10].f1:.4f} | {top1} / {len(records)} | {found} / {total} |")


if __name__ == "__main__":
    main()
