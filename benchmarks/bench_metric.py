"""Metric throughput: nxtrec's batched, cached MiniLM scoring vs the reference's way (every
label of every image encoded on its own, padded to 128 tokens), on the same records.

    python benchmarks/bench_metric.py --images 200 --k 10
"""

import argparse
import random
import resource
import time

import torch
import torch.nn.functional as F

from nxtrec.evaluation.metric import score_records
from nxtrec.model.embedders import MiniLMEmbedder
from nxtrec.model.presets import _NOUNS


def make_records(n, k, seed=0):
    rng = random.Random(seed)
    vocab = _NOUNS + [f"{a} {b}" for a, b in zip(_NOUNS[::3], _NOUNS[1::3])]
    return [{"image": i, "gt": rng.sample(vocab, rng.randint(3, 8)), "pred": rng.sample(vocab, k)} for i in range(n)]


def slow_direct(model, tokenizer, records, k):
    def encode(text):
        tok = tokenizer(text, max_length=128, truncation=True, padding="max_length", return_tensors="pt")
        hidden = model(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1))[0]

    f1s = []
    with torch.inference_mode():
        for r in records:
            gt = F.normalize(torch.stack([encode(t) for t in r["gt"]]), dim=1)
            pred = F.normalize(torch.stack([encode(t) for t in r["pred"][:k]]), dim=1)
            s = gt @ pred.T
            rec, prec = s.max(1).values.mean(), s.max(0).values.mean()
            f1s.append((2 * rec * prec / (rec + prec)).item())
    return sum(f1s) / len(f1s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    records = make_records(args.images, args.k)
    embedder = MiniLMEmbedder()
    t = time.perf_counter()
    ours = score_records(records, [args.k], embedder)[args.k]
    t_ours = time.perf_counter() - t
    fresh = MiniLMEmbedder()
    t = time.perf_counter()
    slow_f1 = slow_direct(fresh.model, fresh.tokenizer, records, args.k)
    t_slow = time.perf_counter() - t
    labels = sum(len(r["gt"]) + args.k for r in records)
    print(f"{args.images} images, k={args.k}, {labels} labels ({len(embedder.cache)} distinct)")
    print(f"ours:   {t_ours:8.2f} s  {args.images / t_ours:8.1f} images/s  F1 {ours.f1:.6f}")
    print(f"direct: {t_slow:8.2f} s  {args.images / t_slow:8.1f} images/s  F1 {slow_f1:.6f}")
    print(f"speed-up: {t_slow / t_ours:.1f}x; |F1 difference| {abs(ours.f1 - slow_f1):.2e}")
    print(f"peak memory (process RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
