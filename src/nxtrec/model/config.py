"""Model configuration: the architecture, special tokens and prompt of a model directory.

`config.json` in a model directory is `ModelConfig.to_dict()`; unknown keys are errors that
name the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from nxtrec.errors import NxtrecError
from nxtrec.model.image import CLIP_MEAN, CLIP_STD


class ConfigError(NxtrecError):
    pass


# The one quantised storage format (model/quantized.py): int8 Linear weights, one scale and
# zero point per output channel, activations quantised per call.
QUANTIZATION = {"method": "dynamic-int8", "granularity": "per-channel"}


# The ten prompt templates of the released training recipe (docs/design.md#training-templates); the first
# is the inference prompt.
TEMPLATES = (
    "The objects in the image are",
    "The items present in the picture are",
    "The elements depicted in the image are",
    "The objects shown in the photograph are",
    "The items visible in the image are",
    "The objects that appear in the picture are",
    "The elements featured in the image are",
    "The items captured in the photograph are",
    "The elements seen in the picture are",
    "The items represented in the image are",
)


@dataclass
class EncoderConfig:
    """OpenAI CLIP ViT: `width`, `layers`, `heads`, `patch_size`, input `image_size`."""

    width: int = 1024
    layers: int = 24
    heads: int = 16
    patch_size: int = 14
    image_size: int = 224

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class DecoderConfig:
    """LLaMA-2 decoder truncated to `n_layers` blocks (plus final norm and output layer)."""

    dim: int = 4096
    n_layers: int = 6
    n_heads: int = 32
    hidden_dim: int = 11008
    vocab_size: int = 32002
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def llama_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU width of Meta's LLaMA: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Appended to the SentencePiece vocabulary in this order (ids n, n+1, ...). The last one
    # is the "empty" row that padding id -1 selects.
    special_tokens: list[str] = field(default_factory=lambda: ["<|image|>", "<|empty|>"])
    image_token: str = "<|image|>"
    prompt: str = "The objects in the image are"
    delimiter: str = ","
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    # Free-form provenance ("nxtp-g3m converted from ...", "demo model", ...).
    description: str = ""
    # How the weights are stored when not as floats (`nxtrec quantize`, model/quantized.py):
    # None or QUANTIZATION.
    quantization: dict | None = None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["quantization"] is None:  # float models' config.json stays as it was
            del data["quantization"]
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        """Every value is type- and range-checked; the architecture (`encoder`, `decoder`)
        must be given (an empty config is an error, not the 1.78B defaults)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        sections = {"encoder": data.pop("encoder", {}), "decoder": data.pop("decoder", {})}
        enc = _build(EncoderConfig, sections["encoder"], f"{source}: encoder")
        dec = _build(DecoderConfig, sections["decoder"], f"{source}: decoder")
        cfg = _build(cls, data, source, encoder=enc, decoder=dec)
        for name, given in sections.items():
            if not given:
                raise ConfigError(f"{source}: {name!r} is missing or empty; a model config names its architecture")
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        for prefix, part in (("encoder.", self.encoder), ("decoder.", self.decoder), ("", self)):
            _check_values(part, source, prefix)
        d, e = self.decoder, self.encoder
        if d.dim % d.n_heads or (d.head_dim % 2):
            raise ConfigError(f"{source}: decoder.dim {d.dim} must split into an even head size over {d.n_heads} heads")
        if e.width % e.heads:
            raise ConfigError(f"{source}: encoder.width {e.width} is not divisible by encoder.heads {e.heads}")
        if e.image_size % e.patch_size:
            raise ConfigError(f"{source}: encoder.image_size {e.image_size} is not a multiple of patch_size {e.patch_size}")
        if self.image_token not in self.special_tokens:
            raise ConfigError(f"{source}: image_token {self.image_token!r} is not in special_tokens")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ConfigError(f"{source}: special_tokens has duplicates: {self.special_tokens}")
        if len(self.special_tokens) >= d.vocab_size:
            raise ConfigError(f"{source}: decoder.vocab_size {d.vocab_size} leaves no room beside {len(self.special_tokens)} special tokens")
        if self.quantization is not None and self.quantization != QUANTIZATION:
            raise ConfigError(f"{source}: quantization must be {json.dumps(QUANTIZATION)} (or absent), "
                              f"got {json.dumps(self.quantization, default=str)}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not UTF-8 text, not a config.json") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, expected config.json") from None
        return cls.from_dict(data, source=str(path))


# What each value must be: (type, check, what the check requires). Ints are ints (a float
# or a bool is refused), floats may be written as ints.
_POSITIVE = (lambda v: v > 0, "> 0")
_RGB_TRIPLE = (lambda v: len(v) == 3, "3 values (R, G, B)")
_VALUE_RULES = {
    **{name: (int, *_POSITIVE) for name in ("width", "layers", "heads", "patch_size", "image_size", "dim",
                                            "n_layers", "n_heads", "hidden_dim", "vocab_size")},
    "norm_eps": (float, lambda v: 0 < v < 1, "in (0, 1)"),
    "rope_theta": (float, *_POSITIVE),
    "special_tokens": (list, lambda v: len(v) >= 1 and all(isinstance(t, str) and t for t in v), "non-empty strings"),
    "image_token": (str, bool, "non-empty"),
    "prompt": (str, lambda v: True, ""),
    "delimiter": (str, bool, "non-empty"),
    "image_mean": (list, lambda v: len(v) == 3 and all(_is_number(x) and 0 <= x <= 1 for x in v), "3 values in [0, 1]"),
    "image_std": (list, lambda v: len(v) == 3 and all(_is_number(x) and x > 0 for x in v), "3 values > 0"),
    "description": (str, lambda v: True, ""),
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list"}


def _check_values(part, source: str, prefix: str) -> None:
    for f in dataclasses.fields(part):
        if f.name not in _VALUE_RULES:
            continue
        kind, ok, requirement = _VALUE_RULES[f.name]
        value = getattr(part, f.name)
        good_type = _is_number(value) if kind is float else isinstance(value, kind) and not isinstance(value, bool)
        if not good_type:
            raise ConfigError(f"{source}: {prefix}{f.name} must be {_TYPE_NAMES[kind]}, got {value!r}")
        if not ok(value):
            raise ConfigError(f"{source}: {prefix}{f.name} must be {requirement}, got {value!r}")


def _build(cls, data: dict, source: str, **fixed):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(names)})"
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    return cls(**{**data, **fixed})
