"""Export a model directory to ONNX (`nxtrec export-onnx`), with no code edits.

Layout written to the output directory (`docs/onnx.md` has the full reference):

- `encoder.onnx`: `pixels` [B, 3, S, S] -> `image_tokens` [B, P, dim] (class token dropped).
- `embeddings.npy`: the token embedding table [vocab, dim] (looked up with numpy).
- `decoder_prefill.onnx`: `inputs_embeds` [B, L, dim] -> `logits` [B, vocab] (last position)
  and `present_key_i` / `present_value_i` [B, H, L, D] for every layer i. The inference mask
  (causal, image tokens bidirectional) and the rotary positions 0..L-1 are built inside.
- `decoder_step.onnx`: one new token per branch. `inputs_embeds` [N, 1, dim], `position` (int64
  scalar, absolute position of the new token), `prefix_key_i` / `prefix_value_i` [B, H, Lp, D]
  (the prefill's presents, shared by the N / B branches of each image; rows of image b are
  b*N/B .. (b+1)*N/B - 1) and `past_key_i` / `past_value_i` [N, H, T, D] (the branch's own
  earlier tokens, T may be 0) -> `logits` [N, vocab] and `present_key_i` / `present_value_i`
  [N, H, T+1, D] (the branch's own keys/values, to feed back as `past_*`). It accepts S > 1
  new tokens per branch too ([N, S, dim], causal among them, image tokens bidirectional): with
  an empty prefix and past (Lp = T = 0, position 0) it computes exactly the prefill, which is
  how the runtime uses it, so that one session holds the decoder weights once.
- `decoder.data`: the decoder weights, ONNX external data shared by both decoder graphs
  (written once); `encoder.onnx.data` likewise for the encoder. Any model size exports.
- `tokenizer.model` and `nxtrec-onnx.json`: the inputs, outputs, special token ids, prompt
  and the export's validation figures.

`export_released_layout` writes the reference project's released file layout instead
(`encoder.onnx`, `Wte.npz`, `decoder_p1/p2/p3.onnx`, no cache), e.g. to test that path.

The graphs are traced with `torch.onnx.export(dynamo=True)` (torch.export + onnxscript), the
default exporter of current torch: it takes dynamic shapes directly, writes external data
for models beyond protobuf's 2 GB, and folds the weight transposes into MatMul initializers
(which `quantize_dynamic` needs). The export modules below wrap the model's own layers."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nxtrec.inference.ranking import MAX_LABEL_TOKENS  # recorded in the JSON
from nxtrec.model.config import ModelConfig
from nxtrec.model.network import NxtpModel
from nxtrec.model.tokenizer import Tokenizer
from nxtrec.onnx.format import DECODER_DATA, ENCODER_DATA, FILES, FORMAT, FORMAT_VERSION, MANIFEST, kv_names
from nxtrec.onnx.graphs import EncoderGraph, PrefillGraph, StepGraph, graph_signatures
from nxtrec.onnx.integrity import file_records
from nxtrec.onnx.layout import (
    OnnxExportError,
    check_out_dir,
    export_module,
    imports_frozen,
    share_external_data,
)
from nxtrec.onnx.quantize import quantize_dir
from nxtrec.onnx.validate import (
    default_tolerance,
    sample_pixels,
    torch_reference,
    validate_export,
    validation_line,
)

EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _example_prefix(model: NxtpModel, tokenizer: Tokenizer, pixels: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    prompt = torch.tensor(tokenizer.prompt_ids(cfg.image_token, cfg.prompt))
    with torch.no_grad():
        return model.prefix_embeddings(model.encode_images(pixels), prompt)


def _step_example(model: NxtpModel, prefix_len: int, batch: int, per_image: int, past_len: int, new_len: int, dtype):
    d = model.config.decoder
    n = batch * per_image
    g = torch.Generator().manual_seed(1)
    kv = lambda rows, length: [  # noqa: E731
        torch.randn(rows, d.n_heads, length, d.head_dim, generator=g).to(dtype) for _ in range(2 * d.n_layers)
    ]
    embeds = torch.randn(n, new_len, d.dim, generator=g).to(dtype)
    return [embeds, torch.tensor(prefix_len + past_len), *kv(batch, prefix_len), *kv(n, past_len)]


def export_graphs(model: NxtpModel, tokenizer: Tokenizer, out_dir: Path, log=print) -> dict[str, float]:
    """Write encoder, prefill and step graphs and the embedding table of `model` (in its own
    dtype) into `out_dir`, the decoder graphs sharing one weights file. Returns export times."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    L = cfg.decoder.n_layers
    dtype = model.language_decoder.output.weight.dtype
    size = cfg.encoder.image_size
    times = {}
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))

    t = time.perf_counter()
    log("exporting the vision encoder ...")
    batch = torch.export.Dim("batch", min=1)
    # float32 pixels in every dtype: the encoder casts them to its weights' dtype.
    export_module(EncoderGraph(model), [pixels], out_dir / FILES["encoder"], ["pixels"], ["image_tokens"],
            ({0: batch},))
    times["encoder"] = time.perf_counter() - t

    t = time.perf_counter()
    log("writing the token embedding table ...")
    np.save(out_dir / FILES["embeddings"], model.language_decoder.tok_embeddings.weight.detach().cpu().numpy())
    times["embeddings"] = time.perf_counter() - t

    prefix = _example_prefix(model, tokenizer, pixels)
    prefix_len = prefix.shape[1]
    with tempfile.TemporaryDirectory(prefix=".decoder-", dir=out_dir) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        log("exporting the decoder prefill graph ...")
        bd, ld = torch.export.Dim("batch", min=1), torch.export.Dim("prefix_len", min=1)
        export_module(PrefillGraph(model), [prefix], tmp / "prefill" / FILES["prefill"], ["inputs_embeds"],
                ["logits", *kv_names("present", L)], ({0: bd, 1: ld},))
        times["prefill"] = time.perf_counter() - t

        t = time.perf_counter()
        log("exporting the decoder step graph ...")
        args = _step_example(model, prefix_len, batch=2, per_image=3, past_len=2, new_len=3, dtype=dtype)
        nd, bd, sd = torch.export.Dim("branches", min=1), torch.export.Dim("batch", min=1), torch.export.Dim("new_len", min=1)
        ld, td = torch.export.Dim("prefix_len", min=0), torch.export.Dim("past_len", min=0)
        shapes = ({0: nd, 1: sd}, None, tuple([{0: bd, 2: ld}] * (2 * L) + [{0: nd, 2: td}] * (2 * L)))
        names = ["inputs_embeds", "position", *kv_names("prefix", L), *kv_names("past", L)]
        export_module(StepGraph(model), args, tmp / "step" / FILES["step"], names, ["logits", *kv_names("present", L)],
                shapes)
        times["step"] = time.perf_counter() - t

        t = time.perf_counter()
        log("writing the shared decoder weights ...")
        share_external_data([tmp / "prefill" / FILES["prefill"], tmp / "step" / FILES["step"]], out_dir, DECODER_DATA)
        times["share"] = time.perf_counter() - t
    return times


