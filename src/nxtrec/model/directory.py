"""Model directories: `config.json` + `model.safetensors` + `tokenizer.model`, one folder,
loadable by one call."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from nxtrec.errors import disk_full_error, is_disk_full
from nxtrec.model.config import EncoderConfig, ModelConfig, llama_hidden_dim
from nxtrec.model.files import (  # noqa: F401 - the directory's names, imported from here too
    CONFIG_FILE,
    DTYPES,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    check_state_dict,
    check_weights,
)
from nxtrec.model.network import NxtpModel
from nxtrec.model.tokenizer import Tokenizer

def default_model_dir() -> Path:
    return Path(__file__).parents[1] / "assets" / "default-model"


def build_model(config: ModelConfig, device="cpu", dtype=torch.float32, empty: bool = False) -> NxtpModel:
    """A model with random weights, or with uninitialised storage when `empty` (about to be
    filled from a checkpoint, which saves initialising billions of parameters)."""
    if empty:
        with torch.device("meta"):
            model = NxtpModel(config)
        # dtype first, while on "meta": the storage is then allocated once, in `dtype`, and
        # never written (converting allocated storage would touch a second copy).
        return model.to(dtype).to_empty(device=device)
    with torch.device(device):
        return NxtpModel(config).to(dtype)


def load_model_dir(path: str | Path, device="cpu", dtype: str | torch.dtype = "float32"):
    """Load (model, tokenizer) from a model directory. dtype "int8": Linear layers quantised
    (CPU); a quantised directory (model/quantized.py) loads as int8 whether float32 or int8
    is asked for, and refuses other dtypes and devices."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model directory not found (expected {CONFIG_FILE}, {WEIGHTS_FILE}, {TOKENIZER_FILE})")
    for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing; a model directory holds {CONFIG_FILE}, {WEIGHTS_FILE} and {TOKENIZER_FILE}")
    config = ModelConfig.load(path / CONFIG_FILE)
    tokenizer = Tokenizer(path / TOKENIZER_FILE, config.special_tokens, config.delimiter)
    if tokenizer.vocab_size != config.decoder.vocab_size:
        raise CheckpointError(
            f"{path}: tokenizer has {tokenizer.vocab_size} tokens with the special tokens, config says vocab_size {config.decoder.vocab_size}"
        )
    if config.quantization is not None:
        from nxtrec.model.quantized import load_quantized

        return load_quantized(path, config, device, torch.float32 if dtype == "int8" else _dtype(dtype)), tokenizer
    if dtype == "int8":
        from nxtrec.model.quantized import quantize_int8

        if torch.device(device).type != "cpu":
            raise CheckpointError(f"{path}: dtype int8 runs on the CPU only, not {device}")

        return quantize_int8(load_model_dir(path, device, "float32")[0]), tokenizer
    dtype = _dtype(dtype)
    try:
        state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path / WEIGHTS_FILE}: cannot read safetensors file ({e})") from None
    model = build_model(config, device, dtype, empty=True)
    check_state_dict(model.state_dict(), state, str(path / WEIGHTS_FILE))
    check_weights(state, str(path / WEIGHTS_FILE))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval(), tokenizer


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def verify_model_dir(path: str | Path) -> str:
    """Check a model directory without loading its weights: the config, the tokenizer, and
    every tensor's name and shape in the safetensors header (a truncated file fails here)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    config = ModelConfig.load(path / CONFIG_FILE)
    tokenizer = Tokenizer(path / TOKENIZER_FILE, config.special_tokens, config.delimiter)
    if tokenizer.vocab_size != config.decoder.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens, config says {config.decoder.vocab_size}")
    if config.quantization is not None:
        from nxtrec.model.quantized import verify_quantized

        return verify_quantized(path, config)
    weights = path / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: cannot read safetensors file ({e})") from None
    with torch.device("meta"):
        expected = NxtpModel(config).state_dict()
    check_state_dict(expected, shapes, str(weights))
    with safe_open(str(weights), framework="pt") as f:  # memory-mapped: one tensor at a time
        dtypes = check_weights(((k, f.get_tensor(k)) for k in f.keys()), str(weights))  # noqa: SIM118
    return (f"{len(shapes)} tensors, {sum(t.numel() for t in shapes.values()) / 1e6:.1f}M parameters, "
            f"{dtypes}, all finite")


def save_model_dir(model: NxtpModel, tokenizer_file: str | Path, out: str | Path) -> Path:
    """Write a model directory. Everything is written to a temporary folder next to `out`,
    which then replaces `out` by renames: a reader sees the old model or the new one, never a
    mix, and a failed save (disk full, interrupt) leaves the old one untouched. Other files
    already in `out` are carried over."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if model.config.quantization is not None:
            from nxtrec.model.quantized import quantized_state

            state = quantized_state(model)
        else:
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        try:
            model.config.save(tmp / CONFIG_FILE)
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            _replace_dir(tmp, out)
        except Exception as e:
            if not is_disk_full(e):
                raise
            needed = sum(t.numel() * t.element_size() for t in state.values()) + os.path.getsize(tokenizer_file)
            raise disk_full_error(out, needed) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished folder `new` to `out`, keeping the extra files of an existing `out`."""
    if not out.exists():
        os.rename(new, out)
        return
    own = {CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE}
    shutil.copytree(out, new, dirs_exist_ok=True, ignore=lambda d, names: own if Path(d) == out else ())
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


VIT_L14 = EncoderConfig(width=1024, layers=24, heads=16, patch_size=14, image_size=224)
LLAMA2_7B = dict(dim=4096, n_heads=32, hidden_dim=llama_hidden_dim(4096), norm_eps=1e-5, rope_theta=10000.0)
PRESETS: dict[str, tuple[EncoderConfig, dict]] = {
    # The released architectures.
    "nxtp-1.78b": (VIT_L14, dict(LLAMA2_7B, n_layers=6)),
    "nxtp-0.77b": (VIT_L14, dict(LLAMA2_7B, n_layers=1)),
    # Small ones of the same architecture, for tests, benchmarks and the demo model.
    "tiny": (
        EncoderConfig(width=64, layers=2, heads=4, patch_size=16, image_size=64),
        dict(dim=64, n_layers=2, n_heads=4, hidden_dim=llama_hidden_dim(64, multiple_of=16)),
    ),
    # The bundled demo model, trained on synthetic scenes (configs/demo.toml, demo-stage2.toml).
    "demo": (
        EncoderConfig(width=192, layers=4, heads=3, patch_size=16, image_size=112),
        dict(dim=256, n_layers=3, n_heads=4, hidden_dim=llama_hidden_dim(256, multiple_of=32)),
    ),
    "small": (
        EncoderConfig(width=256, layers=4, heads=4, patch_size=32, image_size=224),
        dict(dim=256, n_layers=4, n_heads=4, hidden_dim=llama_hidden_dim(256, multiple_of=32)),
    ),
}


def quantize_model_dir(model_dir: str | Path, out: str | Path) -> Path:
    """`nxtrec quantize`: load a float model directory, quantise it as `--dtype int8` does at
    load time, and write the result to `out` (atomically, as every model directory)."""
    from nxtrec.model.quantized import describe, is_quantized, quantize_int8

    model_dir, out = Path(model_dir), Path(out)
    config = ModelConfig.load(model_dir / CONFIG_FILE)
    if is_quantized(config):
        raise CheckpointError(f"{model_dir}: is already quantised ({describe(config)}); quantise the float model instead")
    if out.exists() and out.resolve() == model_dir.resolve():
        raise CheckpointError(f"{out}: is the input model; write the int8 model to another directory")
    model, _ = load_model_dir(model_dir, dtype=torch.float32)
    quantize_int8(model)
    return save_model_dir(model, model_dir / TOKENIZER_FILE, out)
