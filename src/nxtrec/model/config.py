"""Model configuration: the architecture, special tokens and prompt of a model directory.

`config.json` in a model directory is `ModelConfig.to_dict()`; unknown keys are errors that
name the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

from nxtrec.errors import NxtrecError
from nxtrec.model.image import CLIP_MEAN, CLIP_STD


class ConfigError(NxtrecError):
    pass


# The ten prompt templates of the released training recipe (DESIGN.md section 6); the first
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "ModelConfig":
        data = dict(data)
        enc = _build(EncoderConfig, data.pop("encoder", {}), f"{source}: encoder")
        dec = _build(DecoderConfig, data.pop("decoder", {}), f"{source}: decoder")
        cfg = _build(cls, data, source, encoder=enc, decoder=dec)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        d, e = self.decoder, self.encoder
        if d.dim % d.n_heads or (d.head_dim % 2):
            raise ConfigError(f"{source}: decoder.dim {d.dim} must split into an even head size over {d.n_heads} heads")
        if e.width % e.heads:
            raise ConfigError(f"{source}: encoder.width {e.width} is not divisible by encoder.heads {e.heads}")
        if e.image_size % e.patch_size:
            raise ConfigError(f"{source}: encoder.image_size {e.image_size} is not a multiple of patch_size {e.patch_size}")
        if self.image_token not in self.special_tokens:
            raise ConfigError(f"{source}: image_token {self.image_token!r} is not in special_tokens")

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
        return cls.from_dict(data, source=str(path))


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