def build_manifest(config: ModelConfig, tokenizer: Tokenizer, dtype: str, source: str = "") -> dict:
    prompt_ids = tokenizer.prompt_ids(config.image_token, config.prompt)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": source,
        "dtype": dtype,
        "quantization": None,
        "files": dict(FILES, decoder_data=DECODER_DATA, encoder_data=ENCODER_DATA),
        "num_image_tokens": config.encoder.num_patches,
        "image_size": config.encoder.image_size,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
        "n_layers": config.decoder.n_layers,
        "n_heads": config.decoder.n_heads,
        "head_dim": config.decoder.head_dim,
        "dim": config.decoder.dim,
        "vocab_size": config.decoder.vocab_size,
        "prompt": config.prompt,
        "image_token": config.image_token,
        "delimiter": config.delimiter,
        "special_tokens": list(config.special_tokens),
        "special_ids": {
            "bos": tokenizer.bos_id,
            "eos": tokenizer.eos_id,
            "pad": tokenizer.pad_id,
            "delimiter": tokenizer.delimiter_id,
            **{name: i for name, i in tokenizer.special_ids.items()},
        },
        "prompt_ids": prompt_ids,
        "max_label_tokens": MAX_LABEL_TOKENS,
        "graphs": graph_signatures(config, dtype),
        "config": config.to_dict(),
    }


