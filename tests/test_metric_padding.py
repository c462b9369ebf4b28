"""MiniLM batches are padded to their longest label (cut at 512 pieces), not to the limit:
the embeddings, and so the scores, equal those of every label padded to 512, to 1e-6."""

import pytest
import torch
import torch.nn.functional as F

from nxtrec.evaluation.metric import score_records
from nxtrec.model.embedders import MAX_TOKENS, MiniLMEmbedder

LABELS = [
    "",
    "dog",
    "traffic light",
    "a red double-decker bus parked beside the old stone bridge",
    "café crème",
    "東京 tower",
    " ".join(["striped"] * 40 + ["umbrella stand"] * 20),  # about 80 pieces
    " ".join(["red"] * 300 + ["bicycle wheel"] * 200),  # about 700 pieces: cut at 512
]


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder(batch_size=4)  # several batches of mixed widths


def padded_to_the_limit(embedder, texts):
    """Today's reference: every label padded to 512 pieces, mean-pooled over the mask."""
    tok = embedder.tokenizer(texts, max_length=MAX_TOKENS, truncation=True, padding="max_length", return_tensors="pt")
    assert tok["input_ids"].shape[1] == MAX_TOKENS
    with torch.inference_mode():
        hidden = embedder.model(**tok).last_hidden_state
    mask = tok["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def test_batches_are_padded_to_their_longest_label(embedder):
    short = embedder.tokenize(["dog", "traffic light"])
    assert short["input_ids"].shape == (2, 4)  # [CLS] traffic light [SEP]
    assert short["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert short["input_ids"][0, 3] == embedder.tokenizer.pad_token_id
    assert embedder.tokenize(LABELS)["input_ids"].shape[1] == MAX_TOKENS  # the longest is cut


def test_embeddings_equal_padding_to_the_limit(embedder):
    ours = embedder.embed(LABELS)
    want = torch.cat([padded_to_the_limit(embedder, LABELS[i : i + 2]) for i in range(0, len(LABELS), 2)])
    assert (ours - want).abs().max() < 1e-6


def test_scores_equal_padding_to_the_limit(embedder):
    records = [
        {"image": i, "gt": LABELS[i : i + 3], "pred": LABELS[::-1][i : i + 4]} for i in range(len(LABELS) - 3)
    ]

    class PaddedToTheLimit:
        def embed(self, texts):
            return padded_to_the_limit(embedder, texts)

    ours = score_records(records, [2, 4], embedder)
    want = score_records(records, [2, 4], PaddedToTheLimit())
    for k in (2, 4):
        for field in ("recall", "precision", "f1", "div_mean", "div_std"):
            assert abs(getattr(ours[k], field) - getattr(want[k], field)) < 1e-6, (k, field)
