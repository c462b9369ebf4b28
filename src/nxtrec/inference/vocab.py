"""Decoding into a user's tag list (`--vocab FILE`), shared by the PyTorch and ONNX paths
(numpy only, no torch).

The list file has one entry per line; synonyms are separated by `|` and the entry is reported
as its first form (`tv | television | television set` -> "tv"). Blank lines and lines
starting with `#` are skipped.

Every form is tokenised as it appears after the prompt (`"... are dog"`, so with the
leading-space piece) and put in a token trie. Constrained one-shot sampling then takes the
top-k among the tokens that start a form, and each branch continues greedily among the tokens
its trie node allows; the delimiter is allowed only where a complete form ends. The per-node
allowed ids are arrays built once, so a step costs a gather over a few ids per branch, not a
pass over the vocabulary. Probabilities stay the model's own (unconstrained softmax).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nxtrec.errors import NxtrecError
from nxtrec.inference.ranking import MAX_LABEL_TOKENS

ROOT = 0


class VocabError(NxtrecError, ValueError):
    pass


@dataclass(frozen=True)
class LabelList:
    """Entries of a tag list; each entry is its forms, the reported one first."""

    entries: tuple[tuple[str, ...], ...]
    source: str = "<list>"

    @property
    def names(self) -> list[str]:
        return [forms[0] for forms in self.entries]

    @classmethod
    def from_lines(cls, lines, source: str = "<list>") -> LabelList:
        entries, seen = [], set()
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            forms = tuple(dict.fromkeys(f.strip() for f in line.split("|") if f.strip()))
            if not forms:
                raise VocabError(f"{source}:{n}: an entry with no form (write `name` or `name | synonym`)")
            new = tuple(f for f in forms if f not in seen)  # a form listed twice keeps its first entry
            seen.update(new)
            if new:
                entries.append(new)
        if not entries:
            raise VocabError(f"{source}: the tag list is empty (one entry per line, synonyms separated by `|`)")
        return cls(tuple(entries), source)

    @classmethod
    def load(cls, path: str | Path) -> LabelList:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise VocabError(f"{path}: tag list not found (a text file, one entry per line)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise VocabError(f"{path}: cannot read the tag list ({e})") from None
        return cls.from_lines(text.splitlines(), str(path))


def as_label_list(vocab) -> LabelList:
    """A `LabelList` from a path, a list of lines or a `LabelList`."""
    if isinstance(vocab, LabelList):
        return vocab
    if isinstance(vocab, (str, Path)):
        return LabelList.load(vocab)
    return LabelList.from_lines(list(vocab))


class VocabTrie:
    """Token trie over every form of a `LabelList`. Node 0 is the root; `entry[node]` is the
    entry whose form ends there (-1: none); `allowed[node]` the ids that may follow."""

    def __init__(self, labels: LabelList, tokenizer, prompt: str):
        self.labels = labels
        self.delimiter_id = tokenizer.delimiter_id
        self.children: list[dict[int, int]] = [{}]
        self.entry: list[int] = [-1]
        self.max_tokens = 0
        for index, forms in enumerate(labels.entries):
            for form in forms:
                self._insert(self.form_ids(tokenizer, prompt, form), index)
        self.allowed = [
            np.array(list(ch) + ([self.delimiter_id] if e >= 0 else []), dtype=np.int64)
            for ch, e in zip(self.children, self.entry)
        ]
        self.first_ids = self.allowed[ROOT]

    def form_ids(self, tokenizer, prompt: str, form: str) -> list[int]:
        if tokenizer.delimiter in form:
            raise VocabError(f"{self.labels.source}: {form!r} contains the label delimiter "
                             f"{tokenizer.delimiter!r}; no generated label can")
        head = tokenizer.encode(prompt)
        ids = tokenizer.encode(f"{prompt} {form}")
        if ids[: len(head)] != head or len(ids) == len(head):
            raise VocabError(f"{self.labels.source}: {form!r} does not tokenise as a continuation of the prompt")
        return ids[len(head):]

    def _insert(self, ids: list[int], entry: int) -> None:
        node = ROOT
        for t in ids:
            nxt = self.children[node].get(t)
            if nxt is None:
                nxt = len(self.children)
                self.children[node][t] = nxt
                self.children.append({})
                self.entry.append(-1)
            node = nxt
        if self.entry[node] < 0:  # two entries tokenising alike: the first one keeps it
            self.entry[node] = entry
        self.max_tokens = max(self.max_tokens, len(ids))

    @property
    def max_branches(self) -> int:
        """Branches one image can start: the distinct first tokens of the forms."""
        return len(self.first_ids)

    def child(self, node: int, token: int) -> int:
        """The node after `token`; the root after the delimiter (a new label starts)."""
        return ROOT if token == self.delimiter_id else self.children[node][token]

    def candidates(self, nodes: list[int]) -> np.ndarray:
        """[len(nodes), W] allowed ids per node, padded with -1."""
        rows = [self.allowed[n] for n in nodes]
        out = np.full((len(rows), max(len(r) for r in rows)), -1, dtype=np.int64)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    def label(self, tokens: list[int]) -> str | None:
        """The entry name a branch's tokens (delimiter excluded) spell, or None if they do
        not end a form."""
        node = ROOT
        for t in tokens:
            node = self.children[node].get(t)
            if node is None:
                return None
        return self.labels.names[self.entry[node]] if self.entry[node] >= 0 else None


def trie_for(vocab, tokenizer, prompt: str) -> VocabTrie | None:
    """The trie of a tag list (a path, lines, a `LabelList` or a built `VocabTrie`), built once
    per list and tokenizer."""
    if vocab is None or isinstance(vocab, VocabTrie):
        return vocab
    key = vocab if isinstance(vocab, (str, Path, LabelList)) else tuple(vocab)
    return _cached_trie(key, tokenizer, prompt)


@functools.lru_cache(maxsize=8)
def _cached_trie(key, tokenizer, prompt: str) -> VocabTrie:
    return VocabTrie(as_label_list(key), tokenizer, prompt)


class TrieWalk:
    """The trie node of every branch of one constrained one-shot run; `first` and `step` on
    numpy probabilities (the ONNX path; `constrained.TorchTrieWalk` does them in torch)."""

    def __init__(self, trie: VocabTrie):
        self.trie = trie
        self.nodes: list[int] = []

    def start(self, first_tokens: list[int]) -> None:
        self.nodes = [self.trie.child(ROOT, t) for t in first_tokens]

    def candidates(self, branches: list[int]) -> np.ndarray:
        return self.trie.candidates([self.nodes[b] for b in branches])

    def advance(self, branches: list[int], tokens: list[int]) -> None:
        for b, t in zip(branches, tokens):
            self.nodes[b] = self.trie.child(self.nodes[b], t)

    def first(self, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k [B, k] probabilities and ids among the tokens that start a form."""
        check_k(self.trie, k)
        sub = probs[:, self.trie.first_ids]
        idx = np.argsort(-sub, axis=-1, kind="stable")[:, :k]
        ids = self.trie.first_ids[idx]
        self.start(ids.reshape(-1).tolist())
        return np.take_along_axis(sub, idx, -1), ids

    def step(self, probs: np.ndarray, branches: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per row (`branches[i]` is row i's branch), the most probable allowed id and its
        unconstrained probability; the branches move to their next nodes."""
        cand = self.candidates(branches)
        vals = np.where(cand >= 0, np.take_along_axis(probs, np.maximum(cand, 0), -1), -1.0)
        j = vals.argmax(-1)
        rows = np.arange(len(j))
        nxt = cand[rows, j]
        self.advance(branches, nxt.tolist())
        return vals[rows, j], nxt


def check_k(trie: VocabTrie, k: int) -> None:
    if k > trie.max_branches:
        raise VocabError(f"k={k} is larger than the number of distinct first tokens of the tag list "
                         f"({trie.max_branches}); ask for fewer labels")


def one_shot_limits(trie: VocabTrie, k: int, max_label_tokens: int | None) -> tuple[int, int]:
    """(branches, token cap) for a constrained one-shot run: at most one branch per distinct
    first token, and a cap long enough for the longest form and its delimiter, so no branch
    is cut short of its entry."""
    return min(k, trie.max_branches), max(max_label_tokens or MAX_LABEL_TOKENS, trie.max_tokens + 1)


def keep_listed(branches, trie: VocabTrie):
    """Branches that spell a complete form (all of them unless a cap cut one short)."""
    return [b for b in branches if trie.label(b.tokens) is not None]


__all__ = [
    "LabelList",
    "TrieWalk",
    "VocabError",
    "VocabTrie",
    "as_label_list",
    "check_k",
    "keep_listed",
    "one_shot_limits",
    "trie_for",
]