def check_against_reference(float_dir: Path, manifest: dict, ref, sample: str, dtype: str,
                            tolerance: float | None, log=print) -> None:
    """Run the exported graphs in ONNX Runtime against PyTorch's outputs `ref`; the largest
    differences go into `manifest["validation"]`. Above the tolerance (by default the dtype's)
    the manifest is written marked as failed and the export is an error."""
    diffs = validate_export(float_dir, ref)
    manifest["validation"] = {"max_abs_diff": diffs, "sample": sample}
    limit = tolerance if tolerance is not None else default_tolerance(dtype)
    if limit is None:
        log(f"({dtype} export: differences reported, not checked against a tolerance)")
    elif max(diffs.values()) > limit:
        manifest["validation"]["failed"] = True
        (float_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        raise OnnxExportError(
            f"validation failed: max difference {max(diffs.values()):.3g} > tolerance {limit:g} "
            f"({', '.join(f'{k} {v:.2e}' for k, v in diffs.items())})"
        )


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "float32",
    quantize: str | None = None,
    validate: bool = True,
    image: str | Path | None = None,
    tolerance: float | None = None,
    log=print,
) -> dict:
    """`nxtrec export-onnx`: model directory -> ONNX directory. Returns the manifest (with
    `validation`: max differences against PyTorch, and `sizes`)."""
    if dtype not in EXPORT_DTYPES:
        raise OnnxExportError(f"--dtype {dtype}: choose from {', '.join(EXPORT_DTYPES)}")
    if quantize not in (None, "int8"):
        raise OnnxExportError(f"--quantize {quantize}: only int8 is supported")
    if quantize and dtype != "float32":
        raise OnnxExportError("--quantize int8 quantizes a float32 export; use --dtype float32")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_out_dir(out_dir)
    with imports_frozen():
        return _export(model_dir, out_dir, dtype, quantize, validate, image, tolerance, log)


def _export(model_dir: Path, out_dir: Path, dtype: str, quantize: str | None, validate: bool,
            image: str | Path | None, tolerance: float | None, log) -> dict:
    from nxtrec.model.directory import TOKENIZER_FILE, load_model_dir

    log(f"loading {model_dir} ...")
    model, tokenizer = load_model_dir(model_dir, dtype=EXPORT_DTYPES[dtype])
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params / 1e6:.1f}M parameters, {config.decoder.n_layers} decoder blocks, dtype {dtype}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [*FILES.values(), ENCODER_DATA, DECODER_DATA, MANIFEST]:
        (out_dir / name).unlink(missing_ok=True)
    float_dir = out_dir if not quantize else Path(tempfile.mkdtemp(prefix=".float-", dir=out_dir))
    try:
        times = export_graphs(model, tokenizer, float_dir, log=log)
        shutil.copyfile(model_dir / TOKENIZER_FILE, float_dir / FILES["tokenizer"])
        manifest = build_manifest(config, tokenizer, dtype, source=str(model_dir))
        manifest["export_seconds"] = {k: round(v, 2) for k, v in times.items()}
        (float_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        ref = torch_reference(model, tokenizer, sample_pixels(config, image)) if validate else None
        del model
        gc.collect()
        sample = str(image) if image else "seeded noise"
        if ref is not None:
            check_against_reference(float_dir, manifest, ref, sample, dtype, tolerance, log)
        if quantize:
            float_validation = manifest.get("validation")
            manifest = quantize_dir(float_dir, out_dir, log=log)
            if ref is not None:
                log("float32 export before quantization: " + validation_line(float_validation["max_abs_diff"]))
                log("int8 export: differences reported, not checked against a tolerance")
                manifest["validation"] = {"max_abs_diff": validate_export(out_dir, ref), "sample": sample,
                                          "float32_before_quantization": float_validation["max_abs_diff"]}
    finally:
        if quantize:
            shutil.rmtree(float_dir, ignore_errors=True)
    # Sizes are checked whenever the folder is opened, hashes by `predict --verify` / `nxtrec verify`.
    manifest["sizes"], manifest["sha256"] = file_records(out_dir)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
