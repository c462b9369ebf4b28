"""The reference's released ONNX layout (encoder.onnx, Wte.npz, decoder_p1..3.onnx)."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np
import torch

from nxtrec.model.masks import inference_mask
from nxtrec.model.network import NxtpModel
from nxtrec.onnx.graphs import EncoderGraph, ReleasedDecoderPart
from nxtrec.onnx.layout import check_out_dir, export_module
from nxtrec.onnx.validate import sample_pixels, torch_reference


def export_released_layout(model: NxtpModel, out_dir: str | Path, parts: int = 3, log=print) -> Path:
    """The reference's released layout: `encoder.onnx` (`input` -> `output` [B, P+1, dim],
    class token first), `Wte.npz` (`Wte`), `decoder_p1..p{parts}.onnx` (`input`, `mask` ->
    `output`; blocks split evenly, the last part adds the norm and the last-position logits)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    d = cfg.decoder
    size = cfg.encoder.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    b = torch.export.Dim("batch", min=1)
    log("exporting encoder.onnx ...")
    export_module(EncoderGraph(model, keep_class_token=True), [pixels], out_dir / "encoder.onnx", ["input"], ["output"],
            ({0: b},))
    np.savez(out_dir / "Wte.npz", Wte=model.language_decoder.tok_embeddings.weight.detach().float().cpu().numpy())
    s = cfg.encoder.num_patches + 8
    x = torch.randn(2, s, d.dim)
    mask = inference_mask(s, cfg.encoder.num_patches)[None, None].expand(2, 1, s, s).contiguous()
    bounds = np.linspace(0, d.n_layers, parts + 1).round().astype(int)
    for p in range(parts):
        name = f"decoder_p{p + 1}.onnx"
        log(f"exporting {name} (blocks {bounds[p]}..{bounds[p + 1] - 1}) ...")
        bd, sd = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
        part = ReleasedDecoderPart(model, range(bounds[p], bounds[p + 1]), head=p == parts - 1)
        export_module(part, [x, mask], out_dir / name, ["input", "mask"], ["output"],
                ({0: bd, 1: sd}, {0: bd, 2: sd, 3: sd}))
    return out_dir


def export_released_layout_dir(model_dir: str | Path, out_dir: str | Path, validate: bool = True, log=print) -> Path:
    """`nxtrec export-onnx --layout released`: the released file layout of a model directory,
    with its `tokenizer.model` and `config.json` copied alongside (what the ONNX runtime needs
    next to the released files). Validates the chained decoder parts' logits against PyTorch."""
    from nxtrec.model.directory import CONFIG_FILE, TOKENIZER_FILE, load_model_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_out_dir(out_dir)
    model, tokenizer = load_model_dir(model_dir)
    export_released_layout(model, out_dir, log=log)
    shutil.copyfile(model_dir / TOKENIZER_FILE, out_dir / "tokenizer.model")
    shutil.copyfile(model_dir / CONFIG_FILE, out_dir / "config.json")
    if validate:
        ref = torch_reference(model, tokenizer, sample_pixels(model.config), branches=1)
        del model
        gc.collect()
        from nxtrec.onnx.recognizer import OnnxRecognizer

        rec = OnnxRecognizer(out_dir)
        enc = rec.encode(ref["pixels"])
        logits = rec.decoder.run(rec.prefix_embeddings(enc))
        diffs = {"encoder": float(np.abs(enc - ref["image_tokens"]).max()),
                 "prefill_logits": float(np.abs(logits - ref["prefill_logits"]).max())}
        log("validation (max |ONNX Runtime - PyTorch|): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return out_dir
