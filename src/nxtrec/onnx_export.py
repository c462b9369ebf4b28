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
(which `quantize_dynamic` needs). The export modules below wrap the model's own layers.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import json
import logging
import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from nxtrec.config import ModelConfig
from nxtrec.errors import NxtrecError
from nxtrec.model import Decoder, NxtpModel, inference_mask, rope_cos_sin
from nxtrec.ranking import MAX_LABEL_TOKENS  # recorded in the JSON
from nxtrec.tokenizer import Tokenizer

MANIFEST = "nxtrec-onnx.json"
FORMAT = "nxtrec-onnx"
FORMAT_VERSION = 1
FILES = {
    "encoder": "encoder.onnx",
    "embeddings": "embeddings.npy",
    "prefill": "decoder_prefill.onnx",
    "step": "decoder_step.onnx",
    "tokenizer": "tokenizer.model",
}
ENCODER_DATA = "encoder.onnx.data"
DECODER_DATA = "decoder.data"
RELEASED_FILES = ("encoder.onnx", "Wte.npz", "decoder_p1.onnx", "decoder_p2.onnx", "decoder_p3.onnx")
OPSET = 18
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Large external tensors are aligned so ONNX Runtime can memory-map them.
_ALIGN, _ALIGN_MIN = 65536, 1 << 20


class OnnxExportError(NxtrecError):
    pass


# ---------------------------------------------------------------------------------------
# export modules (wrap the model's own layers)
# ---------------------------------------------------------------------------------------


class EncoderGraph(nn.Module):
    def __init__(self, model: NxtpModel, keep_class_token: bool = False):
        super().__init__()
        self.encoder = model.vision_encoder
        self.keep_class_token = keep_class_token

    def forward(self, pixels):
        return self.encoder(pixels, keep_class_token=self.keep_class_token)


class PrefillGraph(nn.Module):
    """[B, L, dim] prefix embeddings -> last-position logits (fp32) and every layer's keys/values."""

    def __init__(self, model: NxtpModel):
        super().__init__()
        self.decoder: Decoder = model.language_decoder
        self.num_image_tokens = model.num_image_tokens

    def forward(self, inputs_embeds):
        dec, s = self.decoder, inputs_embeds.shape[1]
        mask = inference_mask(s, self.num_image_tokens, inputs_embeds.device, inputs_embeds.dtype)
        cos, sin = dec.rope(torch.arange(s, device=inputs_embeds.device))
        h, presents = inputs_embeds, []
        for layer in dec.layers:
            h, kv = layer(h, cos, sin, mask)
            presents += kv
        return (_head(dec, h), *presents)


def _head(dec: Decoder, h):
    """Last-position logits in fp32. The position is kept as a length-1 axis so the output
    projection exports as a MatMul (which int8 dynamic quantization handles; Gemm it does not)."""
    return dec.output(dec.norm(h[:, -1:]))[:, 0].float()


def branch_attention(q, prefix_k, prefix_v, k, v, mask):
    """Attention of the new tokens of N branches over their image's shared prefix and their
    own keys.

    q: [N, H, S, D] (S new tokens per branch); prefix_k/v: [B, H, Lp, D] shared by the N/B
    branches of each image (rows b*N/B .. (b+1)*N/B - 1; B = N gives one prefix per row; Lp may
    be 0); k/v: the branch's own keys/values [N, H, T+S, D], the new tokens' included; mask:
    additive [S, T+S] over the own keys (the prefix is always visible). The prefix is read by one
    batched matmul per image ([B, H, N/B*S, D] x [B, H, D, Lp]), never copied per branch."""
    n, h, s, d = q.shape
    b, lp = prefix_k.shape[0], prefix_k.shape[2]
    qg = q.transpose(1, 2).reshape(b, -1, h, d).transpose(1, 2)  # [B, H, N/B*S, D]
    rows = qg.shape[2]
    pre = torch.matmul(qg, prefix_k.transpose(2, 3)).transpose(1, 2).reshape(n, s, h, lp).transpose(1, 2)
    own = torch.matmul(q, k.transpose(2, 3)) + mask  # [N, H, S, T+S]
    probs = torch.cat([pre, own], dim=-1).float().mul(1.0 / math.sqrt(d)).softmax(-1).type_as(q)
    p_pre, p_own = probs[..., :lp], probs[..., lp:]
    p_pre = p_pre.transpose(1, 2).reshape(b, rows, h, lp).transpose(1, 2)  # [B, H, N/B*S, Lp]
    out = torch.matmul(p_pre, prefix_v).transpose(1, 2).reshape(n, s, h * d)
    return out + torch.matmul(p_own, v).transpose(1, 2).reshape(n, s, h * d)


