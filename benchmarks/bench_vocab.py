"""What decoding into a tag list costs per one-shot step: the same one-shot run (prefix computed
once, a fixed number of greedy steps with every branch running, as `one_shot(steps=...)` does
for benchmarks) without a list and with a list of N random entries, alternating runs, best
of R. Run it under `flock /tmp/nxtrec-heavy.lock`.

    flock /tmp/nxtrec-heavy.lock python benchmarks/bench_vocab.py                 # bundled demo model
    nxtrec init-model --preset nxtp-1.78b --out /tmp/m178
    flock /tmp/nxtrec-heavy.lock python benchmarks/bench_vocab.py --model /tmp/m178 --batch 1 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import string
import time

import torch

from nxtrec.inference.constrained import TorchTrieWalk
from nxtrec.inference.recognizer import Recognizer
from nxtrec.inference.sampling import one_shot, prefill
from nxtrec.inference.vocab import LabelList, VocabTrie


def random_entries(n: int, seed: int = 0) -> list[str]:
    """n entries of 1-3 pseudo-words (3-10 letters), a fifth of them with a synonym; no form
    repeats."""
    rng = random.Random(seed)
    seen: set[str] = set()

    def form() -> str:
        while True:
            text = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10)))
                            for _ in range(rng.choice([1, 1, 2, 3])))
            if text not in seen:
                seen.add(text)
                return text

    return [form() + (f" | {form()}" if rng.random() < 0.2 else "") for _ in range(n)]


def selection_ms(trie: VocabTrie, batch: int, k: int, vocab_size: int, repeats: int = 200) -> tuple[float, float]:
    """The token choice alone on random logits [batch * k, vocab] (best of `repeats`): plain
    argmax of the softmax vs the trie-constrained choice (`TorchTrieWalk.step`)."""
    logits = torch.randn(batch * k, vocab_size)
    walk = TorchTrieWalk(trie)
    walk.first(torch.randn(batch, vocab_size), k)
    branches = list(range(batch * k))
    plain = constrained = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits.float().softmax(-1).max(-1)
        t1 = time.perf_counter()
        nodes = list(walk.nodes)
        walk.step(logits, branches)
        t2 = time.perf_counter()
        walk.nodes = nodes  # stay at the same depth
        plain, constrained = min(plain, t1 - t0), min(constrained, t2 - t1)
    return 1000 * plain, 1000 * constrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the bundled demo model)")
    ap.add_argument("--entries", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=8, help="images per run")
    ap.add_argument("--top-k", type=int, default=20, help="branches per image")
    ap.add_argument("--steps", type=int, default=18, help="greedy steps after the top-k step")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    rec = Recognizer.from_pretrained(args.model)
    start = time.perf_counter()
    labels = LabelList.from_lines(random_entries(args.entries))
    trie = VocabTrie(labels, rec.tokenizer, rec.config.prompt)
    build = time.perf_counter() - start
    print(f"list: {len(labels.entries)} entries, {sum(map(len, labels.entries))} forms, {len(trie.children)} trie nodes, "
          f"{trie.max_branches} first tokens, longest form {trie.max_tokens} tokens; built in {build:.2f} s")
    size = rec.config.encoder.image_size
    with torch.inference_mode():
        image_tokens = rec.model.encode_images(torch.randn(args.batch, 3, size, size, dtype=rec.dtype))
        prefix = prefill(rec.model, image_tokens, rec.prompt_ids)
        k = min(args.top_k, trie.max_branches)
        variants = {"no list": None, f"{args.entries}-entry list": trie}
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(args.repeats + 1):  # the first round warms up
            for name, vocab in variants.items():
                t0 = time.perf_counter()
                one_shot(rec.model, image_tokens, rec.prompt_ids, k, rec.tokenizer.delimiter_id, steps=args.steps,
                         prefix=prefix, vocab=vocab)
                best[name] = min(best[name], time.perf_counter() - t0)
    base = best["no list"] / args.steps
    print(f"batch {args.batch} x {k} branches, {args.steps} steps, best of {args.repeats}")
    for name, t in best.items():
        per_step = t / args.steps
        print(f"{name:20s} {1000 * per_step:8.3f} ms per step  {100 * (per_step / base - 1):+6.1f}%")
    plain, constrained = selection_ms(trie, args.batch, k, rec.config.decoder.vocab_size)
    print(f"token choice alone, {args.batch * k} rows: argmax {plain:.3f} ms, constrained {constrained:.3f} ms "
          f"(+{constrained - plain:.3f} ms per step)")


if __name__ == "__main__":
    main()
