"""Build model directories from the released artifacts (docs/design.md#formats-that-load).

- `convert_nxtp`: a released nxtp checkpoint (trained tensors only, prefix `module.`) + the
  OpenAI CLIP ViT-L/14 file (frozen encoder parts) + the LLaMA-2 tokenizer.
- `convert_llama`: LLaMA-2 weights in Meta format (`consolidated.00.pth` + `params.json`) or
  Hugging Face format (`config.json` + safetensors) truncated to the first L blocks, with the
  special-token rows added, + CLIP: the starting point for training.

Pickles are only ever loaded with `weights_only=True`; CLIP's TorchScript archive is loaded
with `torch.jit.load` on the CPU.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import warnings
from pathlib import Path

import torch

from nxtrec.errors import NxtrecError
from nxtrec.model.config import DecoderConfig, EncoderConfig, ModelConfig
from nxtrec.model.directory import (
    DTYPES,
    CheckpointError,
    build_model,
    check_state_dict,
    save_model_dir,
)
from nxtrec.model.tokenizer import Tokenizer

LLAMA_HEAD_DIM = 128
CLIP_HEAD_DIM = 64


def load_pickle(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip archive: legacy format, which cannot be memory-mapped
        pass
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: cannot be loaded safely with weights_only=True ({str(e).splitlines()[0]})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: cannot be loaded safely with weights_only=True ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]})") from None


def load_clip(path: str | Path) -> dict:
    """The whole state dict of an OpenAI CLIP file: the TorchScript archive OpenAI distributes
    (loaded on the CPU), or a plain state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: CLIP file not found (OpenAI's ViT-L-14.pt is expected there)")
    try:
        with warnings.catch_warnings():  # recent torch deprecates torch.jit; OpenAI's file is TorchScript
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=DeprecationWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    except RuntimeError:
        state = load_pickle(path)
        return state.get("state_dict", state)


def load_clip_visual(path: str | Path) -> dict:
    """CLIP's `visual.*` tensors (minus its own projection) as `vision_encoder.*`."""
    state = load_clip(path)
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise CheckpointError(f"{path}: no 'visual.*' tensors; is this an OpenAI CLIP ViT file?")
    visual.pop("proj", None)  # CLIP's own projection is replaced by nxtp's `proj`
    return {f"vision_encoder.{k}": v.float() for k, v in visual.items()}


def encoder_config_from(state: dict, source: str, heads: int | None = None) -> EncoderConfig:
    try:
        conv = state["vision_encoder.conv1.weight"]
        pos = state["vision_encoder.positional_embedding"]
    except KeyError as e:
        raise CheckpointError(f"{source}: missing tensor {e.args[0]!r}") from None
    layers = len({m.group(1) for k in state if (m := re.match(r"vision_encoder\.transformer\.resblocks\.(\d+)\.", k))})
    grid = round(math.sqrt(pos.shape[0] - 1))
    width = conv.shape[0]
    # Shapes do not tell the head count: CLIP ViTs use 64-wide heads.
    heads = heads or width // CLIP_HEAD_DIM
    return EncoderConfig(width=width, layers=layers, heads=heads, patch_size=conv.shape[-1], image_size=grid * conv.shape[-1])


def _count_layers(state: dict, prefix: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


# ---------------------------------------------------------------------------------------
# released nxtp checkpoint
# ---------------------------------------------------------------------------------------


def convert_nxtp(
    checkpoint, clip, tokenizer, out, dtype="float32", decoder_heads: int | None = None, encoder_heads: int | None = None
) -> Path:
    """Head counts default to the released architecture's conventions (128-wide decoder
    heads, 64-wide encoder heads): shapes alone do not determine them."""
    ckpt = load_pickle(checkpoint)
    trained = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(trained, dict) or not trained:
        raise CheckpointError(f"{checkpoint}: expected a dict with a 'model' state dict")
    trained = {k.removeprefix("module."): v for k, v in trained.items()}
    state = load_clip_visual(clip)
    state.update({k: v for k, v in trained.items() if k.startswith(("vision_encoder.", "language_decoder."))})
    emb = state.get("language_decoder.tok_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{checkpoint}: missing tensor 'language_decoder.tok_embeddings.weight'")
    dim = emb.shape[1]
    decoder = DecoderConfig(
        dim=dim,
        n_layers=_count_layers(state, "language_decoder.layers."),
        n_heads=decoder_heads or dim // LLAMA_HEAD_DIM,
        hidden_dim=state["language_decoder.layers.0.feed_forward.w1.weight"].shape[0],
        vocab_size=emb.shape[0],
    )
    encoder = encoder_config_from(state, str(clip), encoder_heads)
    config = ModelConfig(encoder=encoder, decoder=decoder, description=f"converted from {Path(checkpoint).name}")
    return _write(config, state, tokenizer, out, dtype, source=str(checkpoint))


def _write(config: ModelConfig, state: dict, tokenizer, out, dtype, source: str) -> Path:
    tok = Tokenizer(tokenizer, config.special_tokens, config.delimiter)
    if tok.vocab_size != config.decoder.vocab_size:
        raise CheckpointError(
            f"{tokenizer}: {tok.n_pieces} pieces + {len(config.special_tokens)} special tokens != {config.decoder.vocab_size} embedding rows in {source}"
        )
    config.validate(source)
    model = build_model(config, dtype=DTYPES[dtype], empty=True)
    check_state_dict(model.state_dict(), state, source)
    # One tensor at a time, in place, so that each source copy is freed as its converted copy
    # is made: peak memory stays about the size of the output (`state` is consumed).
    for k in list(state):
        state[k] = state[k].to(DTYPES[dtype])
    model.load_state_dict(state, assign=True)
    return save_model_dir(model, tokenizer, out)


# ---------------------------------------------------------------------------------------
# LLaMA-2 (Meta or Hugging Face format) + CLIP, for training
# ---------------------------------------------------------------------------------------

_HF_NAMES = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo Hugging Face's q/k row permutation (rotate-half layout -> Meta's interleaved pairs)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _meta_name(hf_name: str) -> tuple[str, bool] | None:
    """(Meta name, whether q/k rows need unpermuting) of a Hugging Face Llama tensor; None
    for tensors nxtp has no use for (e.g. rotary_emb.inv_freq buffers)."""
    if hf_name == "model.embed_tokens.weight":
        return "tok_embeddings.weight", False
    if hf_name == "model.norm.weight":
        return "norm.weight", False
    if hf_name == "lm_head.weight":
        return "output.weight", False
    if m := re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", hf_name):
        name = _HF_NAMES.get(m.group(2))
        if name is not None:
            return f"layers.{m.group(1)}.{name}.weight", name in ("attention.wq", "attention.wk")
    return None


def _kept(meta_name: str, n_layers: int) -> bool:
    m = re.match(r"layers\.(\d+)\.", meta_name)
    return m is None or int(m.group(1)) < n_layers


def _hf_shard_keys(path: Path, files: list[Path]) -> dict[Path, list[str]]:
    """Which tensor names each weight file holds: from the index json when there is one
    (no shard opened), else from each safetensors header (a few KB read)."""
    from safetensors import safe_open

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            by_file: dict[Path, list[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(path / file, []).append(name)
            return by_file
    by_file = {}
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                by_file[f] = list(sf.keys())
        else:
            by_file[f] = list(load_pickle(f))  # memory-mapped: only the names are read
    return by_file


def _read_hf(files_keys: dict[Path, list[str]], wanted: dict[str, tuple[str, bool]], n_heads: int) -> dict:
    """The `wanted` tensors ({HF name: (Meta name, unpermute)}), each read on its own."""
    from safetensors import safe_open

    state = {}
    for f, keys in files_keys.items():
        keys = [k for k in keys if k in wanted]
        if not keys:
            continue  # a shard holding only dropped blocks is never opened
        if not f.is_file():
            raise CheckpointError(f"{f}: file not found (named by the index json)")
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                tensors = {k: sf.get_tensor(k).clone() for k in keys}  # out of the mapping: see load_llama
        else:
            shard = load_pickle(f)
            tensors = {k: shard[k].clone() for k in keys}
        for k, v in tensors.items():
            name, permuted = wanted[k]
            state[name] = unpermute_hf(v, n_heads) if permuted else v
    return state


def load_llama(path: str | Path, n_layers: int | None = None) -> tuple[dict, dict]:
    """(Meta-layout state dict, params) from a Meta or Hugging Face LLaMA directory, with
    only the first `n_layers` blocks (all when None). Only the kept tensors are read:
    safetensors tensors one by one, `.pth` files memory-mapped, so peak memory is about the
    kept weights, not the whole model. Kept tensors are copied out of the file mappings:
    pages read through a mapping stay resident while any tensor of that file lives, so
    zero-copy views would keep the source bytes in memory beside their converted copies."""
    path = Path(path)
    if (path / "params.json").is_file():
        params = json.loads((path / "params.json").read_text())
        _check_layers(n_layers, params)
        shards = sorted(path.glob("consolidated.*.pth"))
        if len(shards) != 1:
            raise CheckpointError(f"{path}: expected exactly one consolidated.*.pth (7B), found {len(shards)}")
        mapped = load_pickle(shards[0])
        mapped.pop("rope.freqs", None)
        state = {k: v.clone() for k, v in mapped.items() if _kept(k, n_layers or params["n_layers"])}
        return state, params
    if (path / "config.json").is_file():
        hf = json.loads((path / "config.json").read_text())
        n_heads = hf["num_attention_heads"]
        if hf.get("num_key_value_heads", n_heads) != n_heads:
            raise CheckpointError(f"{path}: grouped-query attention (num_key_value_heads) is not supported")
        params = {"dim": hf["hidden_size"], "n_heads": n_heads, "n_layers": hf["num_hidden_layers"],
                  "norm_eps": hf.get("rms_norm_eps", 1e-5), "rope_theta": hf.get("rope_theta", 10000.0)}
        _check_layers(n_layers, params)
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
        files_keys = _hf_shard_keys(path, files)
        wanted = {k: target for keys in files_keys.values() for k in keys
                  if (target := _meta_name(k)) and _kept(target[0], n_layers or params["n_layers"])}
        return _read_hf(files_keys, wanted, n_heads), params
    raise CheckpointError(f"{path}: neither a Meta LLaMA folder (params.json) nor a Hugging Face one (config.json)")


def _check_layers(n_layers: int | None, params: dict) -> None:
    if n_layers is not None and not 1 <= n_layers <= params["n_layers"]:
        raise NxtrecError(f"--decoder-layers must be between 1 and {params['n_layers']}, got {n_layers}")


def _append_rows(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`weight` as float32 with `rows` below it: `torch.cat([weight.float(), rows])` without
    the intermediate float32 copy of `weight` (a vocabulary-sized matrix)."""
    out = torch.empty(weight.shape[0] + rows.shape[0], weight.shape[1])
    out[: weight.shape[0]] = weight
    out[weight.shape[0]:] = rows
    return out


def convert_llama(
    llama, clip, out, decoder_layers: int, tokenizer=None, dtype="float32", seed: int = 0, encoder_heads: int | None = None
) -> Path:
    llama = Path(llama)
    tokenizer = Path(tokenizer) if tokenizer else llama / "tokenizer.model"
    dec, params = load_llama(llama, decoder_layers)
    base = ModelConfig()
    tok = Tokenizer(tokenizer, base.special_tokens, base.delimiter)
    dim = params["dim"]
    g = torch.Generator().manual_seed(seed)
    n_new = len(base.special_tokens)
    # Added rows (docs/design.md#vocabulary-and-special-tokens): embeddings ~ N(0, 1); output rows: PyTorch's Linear
    # init, except `<|empty|>` (the last) which is zero.
    new_emb = torch.randn(n_new, dim, generator=g)
    bound = 1.0 / math.sqrt(dim)  # kaiming_uniform(a=sqrt(5)) on a [*, dim] matrix
    new_out = (torch.rand(n_new, dim, generator=g) * 2 - 1) * bound
    new_out[-1] = 0.0
    dec["tok_embeddings.weight"] = _append_rows(dec.pop("tok_embeddings.weight"), new_emb)
    dec["output.weight"] = _append_rows(dec.pop("output.weight"), new_out)
    hidden_dim = dec["layers.0.feed_forward.w1.weight"].shape[0]
    state = {f"language_decoder.{k}": v for k, v in dec.items()}
    del dec  # `state` holds the only references: `_write` frees each source as it converts it
    state.update(load_clip_visual(clip))
    enc = encoder_config_from(state, str(clip), encoder_heads)
    proj = torch.randn(dim, enc.width, generator=g) * enc.width**-0.5
    state["vision_encoder.proj.weight"] = proj
    decoder = DecoderConfig(
        dim=dim, n_layers=decoder_layers, n_heads=params["n_heads"],
        hidden_dim=hidden_dim, vocab_size=tok.vocab_size,
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
    )
    config = ModelConfig(encoder=enc, decoder=decoder, description=f"LLaMA {llama.name} (first {decoder_layers} blocks) + CLIP {Path(clip).name}, untrained")
    return _write(config, state, tokenizer, out, dtype, source=str(llama))