def cache_mask(position, new_len: int, past_len: int, num_image_tokens: int, dtype):
    """Additive [S, T+S] mask of S new tokens (absolute positions position..position+S-1) over
    T earlier own tokens (all visible) and themselves: causal, plus full attention among the
    image tokens (positions < P), as `nxtrec.model.inference_mask`."""
    i = torch.arange(new_len, device=position.device)
    a = position + i
    allowed = (i[None, :] <= i[:, None]) | ((a[:, None] < num_image_tokens) & (a[None, :] < num_image_tokens))
    zero = torch.zeros((), dtype=dtype, device=position.device)
    new = torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=position.device))
    return torch.cat([torch.zeros(new_len, past_len, dtype=dtype, device=position.device), new], dim=1)


class StepGraph(nn.Module):
    """New tokens of N branches with explicit caches (see the module docstring). One token per
    branch is the decoding step; with an empty prefix and past, the whole prompt prefix is the
    prefill (which is how the runtime uses it: one session holds the decoder weights once)."""

    def __init__(self, model: NxtpModel):
        super().__init__()
        self.decoder: Decoder = model.language_decoder
        self.n_layers = len(self.decoder.layers)
        self.num_image_tokens = model.num_image_tokens

    def forward(self, inputs_embeds, position, *cache):
        dec, n_layers = self.decoder, self.n_layers
        prefix, past = cache[: 2 * n_layers], cache[2 * n_layers :]
        s = inputs_embeds.shape[1]
        positions = position.reshape(1) + torch.arange(s, device=inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, dec.cfg.head_dim, dec.cfg.rope_theta)
        mask = cache_mask(position, s, past[0].shape[2], self.num_image_tokens, inputs_embeds.dtype)
        h = inputs_embeds
        presents = []
        for i, layer in enumerate(dec.layers):
            q, k, v = layer.attention.qkv(layer.attention_norm(h), cos, sin)  # [N, H, S, D]
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            h = h + layer.attention.wo(branch_attention(q, prefix[2 * i], prefix[2 * i + 1], k, v, mask))
            h = h + layer.feed_forward(layer.ffn_norm(h))
            presents += [k, v]
        return (_head(dec, h), *presents)


class ReleasedDecoderPart(nn.Module):
    """The reference's split decoder: `input` [B, S, dim] + additive `mask` [B, 1, S, S] ->
    hidden states, or (last part) the logits of the last position [B, vocab]."""

    def __init__(self, model: NxtpModel, layers: range, head: bool):
        super().__init__()
        self.decoder = model.language_decoder
        self.layer_ids = list(layers)
        self.head = head

    def forward(self, input, mask):  # noqa: A002 - the released graphs' input name
        dec = self.decoder
        cos, sin = dec.rope(torch.arange(input.shape[1], device=input.device))
        h = input
        for i in self.layer_ids:
            h, _ = dec.layers[i](h, cos, sin, mask)
        return dec.output(dec.norm(h[:, -1:]))[:, 0] if self.head else h


# ---------------------------------------------------------------------------------------
# names and shapes
# ---------------------------------------------------------------------------------------


def kv_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def graph_signatures(config: ModelConfig, dtype: str = "float32") -> dict:
    """Inputs and outputs of every graph (names, element types, symbolic shapes)."""
    d, e = config.decoder, config.encoder
    H, D, V, P, L = d.n_heads, d.head_dim, d.vocab_size, e.num_patches, d.n_layers
    f, size = dtype, e.image_size

    def t(name, shape, typ=f):
        return {"name": name, "dtype": typ, "shape": shape}

    kv = lambda pre, n, length: [t(name, [n, H, length, D]) for name in kv_names(pre, L)]  # noqa: E731
    return {
        "encoder": {
            "inputs": [t("pixels", ["batch", 3, size, size], "float32")],
            "outputs": [t("image_tokens", ["batch", P, d.dim])],
        },
        "prefill": {
            "inputs": [t("inputs_embeds", ["batch", "prefix_len", d.dim])],
            "outputs": [t("logits", ["batch", V], "float32"), *kv("present", "batch", "prefix_len")],
        },
        "step": {
            "inputs": [
                t("inputs_embeds", ["branches", "new_len", d.dim]),
                t("position", [], "int64"),
                *kv("prefix", "batch", "prefix_len"),
                *kv("past", "branches", "past_len"),
            ],
            "outputs": [t("logits", ["branches", V], "float32"), *kv("present", "branches", "past_len + new_len")],
            "notes": "branches = batch * branches per image (rows of image b are contiguous); new_len is 1 when "
            "decoding; position = absolute position of the first new token; prefix_len and past_len may be 0 "
            "(prefill: prefix and past empty, position 0, new_len = prefix length)",
        },
    }


