"""The paper's semantic recall / precision / F1 at top-k (docs/design.md#evaluation-metric).

Per image: ground-truth labels G and predicted labels Q are embedded with
all-MiniLM-L6-v2 (token embeddings mean-pooled over the attention mask, at most 512 word
pieces as in the reference's evaluation, 128 on request; L2-normalised); S = G Q^T; R = mean over G of the row max, P = mean over Q of the column
max, F1 = 2RP / (R + P) (0 when undefined). Diversity: mean and (unbiased) std of the
pairwise similarities among the predictions (upper triangle), 0 for a single prediction.
Everything is averaged over images.

Policy for empty lists, as the reference: an image whose caption gave no labels has the
ground truth `[""]` (the reference splits an empty string), and an empty prediction list is
`[""]` too; both are embedded like any string. Such images are counted in `n_empty_gt`.

Unlike the reference, which encodes every label of every image separately, padded to its
token limit, labels are embedded once per distinct string, in batches, and cached; padding is
masked out of the mean, so the embeddings are the same.

The paper's alternative embedder, CLIP ViT-L/14's text tower, is
`nxtrec.model.embedders.CLIPEmbedder` (local files only: OpenAI's ViT-L-14.pt and CLIP's BPE
vocabulary)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ImageScore:
    recall: float
    precision: float
    f1: float
    div_mean: float
    div_std: float


def score_embeddings(gt: torch.Tensor, pred: torch.Tensor) -> ImageScore:
    """Scores of one image from normalised embeddings gt [M, D] and pred [N, D]."""
    s = gt.double() @ pred.double().T
    r = s.max(dim=1).values.mean().item()
    p = s.max(dim=0).values.mean().item()
    f1 = 2 * r * p / (r + p) if (r + p) != 0 else 0.0
    d = pred.double() @ pred.double().T
    iu = torch.triu_indices(len(pred), len(pred), offset=1)
    pairs = d[iu[0], iu[1]]
    mean = pairs.mean().item() if len(pairs) else 0.0
    std = pairs.std().item() if len(pairs) > 1 else 0.0
    return ImageScore(r, p, 0.0 if math.isnan(f1) else f1, mean, std)


@dataclass
class Summary:
    k: int
    n_images: int
    recall: float
    precision: float
    f1: float
    div_mean: float
    div_std: float
    n_empty_gt: int = 0
    per_image: list[ImageScore] = field(default_factory=list, repr=False)

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "per_image"}


def score_records(records: list[dict], k_values: list[int], embedder) -> dict[int, Summary]:
    """records: {"image": id, "gt": [labels], "pred": [labels, best first]}. Images are
    scored in order of their id, so any split of the records gives the same numbers."""
    records = sorted(records, key=lambda r: str(r["image"]))
    strings = [s for r in records for s in (r["gt"] or [""]) + (r["pred"] or [""])]
    embedder.embed(strings)  # every distinct string once, in batches
    out = {}
    for k in k_values:
        scores = []
        for r in records:
            gt = embedder.embed(r["gt"] or [""])
            pred = embedder.embed(r["pred"][:k] or [""])
            scores.append(score_embeddings(gt, pred))
        n = max(len(scores), 1)
        out[k] = Summary(
            k=k,
            n_images=len(scores),
            recall=sum(s.recall for s in scores) / n,
            precision=sum(s.precision for s in scores) / n,
            f1=sum(s.f1 for s in scores) / n,
            div_mean=sum(s.div_mean for s in scores) / n,
            div_std=sum(s.div_std for s in scores) / n,
            n_empty_gt=sum(1 for r in records if not r["gt"]),
            per_image=scores,
        )
    return out


def format_table(summaries: dict[int, Summary]) -> str:
    lines = [f"{'k':>4} {'R':>8} {'P':>8} {'F1':>8} {'div mean':>9} {'div std':>8} {'images':>7}"]
    for k, s in summaries.items():
        lines.append(f"{k:>4} {s.recall:>8.5f} {s.precision:>8.5f} {s.f1:>8.5f} {s.div_mean:>9.5f} {s.div_std:>8.5f} {s.n_images:>7}")
    return "\n".join(lines)
