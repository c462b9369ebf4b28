"""Presets and random initialisation (`nxtrec init-model`): the released sizes with random
weights, and small models with a small SentencePiece tokenizer for tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from nxtrec.errors import NxtrecError
from nxtrec.model.config import TEMPLATES, DecoderConfig, EncoderConfig, ModelConfig
from nxtrec.model.directory import PRESETS, TOKENIZER_FILE, build_model, save_model_dir
from nxtrec.model.tokenizer import Tokenizer, pad_tokenizer, train_tokenizer

FULL_PRESETS = ("nxtp-1.78b", "nxtp-0.77b")

# Words the small presets' tokenizer is trained on (with the prompt templates): everyday labels.
_NOUNS = (
    "dog cat car tree apple banana umbrella chair table sofa couch room window door house "
    "person man woman child boy girl bird horse cow sheep bicycle bus train truck boat plane "
    "airplane sky cloud water sea beach sand grass flower plant road street city building wall "
    "floor rug lamp book cup mug bottle glass plate bowl pizza cake bread cheese orange kitchen "
    "phone computer screen keyboard clock bed pillow blanket shirt hat shoe bag ball game rocket "
    "smoke tower mountain river bridge snow rain sun moon star light fire candle box paper word "
    "letter logo text picture photo art painting mirror fence field forest leaf rock stone"
).split()


def small_tokenizer_corpus() -> list[str]:
    lines = []
    for i, t in enumerate(TEMPLATES * 20):
        words = [_NOUNS[(i * 7 + j * 13) % len(_NOUNS)] for j in range(3 + i % 5)]
        lines.append(f"{t} " + ", ".join(words))
        lines.append(f"a {words[0]} and two {words[1]}s next to the {words[-1]}.")
    return lines


def make_tokenizer(out_file: str | Path, n_pieces: int | None = None) -> Path:
    """A real SentencePiece model trained on the spot; padded with unused pieces to
    `n_pieces` (e.g. 32000 for real-sized embedding matrices in benchmarks)."""
    out_file = Path(out_file)
    train_tokenizer(small_tokenizer_corpus(), out_file, vocab_size=400, pieces=[","])
    if n_pieces:
        pad_tokenizer(out_file, out_file, n_pieces)
    return out_file


def preset_config(name: str, vocab_size: int) -> ModelConfig:
    if name not in PRESETS:
        raise NxtrecError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    enc, dec = PRESETS[name]
    return ModelConfig(encoder=EncoderConfig(**vars(enc)), decoder=DecoderConfig(**dec, vocab_size=vocab_size))


def init_model(preset: str, out: str | Path, tokenizer: str | Path | None = None, seed: int = 0) -> Path:
    """Write a randomly initialised model directory for `preset`. Without `tokenizer`, small
    presets get a freshly trained small SentencePiece model and full presets a synthetic
    32000-piece one (fine for benchmarks, not for real use)."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        if tokenizer is None:
            tokenizer = make_tokenizer(Path(tmp) / TOKENIZER_FILE, 32000 if preset in FULL_PRESETS else None)
        tok = Tokenizer(tokenizer, ModelConfig().special_tokens)
        config = preset_config(preset, tok.vocab_size)
        config.description = f"random initialisation of preset {preset} (seed {seed})"
        torch.manual_seed(seed)
        model = build_model(config)
        return save_model_dir(model, tokenizer, out)
