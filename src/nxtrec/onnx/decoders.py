"""The two decoders an ONNX directory can hold, each with its one-shot loop (the branch
bookkeeping is `nxtrec.inference.branches`, shared with the PyTorch loop; torch-free):

- `CachedDecoder` (`nxtrec export-onnx`): the step graph with a key/value cache. The prefix
  runs once (the step graph with an empty past), its keys/values are shared by the k branches
  of the image, and every step runs one token per open branch.
- `ReleasedDecoder` (the reference's released files): no cache; as in the reference, every
  step re-runs the whole sequence of every branch until all have written the delimiter.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from nxtrec.inference.branches import OpenBranches
from nxtrec.inference.ranking import MAX_LABEL_TOKENS, Branch, to_branches
from nxtrec.inference.vocab import TrieWalk
from nxtrec.onnx.format import kv_names
from nxtrec.onnx.sessions import inference_mask, softmax, topk


def _first_tokens(logits: np.ndarray, k: int, walk: TrieWalk | None):
    p = softmax(logits)
    first_p, first = topk(p, k) if walk is None else walk.first(p, k)
    return first.reshape(-1), first_p.reshape(-1)


def _next_tokens(logits: np.ndarray, walk: TrieWalk | None, rows: list[int]):
    p = softmax(logits)
    if walk is not None:
        return walk.step(p, rows)
    nxt = p.argmax(-1)
    return p[np.arange(len(nxt)), nxt], nxt


class CachedDecoder:
    def __init__(self, session, n_layers: int, kv_shape: tuple[int, int], dtype, embed: Callable, delimiter_id: int):
        self.session, self.dtype, self.embed, self.delimiter_id = session, dtype, embed, delimiter_id
        self.kv_shape = kv_shape  # (heads, head dim)
        self.prefix_names, self.past_names = kv_names("prefix", n_layers), kv_names("past", n_layers)

    def prefill(self, x: np.ndarray):
        """Prefix embeddings [B, L, dim] -> next-token logits [B, vocab] and every layer's
        keys/values [B, H, L, D]."""
        empty = np.zeros((x.shape[0], self.kv_shape[0], 0, self.kv_shape[1]), dtype=self.dtype)
        feed = {"inputs_embeds": x, "position": np.array(0, dtype=np.int64)}
        feed.update((name, empty) for name in self.prefix_names + self.past_names)
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def step(self, tokens, position: int, prefix, past):
        """One token per branch: logits [N, vocab] and the branches' own keys/values."""
        feed = {"inputs_embeds": self.embed(tokens), "position": np.array(position, dtype=np.int64)}
        feed.update(zip(self.prefix_names, prefix))
        feed.update(zip(self.past_names, past))
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def one_shot(self, x: np.ndarray, k: int, max_label_tokens: int = MAX_LABEL_TOKENS, steps: int | None = None,
                 vocab=None) -> list[list[Branch]]:  # fmt: skip
        logits, kv = self.prefill(x)
        results = []
        for b in range(x.shape[0]):
            prefix = [t[b : b + 1] for t in kv]
            results += self.continue_branches(logits[b : b + 1], prefix, x.shape[1], k, max_label_tokens, steps, vocab)
        return results

    def continue_branches(self, logits, prefix, prefix_len: int, k: int, max_label_tokens: int = MAX_LABEL_TOKENS,
                          steps: int | None = None, vocab=None) -> list[list[Branch]]:  # fmt: skip
        """One image, after its prefill (`logits` [1, vocab], `prefix` keys/values [1, H, L, D]):
        top-k, then greedy steps over the open branches."""
        walk = None if vocab is None else TrieWalk(vocab)
        first, first_p = _first_tokens(logits, k, walk)
        book = OpenBranches(first.tolist(), first_p.tolist(), k, self.delimiter_id, max_label_tokens, steps)
        tokens = first[book.active]
        past = [np.zeros((len(book.active), *t.shape[1:2], 0, t.shape[3]), dtype=t.dtype) for t in prefix]
        for step in range(book.steps):
            if not book.active:
                break
            logits, past = self.step(tokens, prefix_len + step, prefix, past)
            pmax, nxt = _next_tokens(logits, walk, book.active)
            keep = book.advance(nxt.tolist(), pmax.tolist())
            if keep is not None:
                past, nxt = [t[keep] for t in past], nxt[keep]
            tokens = nxt
        return book.result()


class ReleasedDecoder:
    def __init__(self, parts: list, num_image_tokens: int, dtype, embed: Callable, delimiter_id: int):
        self.parts, self.num_image_tokens = parts, num_image_tokens
        self.dtype, self.embed, self.delimiter_id = dtype, embed, delimiter_id

    def run(self, x: np.ndarray) -> np.ndarray:
        """The decoder parts on a whole sequence -> last-position logits."""
        s = x.shape[1]
        mask = np.ascontiguousarray(
            np.broadcast_to(inference_mask(s, self.num_image_tokens, self.dtype), (x.shape[0], 1, s, s))
        )
        h = x
        for part in self.parts:
            h = part.run(None, {"input": h, "mask": mask})[0]
        return h

    def one_shot(self, x: np.ndarray, k: int, max_label_tokens: int = MAX_LABEL_TOKENS, steps: int | None = None,
                 vocab=None, prefix_logits: np.ndarray | None = None) -> list[list[Branch]]:  # fmt: skip
        """The reference's loop: finished branches keep running until every branch has
        written the delimiter. `prefix_logits`: the prefix's logits, when already computed."""
        walk = None if vocab is None else TrieWalk(vocab)
        tokens, first_p = _first_tokens(self.run(x) if prefix_logits is None else prefix_logits, k, walk)
        seqs, probs = [[int(t)] for t in tokens], [[float(p)] for p in first_p]
        x = np.repeat(x, k, axis=0)
        open_ = np.ones(len(tokens), dtype=bool)
        for _ in range(max_label_tokens - 1 if steps is None else steps):
            x = np.concatenate([x, self.embed(tokens)], axis=1)
            pmax, tokens = _next_tokens(self.run(x), walk, list(range(len(tokens))))
            for branch, (t, pt) in enumerate(zip(tokens.tolist(), pmax.tolist())):
                seqs[branch].append(t)
                probs[branch].append(pt)
            open_ &= tokens != self.delimiter_id
            if steps is None and not open_.any():
                break
        return to_branches(seqs, probs, k, self.delimiter_id)
