"""Checks of an export against the PyTorch model on the same pixels."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import torch

from nxtrec.model.config import ModelConfig
from nxtrec.model.decoder import BranchRows
from nxtrec.model.network import NxtpModel
from nxtrec.model.tokenizer import Tokenizer
from nxtrec.onnx.format import FILES, MANIFEST, kv_names


def torch_reference(model: NxtpModel, tokenizer: Tokenizer, pixels: torch.Tensor, branches: int = 3) -> dict:
    """PyTorch outputs of every graph on one sample (image tokens, prefill logits and keys/values,
    two decoder steps for the top `branches` tokens), as numpy arrays, for `validate_export`."""
    from nxtrec.inference.sampling import prefill as torch_prefill

    cfg = model.config
    dtype = model.language_decoder.output.weight.dtype
    prompt = torch.tensor(tokenizer.prompt_ids(cfg.image_token, cfg.prompt))
    dec = model.language_decoder
    with torch.inference_mode():
        image_tokens = model.encode_images(pixels)
        prefix = model.prefix_embeddings(image_tokens, prompt)
        logits, kvs, plen = torch_prefill(model, image_tokens, prompt)
        tokens = logits.float().softmax(-1).topk(branches, dim=-1).indices.reshape(-1)
        rows = BranchRows.of([i for i in range(pixels.shape[0]) for _ in range(branches)], pixels.shape[0])
        step_logits, step_tokens, own = [], [], None
        for step in range(2):
            step_tokens.append(tokens)
            out, own = dec.step(tokens, plen + step, kvs, rows, own)
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


def validate_export(out_dir: Path, ref: dict) -> dict:
    """Run ONNX Runtime on the reference inputs and return the max absolute differences
    (`validation_line` formats them; `nxtrec export-onnx` prints them once, at the end).
    Sessions are opened one at a time (each decoder graph holds the full weights)."""
    from nxtrec.onnx.sessions import NP_DTYPES, make_session

    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    diffs = {}
    sess = make_session(out_dir / FILES["encoder"])
    image_tokens = sess.run(None, {"pixels": ref["pixels"]})[0]
    diffs["encoder"] = float(np.abs(image_tokens.astype(np.float32) - ref["image_tokens"]).max())
    del sess
    np_dtype = NP_DTYPES[manifest["dtype"]]
    sess = make_session(out_dir / FILES["prefill"])
    out = sess.run(None, {"inputs_embeds": ref["prefix"].astype(np_dtype)})
    diffs["prefill_logits"] = float(np.abs(out[0] - ref["prefill_logits"]).max())
    diffs["prefill_kv"] = max(float(np.abs(a.astype(np.float32) - b).max()) for a, b in zip(out[1:], ref["prefill_kv"]))
    del sess, out
    gc.collect()
    table = np.load(out_dir / FILES["embeddings"], mmap_mode="r")
    sess = make_session(out_dir / FILES["step"])
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
    return diffs


def validation_line(diffs: dict) -> str:
    return "max |ONNX Runtime - PyTorch|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())


def sample_pixels(config: ModelConfig, image: str | Path | None = None, batch: int = 2) -> torch.Tensor:
    """Preprocessed sample images for validation: `image` (repeated) or seeded noise."""
    size = config.encoder.image_size
    if image is not None:
        from nxtrec.model.image import load_image, preprocess_array

        arr = preprocess_array(load_image(image), size, config.image_mean, config.image_std)
        return torch.from_numpy(np.stack([arr] * batch))
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def default_tolerance(dtype: str) -> float | None:
    """Float32 graphs must match PyTorch closely; float16 (and int8) differences are reported,
    not enforced (they depend on the weights)."""
    return 1e-2 if dtype == "float32" else None
