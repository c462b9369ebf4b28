"""Low-rank adapters (LoRA) for a model directory: the layers `nxtrec teach` trains, and the
adapter folder it writes (`adapter.safetensors` + `adapter.json`, docs/teach.md).

An adapter changes a Linear layer's weight W by `scale * B @ A` (A: [rank, in], B: [out,
rank]), and adds a delta to the output layer's rows of the taught labels' tokens (their
logits; the rest of the vocabulary is untouched). Loading one merges both into the weights
once (`apply_adapter`), so inference, int8 quantisation and the ONNX export run the plain
model at its usual speed. The layers are written here rather than taken from `peft`: peft's
injection would work on these nn.Linear layers, but it imports transformers (about 5 s) and
keeps its own file layout, while all nxtrec needs is one extra matmul per layer during
training and one merge at load time."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from nxtrec.digests import model_digest
from nxtrec.errors import NxtrecError
from nxtrec.model.files import check_weights

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_INFO = "adapter.json"
ADAPTER_FORMAT = 2  # 2 added the output rows; a format-1 adapter is one without them
OUTPUT_LAYER = "language_decoder.output"
DECODER_TARGETS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                   "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")  # fmt: skip
ENCODER_TARGETS = ("attn.out_proj", "mlp.c_fc", "mlp.c_proj")


class AdapterError(NxtrecError):
    """A missing, damaged or mismatched adapter folder."""


class LoRALinear(nn.Module):
    """`base(x) + scale * x A^T B^T`; B starts at zero, so a fresh adapter changes nothing."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(base.in_features)  # PyTorch's Linear initialisation, as in the LoRA paper
        a = torch.rand(rank, base.in_features, generator=generator) * 2 * bound - bound
        self.lora_a = nn.Parameter(a.to(base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def trained(self) -> dict[str, nn.Parameter]:
        return {"lora_a": self.lora_a, "lora_b": self.lora_b}

    def merge(self) -> None:
        merge_delta(self.base, self.lora_a.detach(), self.lora_b.detach(), self.scale)


class OutputRows(nn.Module):
    """The output layer plus a trained delta on the rows of some tokens (the taught labels'
    pieces): it moves those tokens' logits directly, where a low-rank change of the hidden
    state would move every logit. Starts at zero."""

    def __init__(self, base: nn.Linear, token_ids: list[int]):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long), persistent=False)
        self.rows = nn.Parameter(torch.zeros(len(token_ids), base.in_features, dtype=base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x).index_add(-1, self.token_ids, x @ self.rows.t())

    def trained(self) -> dict[str, nn.Parameter]:
        return {"rows": self.rows}

    def merge(self) -> None:
        merge_rows(self.base, self.token_ids, self.rows.detach())


def target_names(model: nn.Module, encoder_blocks: int = 0) -> list[str]:
    """Module names of the Linear layers an adapter trains: every decoder block's attention and
    feed-forward projections, plus those of the last `encoder_blocks` encoder blocks (and the
    encoder's projection into the decoder when any)."""
    names = [f"language_decoder.layers.{i}.{t}" for i in range(len(model.language_decoder.layers))
             for t in DECODER_TARGETS]  # fmt: skip
    blocks = len(model.vision_encoder.transformer.resblocks)
    if encoder_blocks > blocks:
        raise AdapterError(f"--encoder-blocks {encoder_blocks}: the encoder has {blocks} blocks")
    if encoder_blocks:
        names += [f"vision_encoder.transformer.resblocks.{i}.{t}" for i in range(blocks - encoder_blocks, blocks)
                  for t in ENCODER_TARGETS]  # fmt: skip
        names.append("vision_encoder.proj")
    return names


def attach_lora(model: nn.Module, names: list[str], rank: int, alpha: float, seed: int,
                output_rows: list[int] = ()) -> dict[str, nn.Module]:
    """Freeze the model and put a `LoRALinear` in place of each named Linear layer, and an
    `OutputRows` in place of the output layer when `output_rows` names tokens."""
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrapped: dict[str, nn.Module] = {}
    for name in names:
        wrapped[name] = LoRALinear(model.get_submodule(name), rank, alpha, generator)
    if output_rows:
        wrapped[OUTPUT_LAYER] = OutputRows(model.get_submodule(OUTPUT_LAYER), list(output_rows))
    for name, layer in wrapped.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return wrapped


def detach_lora(model: nn.Module, wrapped: dict[str, nn.Module], merge: bool) -> None:
    """Put the base layers back, with the adapter merged into their weights when `merge`."""
    for name, layer in wrapped.items():
        parent, _, child = name.rpartition(".")
        if merge:
            layer.merge()
        setattr(model.get_submodule(parent), child, layer.base)


@torch.no_grad()
def merge_delta(linear: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    delta = (b.float() @ a.float()) * scale
    linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))


@torch.no_grad()
def merge_rows(linear: nn.Linear, token_ids: torch.Tensor, rows: torch.Tensor) -> None:
    ids = token_ids.to(linear.weight.device)
    linear.weight[ids] = (linear.weight[ids].float() + rows.float().to(linear.weight.device)).to(linear.weight.dtype)


