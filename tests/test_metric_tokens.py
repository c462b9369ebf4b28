"""MiniLM's word-piece limit: 512 by default (the reference's evaluation), 128 on request;
only labels longer than 128 pieces embed differently."""

import torch

from nxtrec.model.embedders import MAX_TOKENS, MiniLMEmbedder, build_embedder


def test_512_is_the_default_and_only_long_labels_change():
    assert MAX_TOKENS == 512 and build_embedder("minilm").max_tokens == 512
    long_label = " ".join(["red"] * 100 + ["bicycle wheel"] * 60)  # about 220 word pieces
    short = ["dog", "traffic light"]
    full, cut = MiniLMEmbedder(), MiniLMEmbedder(max_tokens=128)
    assert len(full.tokenizer(long_label)["input_ids"]) > 200
    assert torch.allclose(full.embed(short), cut.embed(short), atol=1e-6)
    cos = float(full.embed([long_label])[0] @ cut.embed([long_label])[0])
    assert cos < 0.999
