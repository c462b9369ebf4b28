"""From generated branches to ranked labels, shared by the PyTorch and the ONNX Runtime paths
(so it uses numpy, not torch).

A branch is one generated label: its token ids (delimiter excluded) and the probability of
each token, the closing delimiter's included when it was generated. Branches that decode to
the same label are merged, then ranked (docs/design.md#one-shot-sampling).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from nxtrec.errors import NxtrecError

RANKINGS = ("prob", "ppl", "sim", "none")
# Significant digits of the probabilities and scores written out (JSON of predict, serve, eval
# records); `Label.prob` itself keeps full precision.
OUTPUT_DIGITS = 6
# The reference stops after 19 updates (the first top-k step counts as one) and then closes
# every branch with a delimiter whose probability counts as 1.
MAX_LABEL_TOKENS = 19


class RankingError(NxtrecError, ValueError):
    pass


@dataclass
class Label:
    label: str
    prob: float
    # The ranking's own score where it differs from `prob` (perplexity, embedding distance).
    score: float | None = None
    # Where the label was grounded: a map over the image-token grid that sums to 1
    # (`Recognizer.predict(..., maps=True)`; nxtrec.inference.attention).
    map: np.ndarray | None = None
    # P(the label is right), from the model's calibration (nxtrec.inference.calibration);
    # None without one. `prob` stays the model's own.
    confidence: float | None = None

    def to_dict(self) -> dict:
        """The label as written out: prob (and score) rounded to `OUTPUT_DIGITS` significant
        digits, the map to 6 decimals."""
        d = {"label": self.label, "prob": rounded(self.prob)}
        if self.confidence is not None:
            d["confidence"] = rounded(self.confidence)
        if self.score is not None:
            d["score"] = rounded(self.score)
        if self.map is not None:
            d["map"] = np.round(self.map.astype(np.float64), 6).tolist()
        return d


def rounded(x: float, digits: int = OUTPUT_DIGITS) -> float:
    """`x` to `digits` significant digits (0.123456789 -> 0.123457, 1.23456789e-07 ->
    1.23457e-07): small probabilities keep their relative precision."""
    return float(f"{x:.{digits}g}")


@dataclass
class Branch:
    tokens: list[int]
    probs: list[float]
    map: np.ndarray | None = None  # grounding map over the image-token grid, when recorded
    # True for the labels of one answer sequence (greedy, beam): a label written again later
    # in the same answer is the same label, counted once (its first occurrence). False for
    # one-shot branches: alternative continuations, whose probabilities add up.
    from_answer: bool = False


def to_branches(seqs: list[list[int]], probs: list[list[float]], k: int, delimiter_id: int) -> list[list[Branch]]:
    """Cut each branch at its first delimiter (kept in the probabilities), k branches per image."""
    out = []
    for i, (s, p) in enumerate(zip(seqs, probs)):
        if i % k == 0:
            out.append([])
        end = s.index(delimiter_id) if delimiter_id in s else len(s)
        out[-1].append(Branch(tokens=s[:end], probs=p[: end + 1]))
    return out


def merge_maps(probs: list[float], maps: list[np.ndarray | None]) -> np.ndarray | None:
    """Maps of several branches or labels merged into one, weighted by their probabilities
    (equal weights if they all underflow to 0); None when they carry no maps."""
    if not maps or any(m is None for m in maps):
        return None
    weights = np.array(probs, dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(maps), 1.0 / len(maps))
    return np.tensordot(weights, np.stack(maps), axes=1).astype(np.float32)


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rank_labels(
    branches: list[Branch],
    decode: Callable[[list[int]], str],
    ranking: str = "prob",
    top_k: int | None = None,
    embed_tokens: Callable[[list[int]], np.ndarray] | None = None,
    image_tokens: np.ndarray | None = None,
    delimiter_id: int | None = None,
) -> list[Label]:
    """Merge branches that decode to the same label (commas removed) and rank them.

    prob: sum over a label's branches of the product of its token probabilities, highest
      first (the paper's default). Labels of one answer (greedy, beam: `Branch.from_answer`)
      are not summed: a repeated label keeps its first occurrence, so every prob is in [0, 1].
    ppl:  perplexity exp(-mean log p) of the label's tokens (best branch), lowest first.
    sim:  mean Euclidean distance sqrt(2 - 2 cos)/2 between the label's token embeddings
      (`embed_tokens(ids)`, delimiter included) and the image tokens [P, dim], lowest first.
    none: the order in which the labels were generated.
    """
    if ranking not in RANKINGS:
        raise RankingError(f"unknown ranking {ranking!r}; choose from {', '.join(RANKINGS)}")
    groups: dict[str, list[Branch]] = defaultdict(list)
    for br in branches:
        groups[decode(br.tokens).replace(",", "")].append(br)
    img = _normalize(np.asarray(image_tokens, dtype=np.float32)) if ranking == "sim" else None
    labels = []
    for name, brs in groups.items():
        if brs[0].from_answer:
            brs = brs[:1]
        prob = sum(math.prod(b.probs) for b in brs)
        score = None
        if ranking == "ppl":
            score = min(math.exp(-sum(math.log(max(p, 1e-45)) for p in b.probs) / len(b.probs)) for b in brs)
        elif ranking == "sim":
            dists = []
            for b in brs:
                txt = _normalize(np.asarray(embed_tokens(b.tokens + [delimiter_id]), dtype=np.float32))
                cos = np.clip(txt @ img.T, -1, 1)
                dists.append(float((np.sqrt(2 - 2 * cos) / 2).mean()))
            score = sum(dists) / len(dists)
        labels.append(Label(name, prob, score, merge_maps([math.prod(b.probs) for b in brs], [b.map for b in brs])))
    if ranking == "prob":
        labels.sort(key=lambda l: l.prob, reverse=True)
    elif ranking in ("ppl", "sim"):
        labels.sort(key=lambda l: l.score)
    return labels[:top_k] if top_k else labels


def keep_labels(labels: list[Label], min_prob: float = 0.0, max_labels: int | None = None) -> list[Label]:
    """Ranked labels (best first) with probability >= min_prob, at most max_labels of them:
    the selection of `nxtrec tag` and `nxtrec serve`. The probability compared is the one
    written out (`rounded`), so a threshold copied from an output keeps that label."""
    kept = [lab for lab in labels if rounded(lab.prob) >= min_prob]
    return kept[:max_labels] if max_labels else kept