def lora_state(wrapped: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The trained tensors: `NAME.lora_a`, `NAME.lora_b` per adapted layer, and
    `language_decoder.output.rows` when the output rows are trained."""
    return {f"{name}.{part}": p.detach().clone().contiguous()
            for name, layer in wrapped.items() for part, p in layer.trained().items()}  # fmt: skip


def load_lora_state(wrapped: dict[str, nn.Module], state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, layer in wrapped.items():
            for part, p in layer.trained().items():
                p.copy_(state[f"{name}.{part}"])


@dataclass
class AdapterInfo:
    """`adapter.json`: what the adapter is for and how it was made."""

    base_model: str  # the base model's digest (nxtrec.digests.model_digest)
    rank: int
    alpha: float
    targets: list[str]
    labels: list[str]  # the labels taught
    examples: str  # SHA-256 over the examples (images and labels)
    output_rows: list[int] = field(default_factory=list)  # token ids whose output-layer rows are adapted
    figures: dict = field(default_factory=dict)  # before/after, measured by teach on held-out examples
    settings: dict = field(default_factory=dict)
    format: int = ADAPTER_FORMAT

    @classmethod
    def load(cls, folder: Path) -> "AdapterInfo":
        try:
            raw = json.loads((folder / ADAPTER_INFO).read_text())
            return cls(**raw)
        except (OSError, ValueError, TypeError) as e:
            raise AdapterError(f"{folder / ADAPTER_INFO}: not a readable adapter description ({e})") from None


def save_adapter(folder: str | Path, state: dict[str, torch.Tensor], info: AdapterInfo) -> Path:
    """Write both files to a temporary folder next to `folder`, then swap it in by renames:
    a reader sees the old adapter or the new one, never half of one."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_INFO).write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
        for name in (ADAPTER_WEIGHTS, ADAPTER_INFO):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        folder.mkdir(exist_ok=True)
        for name in (ADAPTER_WEIGHTS, ADAPTER_INFO):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_adapter(folder: str | Path) -> tuple[AdapterInfo, dict[str, torch.Tensor]]:
    """The adapter's description and tensors, checked against each other."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file() or not (folder / ADAPTER_INFO).is_file():
        raise AdapterError(f"{folder}: not an adapter folder (expected {ADAPTER_WEIGHTS} and {ADAPTER_INFO}, "
                           "written by nxtrec teach)")
    info = AdapterInfo.load(folder)
    if info.format not in (1, ADAPTER_FORMAT):
        raise AdapterError(f"{folder}: adapter format {info.format}; this nxtrec reads formats 1-{ADAPTER_FORMAT}")
    try:
        state = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{folder / ADAPTER_WEIGHTS}: cannot read safetensors file ({e})") from None
    expected = {f"{t}.{part}" for t in info.targets for part in ("lora_a", "lora_b")}
    expected |= {f"{OUTPUT_LAYER}.rows"} if info.output_rows else set()
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[0]
        raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS} does not match {ADAPTER_INFO} (tensor {odd!r})")
    check_weights(state, str(folder / ADAPTER_WEIGHTS))
    return info, state


def check_base(info: AdapterInfo, folder: Path, model_dir: str | Path) -> None:
    digest = model_digest(model_dir)
    if digest != info.base_model:
        raise AdapterError(f"{folder}: adapter made for another base model (sha256 {info.base_model[:12]}), "
                           f"not {Path(model_dir).resolve().name} (sha256 {digest[:12]})")


def apply_adapter(model: nn.Module, folder: str | Path, model_dir: str | Path) -> AdapterInfo:
    """Merge the adapter at `folder` into `model` (loaded from `model_dir`, float weights).
    An adapter made for another base model is refused."""
    folder = Path(folder)
    info, state = read_adapter(folder)
    check_base(info, folder, model_dir)
    scale = info.alpha / info.rank
    for name in info.targets:
        a, b = state[f"{name}.lora_a"], state[f"{name}.lora_b"]
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{folder}: the model has no layer {name!r}") from None
        if not isinstance(linear, nn.Linear):
            raise AdapterError(f"{folder}: layer {name!r} is quantised; apply the adapter to the float model")
        if tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(linear.weight.shape) or a.shape[0] != info.rank:
            raise AdapterError(f"{folder}: layer {name!r} shapes do not match the model")
        merge_delta(linear, a, b, scale)
    if info.output_rows:
        output, rows = model.get_submodule(OUTPUT_LAYER), state[f"{OUTPUT_LAYER}.rows"]
        if not isinstance(output, nn.Linear):
            raise AdapterError(f"{folder}: the output layer is quantised; apply the adapter to the float model")
        if rows.shape != (len(info.output_rows), output.in_features) or not all(
                0 <= i < output.out_features for i in info.output_rows):  # fmt: skip
            raise AdapterError(f"{folder}: the output rows do not match the model")
        merge_rows(output, torch.tensor(info.output_rows), rows)
    return info


def verify_adapter(folder: str | Path, model_dir: str | Path | None = None) -> str:
    """`nxtrec verify` on an adapter folder; with `model_dir`, also that it is that model's."""
    folder = Path(folder)
    info, state = read_adapter(folder)
    if model_dir is not None:
        check_base(info, folder, model_dir)
    size = (folder / ADAPTER_WEIGHTS).stat().st_size
    return (f"adapter: rank {info.rank}, {len(info.targets)} layers, {len(info.output_rows)} output rows, "
            f"{sum(t.numel() for t in state.values())} "
            f"parameters ({size / 1e6:.2f} MB), teaches {', '.join(info.labels)}; all finite")


def merge_adapter_dir(model_dir: str | Path | None, folder: str | Path, out: str | Path) -> Path:
    """`nxtrec merge-adapter`: load the float model, merge the adapter, save a model directory."""
    from nxtrec.model.directory import TOKENIZER_FILE, default_model_dir, load_model_dir, save_model_dir

    model_dir = Path(model_dir or default_model_dir())
    if Path(out).exists() and Path(out).resolve() == model_dir.resolve():
        raise AdapterError(f"{out}: is the base model; write the merged model to another directory")
    model, _ = load_model_dir(model_dir, dtype="float32")
    apply_adapter(model, folder, model_dir)
    return save_model_dir(model, model_dir / TOKENIZER_FILE, out)