# ---------------------------------------------------------------------------------------
# torch.onnx.export with external data
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """torch.export, onnxscript and the ONNX Runtime quantizer print progress, warnings and
    log records; keep the command's output ours."""
    buf = io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        logging.disable(logging.NOTSET)


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module, tuple(args), dynamo=True, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dynamic_shapes, opset_version=OPSET, optimize=True, external_data=True,
            )
            program.save(str(path), external_data=True)
    except Exception as e:  # the exporter raises many types; show the root cause in one line
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        first = (str(root).strip().splitlines() or [""])[0]
        raise OnnxExportError(f"exporting {path.name} failed: {type(root).__name__}: {first}") from e
    finally:
        with contextlib.suppress(NameError):
            del program
        gc.collect()


def _external_tensors(model_proto):
    import onnx

    for init in model_proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            yield init


def _ext_info(tensor) -> dict:
    return {e.key: e.value for e in tensor.external_data}


def share_external_data(models: list[Path], out_dir: Path, data_name: str) -> None:
    """Rewrite ONNX files (each with its own external data) into `out_dir` so that all of
    them reference one data file `data_name`, each distinct tensor stored once (tensors are
    matched by content). The source files may be temporary; they are not modified."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    stored: dict[tuple, tuple[int, int]] = {}
    with open(out_dir / data_name, "wb") as data:
        for src in models:
            proto = onnx.load(str(src), load_external_data=False)
            for init in _external_tensors(proto):
                info = _ext_info(init)
                offset, length = int(info.get("offset", 0)), int(info["length"])
                with open(src.parent / info["location"], "rb") as f:
                    f.seek(offset)
                    raw = f.read(length)
                key = (init.data_type, tuple(init.dims), hashlib.blake2b(raw, digest_size=20).digest())
                if key not in stored:
                    pad = -data.tell() % (_ALIGN if length >= _ALIGN_MIN else 16)
                    data.write(b"\0" * pad)
                    stored[key] = (data.tell(), length)
                    data.write(raw)
                del raw
                off, ln = stored[key]
                del init.external_data[:]
                for k, v in (("location", data_name), ("offset", str(off)), ("length", str(ln))):
                    entry = init.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save(proto, str(out_dir / src.name))
            del proto
            gc.collect()


# ---------------------------------------------------------------------------------------
# example inputs (dynamic dims need examples >= 2: torch.export specialises sizes 0 and 1)
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# the exports
# ---------------------------------------------------------------------------------------


def export_graphs(model: NxtpModel, tokenizer: Tokenizer, out_dir: Path, log=print) -> dict[str, float]:
    """Write encoder, prefill and step graphs and the embedding table of `model` (in its own
    dtype) into `out_dir`, the decoder graphs sharing one weights file. Returns export times."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    d, L = cfg.decoder, cfg.decoder.n_layers
    dtype = model.language_decoder.output.weight.dtype
    size = cfg.encoder.image_size
    times = {}
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))

    t = time.perf_counter()
    log("exporting the vision encoder ...")
    batch = torch.export.Dim("batch", min=1)
    # float32 pixels in every dtype: the encoder casts them to its weights' dtype.
    _export(EncoderGraph(model), [pixels], out_dir / FILES["encoder"], ["pixels"], ["image_tokens"],
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
        _export(PrefillGraph(model), [prefix], tmp / "prefill" / FILES["prefill"], ["inputs_embeds"],
                ["logits", *kv_names("present", L)], ({0: bd, 1: ld},))
        times["prefill"] = time.perf_counter() - t

        t = time.perf_counter()
        log("exporting the decoder step graph ...")
        args = _step_example(model, prefix_len, batch=2, per_image=3, past_len=2, new_len=3, dtype=dtype)
        nd, bd, sd = torch.export.Dim("branches", min=1), torch.export.Dim("batch", min=1), torch.export.Dim("new_len", min=1)
        ld, td = torch.export.Dim("prefix_len", min=0), torch.export.Dim("past_len", min=0)
        shapes = ({0: nd, 1: sd}, None, tuple([{0: bd, 2: ld}] * (2 * L) + [{0: nd, 2: td}] * (2 * L)))
        names = ["inputs_embeds", "position", *kv_names("prefix", L), *kv_names("past", L)]
        _export(StepGraph(model), args, tmp / "step" / FILES["step"], names, ["logits", *kv_names("present", L)],
                shapes)
        times["step"] = time.perf_counter() - t

        t = time.perf_counter()
        log("writing the shared decoder weights ...")
        share_external_data([tmp / "prefill" / FILES["prefill"], tmp / "step" / FILES["step"]], out_dir, DECODER_DATA)
        times["share"] = time.perf_counter() - t
    return times


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
    _export(EncoderGraph(model, keep_class_token=True), [pixels], out_dir / "encoder.onnx", ["input"], ["output"],
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
        _export(part, [x, mask], out_dir / name, ["input", "mask"], ["output"],
                ({0: bd, 1: sd}, {0: bd, 2: sd, 3: sd}))
    return out_dir


def export_released_layout_dir(model_dir: str | Path, out_dir: str | Path, validate: bool = True, log=print) -> Path:
    """`nxtrec export-onnx --layout released`: the released file layout of a model directory,
    with its `tokenizer.model` and `config.json` copied alongside (what the ONNX runtime needs
    next to the released files). Validates the chained decoder parts' logits against PyTorch."""
    from nxtrec.pretrained import CONFIG_FILE, TOKENIZER_FILE, load_model_dir

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_out_dir(out_dir)
    model, tokenizer = load_model_dir(model_dir)
    export_released_layout(model, out_dir, log=log)
    shutil.copyfile(model_dir / TOKENIZER_FILE, out_dir / "tokenizer.model")
    shutil.copyfile(model_dir / CONFIG_FILE, out_dir / "config.json")
    if validate:
        ref = torch_reference(model, tokenizer, sample_pixels(model.config), branches=1)
        del model
        gc.collect()
        from nxtrec import onnx_runtime as rt

        rec = rt.OnnxRecognizer(out_dir)
        enc = rec.encode(ref["pixels"])
        logits = rec.run_released(rec.prefix_embeddings(enc))
        diffs = {"encoder": float(np.abs(enc - ref["image_tokens"]).max()),
                 "prefill_logits": float(np.abs(logits - ref["prefill_logits"]).max())}
        log("validation (max |ONNX Runtime - PyTorch|): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return out_dir


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to write into a folder holding files that are not from an export."""
    ours = {*FILES.values(), ENCODER_DATA, DECODER_DATA, MANIFEST, *RELEASED_FILES, "config.json"}
    if out_dir.is_file():
        raise OnnxExportError(f"{out_dir}: is a file; --out takes a directory")
    if out_dir.is_dir():
        foreign = [p.name for p in out_dir.iterdir()
                   if p.name not in ours and not p.name.startswith((".decoder-", ".float-", ".quant-"))
                   and not p.name.endswith(".onnx.data")]
        if foreign:
            raise OnnxExportError(
                f"{out_dir}: holds files that are not from an ONNX export ({', '.join(sorted(foreign)[:3])}); "
                "choose a new or empty folder"
            )


# ---------------------------------------------------------------------------------------
# int8 dynamic quantization
# ---------------------------------------------------------------------------------------


def quantize_dir(src: str | Path, dst: str | Path, log=print) -> dict:
    """int8 dynamic quantization (weights int8 per tensor, activations quantized at run time)
    of every MatMul with a constant weight in the encoder and both decoder graphs of an
    exported float32 directory `src`, written to `dst` (the decoder graphs again share one
    weights file). Returns `dst`'s manifest."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    manifest = json.loads((src / MANIFEST).read_text())
    if manifest.get("dtype") != "float32" or manifest.get("quantization"):
        raise OnnxExportError(f"{src}: int8 quantization needs a float32 export (this one is {manifest.get('dtype')}"
                              f"{', ' + manifest['quantization'] if manifest.get('quantization') else ''})")
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".quant-", dir=dst) as tmp:
        tmp = Path(tmp)
        for key in ("encoder", "prefill", "step"):
            log(f"quantizing {FILES[key]} (int8 MatMul weights) ...")
            out = tmp / key / FILES[key]
            out.parent.mkdir()
            with _quiet():
                quantize_dynamic(
                    src / FILES[key], out, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                    use_external_data_format=True, extra_options={"MatMulConstBOnly": True},
                )
            gc.collect()
            if key == "encoder":
                share_external_data([out], dst, ENCODER_DATA)
        share_external_data([tmp / "prefill" / FILES["prefill"], tmp / "step" / FILES["step"]], dst, DECODER_DATA)
    for key in ("embeddings", "tokenizer"):
        if (src / FILES[key]).resolve() != (dst / FILES[key]).resolve():
            shutil.copyfile(src / FILES[key], dst / FILES[key])
    manifest["quantization"] = "int8-dynamic"
    manifest["sizes"] = file_sizes(dst)
    manifest.pop("validation", None)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


# ---------------------------------------------------------------------------------------
# manifest, validation, the command
# ---------------------------------------------------------------------------------------


def file_sizes(out_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(Path(out_dir).iterdir()) if p.is_file()}


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


def torch_reference(model: NxtpModel, tokenizer: Tokenizer, pixels: torch.Tensor, branches: int = 3) -> dict:
    """PyTorch outputs of every graph on one sample (image tokens, prefill logits and keys/values,
    two decoder steps for the top `branches` tokens), as numpy arrays, for `validate_export`."""
    from nxtrec.sampling import prefill as torch_prefill

    cfg = model.config
    dtype = model.language_decoder.output.weight.dtype
    prompt = torch.tensor(tokenizer.prompt_ids(cfg.image_token, cfg.prompt))
    dec = model.language_decoder
    with torch.inference_mode():
        image_tokens = model.encode_images(pixels)
        prefix = model.prefix_embeddings(image_tokens, prompt)
        logits, kvs, plen = torch_prefill(model, image_tokens, prompt)
        tokens = logits.float().softmax(-1).topk(branches, dim=-1).indices.reshape(-1)
        groups = [(i, i * branches, (i + 1) * branches) for i in range(pixels.shape[0])]
        step_logits, step_tokens, own = [], [], None
        for step in range(2):
            step_tokens.append(tokens)
            out, own = dec.step(tokens, plen + step, kvs, groups, own)
            step_logits.append(out.float())
            tokens = out.argmax(-1)
    np_ = lambda x: x.float().numpy()  # noqa: E731
    return {
        "pixels": pixels.float().numpy(),
        "image_tokens": np_(image_tokens),
        "prefix": prefix.numpy() if dtype == torch.float32 else prefix.float().numpy(),
        "prefill_logits": np_(logits),
        "prefill_kv": [np_(t) for kv in kvs for t in kv],
        "step_tokens": [t.numpy() for t in step_tokens],
        "step_logits": [np_(x) for x in step_logits],
        "prefix_len": plen,
        "branches": branches,
    }


def validate_export(out_dir: Path, ref: dict, log=print) -> dict:
    """Run ONNX Runtime on the reference inputs and return the max absolute differences.
    Sessions are opened one at a time (each decoder graph holds the full weights)."""
    from nxtrec import onnx_runtime as rt

    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    diffs = {}
    sess = rt.make_session(out_dir / FILES["encoder"])
    image_tokens = sess.run(None, {"pixels": ref["pixels"]})[0]
    diffs["encoder"] = float(np.abs(image_tokens.astype(np.float32) - ref["image_tokens"]).max())
    del sess
    np_dtype = rt.NP_DTYPES[manifest["dtype"]]
    sess = rt.make_session(out_dir / FILES["prefill"])
    out = sess.run(None, {"inputs_embeds": ref["prefix"].astype(np_dtype)})
    diffs["prefill_logits"] = float(np.abs(out[0] - ref["prefill_logits"]).max())
    diffs["prefill_kv"] = max(float(np.abs(a.astype(np.float32) - b).max()) for a, b in zip(out[1:], ref["prefill_kv"]))
    del sess, out
    gc.collect()
    table = np.load(out_dir / FILES["embeddings"], mmap_mode="r")
    sess = rt.make_session(out_dir / FILES["step"])
    k, b = ref["branches"], ref["pixels"].shape[0]
    h, hd, L = manifest["n_heads"], manifest["head_dim"], manifest["n_layers"]
    # the prefill through the step graph (empty prefix and past), as the runtime runs it
    empty = np.zeros((b, h, 0, hd), np_dtype)
    feed = {"inputs_embeds": ref["prefix"].astype(np_dtype), "position": np.array(0, dtype=np.int64)}
    feed.update((name, empty) for name in kv_names("prefix", L) + kv_names("past", L))
    out = sess.run(None, feed)
    diffs["step_prefill_logits"] = float(np.abs(out[0] - ref["prefill_logits"]).max())
    del out
    prefix_kv = [t.astype(np_dtype) for t in ref["prefill_kv"]]
    past = [np.zeros((k * b, h, 0, hd), np_dtype) for _ in prefix_kv]
    worst = 0.0
    for step, (tokens, want) in enumerate(zip(ref["step_tokens"], ref["step_logits"])):
        feed = {"inputs_embeds": np.asarray(table[tokens])[:, None, :].astype(np_dtype),
                "position": np.array(ref["prefix_len"] + step, dtype=np.int64)}
        feed.update(zip(kv_names("prefix", manifest["n_layers"]), prefix_kv))
        feed.update(zip(kv_names("past", manifest["n_layers"]), past))
        out = sess.run(None, feed)
        worst = max(worst, float(np.abs(out[0] - want).max()))
        past = out[1:]
    diffs["step_logits"] = worst
    del sess
    gc.collect()
    log("validation (max |ONNX Runtime - PyTorch|): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    return diffs


def sample_pixels(config: ModelConfig, image: str | Path | None = None, batch: int = 2) -> torch.Tensor:
    """Preprocessed sample images for validation: `image` (repeated) or seeded noise."""
    size = config.encoder.image_size
    if image is not None:
        from nxtrec.image import load_image, preprocess_array

        arr = preprocess_array(load_image(image), size, config.image_mean, config.image_std)
        return torch.from_numpy(np.stack([arr] * batch))
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


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
    from nxtrec.pretrained import TOKENIZER_FILE, load_model_dir

    if dtype not in EXPORT_DTYPES:
        raise OnnxExportError(f"--dtype {dtype}: choose from {', '.join(EXPORT_DTYPES)}")
    if quantize not in (None, "int8"):
        raise OnnxExportError(f"--quantize {quantize}: only int8 is supported")
    if quantize and dtype != "float32":
        raise OnnxExportError("--quantize int8 quantizes a float32 export; use --dtype float32")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_out_dir(out_dir)
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
            diffs = validate_export(float_dir, ref, log=log)
            manifest["validation"] = {"max_abs_diff": diffs, "sample": sample}
            limit = tolerance if tolerance is not None else _default_tolerance(dtype)
            if limit is None:
                log(f"({dtype} export: differences reported, not checked against a tolerance)")
            elif max(diffs.values()) > limit:
                manifest["validation"]["failed"] = True
                (float_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
                raise OnnxExportError(
                    f"validation failed: max difference {max(diffs.values()):.3g} > tolerance {limit:g} "
                    f"({', '.join(f'{k} {v:.2e}' for k, v in diffs.items())})"
                )
        if quantize:
            float_validation = manifest.get("validation")
            manifest = quantize_dir(float_dir, out_dir, log=log)
            if ref is not None:
                log("int8 export (differences reported, not checked against a tolerance):")
                manifest["validation"] = {"max_abs_diff": validate_export(out_dir, ref, log=log), "sample": sample,
                                          "float32_before_quantization": float_validation["max_abs_diff"]}
    finally:
        if quantize:
            shutil.rmtree(float_dir, ignore_errors=True)
    manifest["sizes"] = file_sizes(out_dir)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _default_tolerance(dtype: str) -> float | None:
    """Float32 graphs must match PyTorch closely; float16 (and int8) differences are reported,
    not enforced (they depend on the weights)."""
    return 1e-2 if dtype == "float32" else None
