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


def add_match_arguments(p) -> None:
    """`--match`, `--synonyms`: when a label counts as right (nxtrec.evaluation.correctness)."""
    p.add_argument("--match", default="exact", choices=["exact", "semantic"],
                   help="when a label counts as right: 'exact', equal to a ground-truth label after normalisation "
                        "(case, plural, --synonyms); 'semantic', MiniLM cosine >= 0.75")
    p.add_argument("--synonyms", metavar="FILE", type=existing_file,
                   help="a tag list ('name | synonym' per line, as --vocab; eval: default its --vocab): forms of one entry "
                        "match each other")


def calibration_lines(report: dict) -> str:
    """The ECE of the labels' prob (and confidence), with the per-bin table."""
    from nxtrec.evaluation.calibration import Bin, bins_table

    names = [n for n in ("prob", "confidence") if n in report]
    lines = [f"calibration ({report['match']} match): {report['right']} of {report['labels']} labels right; "
             + ", ".join(f"ECE of {n} {report[n]['ece']:.4f}" for n in names)]
    for n in names:
        lines += [f"{n}:", bins_table([Bin(**b) for b in report[n]["bins"]])]
    return "\n".join(lines)
