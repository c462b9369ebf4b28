"""Shared fixtures: real SentencePiece tokenizers and tiny random models of the real
architecture, saved and loaded through the real model-directory format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nxtrec.model.directory import build_model
from nxtrec.model.image import list_images
from nxtrec.model.presets import init_model, make_tokenizer, preset_config
from nxtrec.model.tokenizer import Tokenizer

SPECIAL = ["<|image|>", "<|empty|>"]
ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "images"  # the real photos beside the checkout, when present


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a busy neighbour core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def photos():
    """The real photos when present, else the bundled example scenes."""
    return list_images([str(PHOTOS if PHOTOS.is_dir() else ROOT / "examples")])


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file):
    return Tokenizer(tokenizer_file, SPECIAL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return init_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


def tiny_model(tokenizer, n_layers=2, seed=0, delimiter_bias=2.0):
    """A tiny random model whose delimiter logit is raised, so that branches end after
    varied numbers of tokens (random layouts of delimiters) instead of all hitting the cap."""
    cfg = preset_config("tiny", tokenizer.vocab_size)
    cfg.decoder.n_layers = n_layers
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(cfg.decoder.dim), dim=0)
        model.language_decoder.output.weight[tokenizer.delimiter_id] += delimiter_bias * direction
    return model


@pytest.fixture(scope="session")
def tiny_onnx_export(tokenizer, tokenizer_file, tmp_path_factory) -> Path:
    """A one-layer tiny model exported to ONNX once per session (about 15 s); tests only read
    it (copy it before changing anything)."""
    from nxtrec.model.directory import save_model_dir
    from nxtrec.onnx.export import export_onnx

    root = tmp_path_factory.mktemp("tiny-onnx")
    model_dir = save_model_dir(tiny_model(tokenizer, n_layers=1, seed=3), tokenizer_file, root / "model")
    export_onnx(model_dir, root / "onnx", validate=False, log=lambda *_: None)
    return root / "onnx"
