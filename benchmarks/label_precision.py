"""Label precision and recall of the caption-to-label backends on 50 real COCO captions
annotated by hand (tests/data/coco_captions_50.json: source and guidelines inside).

    python benchmarks/label_precision.py [--backend spacy nltk] [--errors]

Micro-averaged over the 50 captions: precision = labels that are in the annotation / all
labels produced; recall = annotated labels produced / all annotated labels. Both the default
mode and `compat=True` (the reference's behaviour) are scored. A backend whose data is not
installed is reported as such.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nxtrec.data.labels import extract_labels_batch
from nxtrec.errors import NxtrecError

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco_captions_50.json"


def score(predicted: list[list[str]], gold: list[list[str]]) -> tuple[float, float, list[str], list[str]]:
    """(precision, recall, false positives, misses) over all captions."""
    wrong = [w for p, g in zip(predicted, gold) for w in p if w not in g]
    missed = [w for p, g in zip(predicted, gold) for w in g if w not in p]
    n_pred, n_gold = sum(map(len, predicted)), sum(map(len, gold))
    return (n_pred - len(wrong)) / n_pred, (n_gold - len(missed)) / n_gold, wrong, missed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", nargs="+", default=["spacy", "nltk"])
    ap.add_argument("--errors", action="store_true", help="list the false positives and the misses")
    args = ap.parse_args()
    rows = json.loads(FIXTURE.read_text())["captions"]
    captions, gold = [r["caption"] for r in rows], [r["labels"] for r in rows]
    for backend in args.backend:
        for compat in (False, True):
            name = f"{backend}{' compat' if compat else ''}"
            try:
                predicted = extract_labels_batch(captions, backend, compat)
            except NxtrecError as e:
                print(f"{name:14} not measured: {e}")
                break
            precision, recall, wrong, missed = score(predicted, gold)
            print(f"{name:14} precision {precision:.3f}  recall {recall:.3f}  ({sum(map(len, predicted))} labels, {len(wrong)} wrong, {len(missed)} missed)")
            if args.errors:
                print(f"  wrong:  {' '.join(wrong)}\n  missed: {' '.join(missed)}")


if __name__ == "__main__":
    main()
