"""The metric's options shared by `nxtrec eval` and `nxtrec score`: which label embedder."""

from __future__ import annotations

from nxtrec.cli.options import existing_file


def add_embedder_arguments(p) -> None:
    """`--embedder`, `--clip-file`, `--clip-vocab`, `--metric-max-tokens`."""
    p.add_argument("--embedder", default="minilm", choices=["minilm", "clip"],
                   help="label embedding model: MiniLM (the published numbers) or CLIP ViT-L/14's text tower")
    p.add_argument("--clip-file", type=existing_file, help="for --embedder clip: OpenAI's ViT-L-14.pt (TorchScript or state dict)")
    p.add_argument("--clip-vocab", type=existing_file, help="for --embedder clip: CLIP's BPE file bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--metric-max-tokens", type=int, choices=[128, 512], default=512,
                   help="MiniLM's word-piece limit: 512 as the reference's evaluation (default), or 128, its metric "
                        "class's default (only labels over 128 pieces differ)")
