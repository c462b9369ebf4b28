"""Training configuration: TOML files, inheritance and `--set` overrides.

A config is resolved in this order, each step overriding only the keys it names:

1. the defaults (`configs/base.toml`, which lists every key; the dataclasses below hold the
   same values and a test keeps the two equal);
2. the files named by `inherit = "..."` (a shipped recipe name such as `g3m`, or a path
   relative to the file that inherits), oldest ancestor first;
3. the experiment file itself;
4. command-line overrides `--set section.key=VALUE`, where VALUE is read as a TOML literal
   (`2e-5`, `true`, `[1, 2]`, `"text"`); a value that is not a TOML literal is a string.

Unknown sections and keys are errors that name the key and the closest valid one. The
resolved config is written as `config.toml` into the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from nxtrec.errors import NxtrecError
from nxtrec.model.config import (
    TEMPLATES,  # the ten prompt templates of the released recipe
)
from nxtrec.training.toml_writer import dumps_toml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport, a dependency there
    import tomli as tomllib

CONFIG_DIR = Path(__file__).parents[1] / "configs"


class TrainConfigError(NxtrecError):
    pass


# ---------------------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------------------


@dataclass
class RunSection:
    dir: str = "runs/default"
    seed: int = 42
    device: str = "auto"
    kill_after_steps: int = 0


@dataclass
class ModelSection:
    init: str = ""
    preset: str = ""
    tokenizer: str = ""
    compile: bool = False
    activation_checkpointing: bool = False


@dataclass
class DataSection:
    registry: str = ""
    datasets: list[str] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    num_workers: int = 4
    shuffle: bool = True
    shuffle_buffer: int = 1000
    empty_labels: str = "keep"
    max_seq_len: int = 512
    padding: str = "longest"
    templates: list[str] = field(default_factory=lambda: list(TEMPLATES))


@dataclass
class ParamsSection:
    trainable: list[str] = field(
        default_factory=lambda: [
            "vision_encoder.transformer.resblocks.{-6:}.*",
            "vision_encoder.ln_post.*",
            "vision_encoder.proj.*",
            "language_decoder.tok_embeddings.*",
            "language_decoder.layers.*",
            "language_decoder.norm.*",
            "language_decoder.output.*",
        ]
    )
    frozen: list[str] = field(default_factory=list)
    embedding_rows: list[str] = field(default_factory=lambda: ["<|image|>"])


@dataclass
class OptimSection:
    lr: float = 1e-5
    min_lr: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.1
    no_decay: list[str] = field(default_factory=lambda: ["language_decoder.tok_embeddings.*"])
    decay_also: list[str] = field(default_factory=list)
    warmup_ratio: float = 0.002
    warmup_steps: int = 2000
    grad_clip: float = 0.0


@dataclass
class LossSection:
    span: str = "text"
    reduction: str = "tokens"


@dataclass
class TrainSection:
    epochs: int = 3
    max_steps: int = 0
    global_batch_size: int = 512
    micro_batch_size: int = 16
    precision: str = "fp16"
    parallel: str = "ddp"


@dataclass
class CheckpointSection:
    every: int = 1000
    keep_last: int = 3
    keep_every: int = 0
    export: bool = True


@dataclass
class LogSection:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True


@dataclass
class EvalSection:
    every: int = 0  # optimizer steps between evaluations on the main rank (0 = off)
    data: str = ""  # validation shards: a registry name, a shard folder or a pattern
    images: int = 64  # the first N images of `data`
    top_k: list[int] = field(default_factory=lambda: [5, 10])
    batch_size: int = 16


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    params: ParamsSection = field(default_factory=ParamsSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_toml())
        tmp.replace(path)


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "data.padding": ("longest", "max"),
    "data.empty_labels": ("keep", "skip"),
    "loss.span": ("text", "answer"),
    "loss.reduction": ("tokens", "batches"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.parallel": ("ddp", "fsdp"),
}


def _sections() -> dict[str, type]:
    return typing.get_type_hints(TrainConfig)


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _sections().items() for k in _field_types(cls)]


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------


def _closest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_value(key: str, value, typ, source: str):
    """Type-check one value against the dataclass annotation; ints are accepted as floats."""
    where = f"{source}: {key}"
    origin = typing.get_origin(typ)
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise TrainConfigError(f"{where}: expected a list, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item, source) for i, v in enumerate(value)]
    if typ is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TrainConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise TrainConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(typ)


def _validate_keys(data: dict, source: str) -> None:
    sections = _sections()
    for name, body in data.items():
        if name == "inherit":
            continue
        if name not in sections:
            raise TrainConfigError(f"{source}: unknown section {name!r}{_closest(name, list(sections) + ['inherit'])}")
        if not isinstance(body, dict):
            raise TrainConfigError(f"{source}: {name!r} must be a table ([{name}]), got {body!r}")
        fields = _field_types(sections[name])
        for key in body:
            if key not in fields:
                full = f"{name}.{key}"
                raise TrainConfigError(f"{source}: unknown key {full!r}{_closest(full, valid_keys())}")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def find_config(name_or_path: str | Path, relative_to: Path | None = None) -> Path:
    """A config file by path (relative paths are tried against `relative_to` first), or a
    shipped recipe by name (`g3m`, `tiny-cpu`, ...)."""
    p = Path(name_or_path)
    candidates = [relative_to / p] if relative_to is not None and not p.is_absolute() else []
    for c in candidates + [p]:
        if c.is_file():
            return c
    if len(p.parts) == 1:
        shipped = CONFIG_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
        if shipped.is_file():
            return shipped
    raise TrainConfigError(
        f"{name_or_path}: no such config file and no shipped recipe of that name "
        f"(recipes: {', '.join(recipe_names())}){_closest(str(name_or_path), recipe_names())}"
    )


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TrainConfigError(f"{path}: invalid TOML ({e})") from None
    except OSError as e:
        raise TrainConfigError(f"{path}: cannot read ({e.strerror})") from None


def _load_chain(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise TrainConfigError(f"{path}: inheritance cycle ({' -> '.join(str(s) for s in seen + (path,))})")
    data = read_toml(path)
    _validate_keys(data, str(path))
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise TrainConfigError(f"{path}: inherit must be a recipe name or a path, got {parent!r}")
    return _deep_merge(_load_chain(find_config(parent, path.parent), seen + (path,)), data)


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=VALUE` -> (section, key, value); VALUE is a TOML literal, else a string."""
    if "=" not in text:
        raise TrainConfigError(f"--set {text!r}: expected section.key=VALUE")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise TrainConfigError(f"--set {text!r}: the key must be section.key{_closest(key, valid_keys())}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    section, name = key.split(".")
    return section, name, value


def build_config(data: dict, source: str = "config") -> TrainConfig:
    """A `TrainConfig` from a (partial) nested dict over the defaults; checks keys, types
    and choices."""
    _validate_keys(data, source)
    sections = _sections()
    built = {}
    for name, cls in sections.items():
        body = data.get(name, {})
        types = _field_types(cls)
        values = {k: _check_value(f"{name}.{k}", v, types[k], source) for k, v in body.items()}
        built[name] = cls(**values)
    cfg = TrainConfig(**built)
    validate(cfg, source)
    return cfg


def load_config(path_or_name: str | Path | None, overrides: list[str] = (), data: dict | None = None) -> TrainConfig:
    """Resolve defaults <- inherited files <- file <- `overrides` (and an optional dict)."""
    merged: dict = {}
    source = "defaults"
    if path_or_name is not None:
        path = find_config(path_or_name)
        merged = _load_chain(path)
        source = str(path)
    if data:
        _validate_keys(data, "config")
        merged = _deep_merge(merged, data)
    for text in overrides:
        section, key, value = parse_override(text)
        _validate_keys({section: {key: value}}, "--set")
        merged = _deep_merge(merged, {section: {key: value}})
    return build_config(merged, source)


def validate(cfg: TrainConfig, source: str = "config") -> None:
    flat = {f"{s}.{k}": v for s, body in cfg.to_dict().items() for k, v in body.items()}
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise TrainConfigError(f"{source}: {key} = {flat[key]!r}; choose one of {', '.join(allowed)}")
    t = cfg.train
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise TrainConfigError(f"{source}: train.micro_batch_size and train.global_batch_size must be positive")
    if t.global_batch_size % t.micro_batch_size:
        raise TrainConfigError(
            f"{source}: train.global_batch_size {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {t.micro_batch_size}"
        )
    if t.epochs < 1 and t.max_steps < 1:
        raise TrainConfigError(f"{source}: set train.epochs or train.max_steps to a positive number")
    if len(cfg.optim.betas) != 2:
        raise TrainConfigError(f"{source}: optim.betas must have two numbers, got {cfg.optim.betas}")
    if cfg.checkpoint.keep_last < 1:
        raise TrainConfigError(f"{source}: checkpoint.keep_last must be at least 1 (the checkpoint to resume from)")
    if cfg.checkpoint.every < 1 or cfg.log.every < 1:
        raise TrainConfigError(f"{source}: checkpoint.every and log.every must be at least 1")
    if not cfg.data.templates:
        raise TrainConfigError(f"{source}: data.templates is empty")
    if cfg.data.max_seq_len < 1:
        raise TrainConfigError(f"{source}: data.max_seq_len must be positive")
    _check_ranges(flat, source)


# Numbers that must be >= 0 (every float must also be finite: a NaN learning rate trains nothing).
NON_NEGATIVE = ("run.seed", "run.kill_after_steps", "data.num_workers", "data.shuffle_buffer", "optim.lr", "optim.min_lr",
                "optim.weight_decay", "optim.warmup_ratio", "optim.warmup_steps", "optim.grad_clip", "train.epochs",
                "train.max_steps", "checkpoint.keep_every", "eval.every", "eval.images")
POSITIVE = ("optim.eps", "eval.batch_size")


def _check_ranges(flat: dict, source: str) -> None:
    for key, value in flat.items():
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(x, float) and not math.isfinite(x) for x in numbers):
            raise TrainConfigError(f"{source}: {key} = {value!r}; must be a finite number")
    for key in NON_NEGATIVE:
        if key in flat and flat[key] < 0:
            raise TrainConfigError(f"{source}: {key} = {flat[key]!r}; must be 0 or more")
    for key in POSITIVE:
        if key in flat and flat[key] <= 0:
            raise TrainConfigError(f"{source}: {key} = {flat[key]!r}; must be more than 0")
    if not all(0 <= b < 1 for b in flat["optim.betas"]):
        raise TrainConfigError(f"{source}: optim.betas = {flat['optim.betas']}; each must be in [0, 1)")
    if any(k < 1 for k in flat.get("eval.top_k", [1])):
        raise TrainConfigError(f"{source}: eval.top_k = {flat['eval.top_k']}; each k must be at least 1")


def diff_configs(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Keys whose values differ, as `key: old -> new` lines."""
    fa = {f"{s}.{k}": v for s, body in a.to_dict().items() for k, v in body.items()}
    fb = {f"{s}.{k}": v for s, body in b.to_dict().items() for k, v in body.items()}
    return [f"{k}: {fa[k]!r} -> {fb[k]!r}" for k in fa if fa[k] != fb[k]]

