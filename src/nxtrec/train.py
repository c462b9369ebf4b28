"""Training (DESIGN.md sections 6-8): one process on a CPU or GPU, `torchrun` on a node, or
many nodes under Slurm, with PyTorch's own engine (DDP, or FSDP2 `fully_shard`).

One optimizer step:
1. every process takes `accum` micro-batches of (pixels, labels) from its share of the data;
2. each micro-batch becomes one sequence per image, `[P image tokens][<|image|>][<s>]
   [template] " label1, label2, ..." [EOS]`, with one template per micro-batch and the labels
   shuffled per sample (both drawn from a generator seeded by (seed, step, slot), so a resumed
   run draws exactly what an uninterrupted one would), padded to the longest sample;
3. the decoupled-label mask (section 7) is built vectorised; the decoder's output layer runs
   only at positions that have a target; the loss is the cross-entropy of the targets;
4. gradients are accumulated (DDP synchronises on the last micro-batch), the token-embedding
   gradient is masked to the configured rows, unscaled (fp16), clipped, and AdamW steps with
   linear warm-up + cosine.

Checkpoints (`RUN_DIR/checkpoints/ckpt-STEP/`) hold the trainable tensors (safetensors) and
`state.pt` (optimizer, scheduler, scaler, step, RNG, every rank's data position), which loads
with `torch.load(weights_only=True)`; each is written to a temporary folder and renamed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nxtrec.errors import NxtrecError
from nxtrec.model import NxtpModel, training_mask
from nxtrec.train_config import TrainConfig, TrainConfigError, diff_configs, load_config

IGNORE = -100
CKPT_PREFIX = "ckpt-"
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.toml"
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainError(NxtrecError):
    pass


class TrainingDiverged(TrainError):
    pass


# ---------------------------------------------------------------------------------------
# processes and devices
# ---------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one plain process when
    it is absent. NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainError("run.device = 'cuda' but no CUDA device is visible")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local, dev)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        info.initialised_here = True
    if dist.is_initialized():
        info.rank, info.world = dist.get_rank(), dist.get_world_size()
    return info


def _all_reduce(t: torch.Tensor, info: DistInfo, op=None) -> torch.Tensor:
    if info.enabled and info.world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _barrier(info: DistInfo) -> None:
    if info.enabled and info.world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------
# parameter selection: patterns, gradient masks, weight-decay groups
# ---------------------------------------------------------------------------------------

_SLICE = re.compile(r"\{(-?\d*)(?::(-?\d*))?\}")


def _compile_pattern(pattern: str):
    """`*` matches anything; `{a:b}` a block index within the slice a:b of its block list;
    `{i}` one index (negative from the end). Returns (regex, slices per capture group)."""
    parts, slices, pos = [], [], 0
    for m in _SLICE.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]).replace(r"\*", ".*"))
        parts.append(r"(\d+)")
        lo, hi = m.group(1), m.group(2)
        if m.group(0).count(":"):
            slices.append(slice(int(lo) if lo else None, int(hi) if hi else None))
        else:
            if not lo:
                raise TrainConfigError(f"parameter pattern {pattern!r}: empty index {{}}")
            slices.append(int(lo))
        pos = m.end()
    parts.append(re.escape(pattern[pos:]).replace(r"\*", ".*"))
    return re.compile("".join(parts)), slices


def _block_counts(names) -> dict[str, int]:
    """For every numbered container (`...resblocks.`), how many blocks it holds."""
    counts: dict[str, set] = {}
    for n in names:
        for m in re.finditer(r"\.(\d+)(?=\.)", n):
            counts.setdefault(n[: m.start() + 1], set()).add(int(m.group(1)))
    return {k: max(v) + 1 for k, v in counts.items()}


def match_params(names: list[str], patterns: list[str], what: str) -> set[str]:
    """Names matched by any pattern; a pattern that matches nothing is an error."""
    counts = _block_counts(names)
    out: set[str] = set()
    for pattern in patterns:
        regex, slices = _compile_pattern(pattern)
        hit = False
        for n in names:
            m = regex.fullmatch(n)
            if not m:
                continue
            ok = True
            for g, sel in enumerate(slices, start=1):
                size = counts.get(n[: m.start(g)], 0)
                idx = int(m.group(g))
                allowed = range(size)[sel] if isinstance(sel, slice) else [range(size)[sel]] if -size <= sel < size else []
                ok = ok and idx in allowed
            if ok:
                out.add(n)
                hit = True
        if not hit:
            raise TrainConfigError(f"{what}: pattern {pattern!r} matches no parameter of this model")
    return out


@dataclass
class ParamPlan:
    trainable: list[str]
    decay: list[str]
    no_decay: list[str]
    embedding_rows: list[int] | None  # None: every row of tok_embeddings learns


def plan_parameters(model: NxtpModel, cfg: TrainConfig, tokenizer) -> ParamPlan:
    names = [n for n, _ in model.named_parameters()]
    trainable = match_params(names, cfg.params.trainable, "params.trainable")
    if cfg.params.frozen:
        trainable -= match_params(names, cfg.params.frozen, "params.frozen")
    if not trainable:
        raise TrainConfigError("params: no parameter is trainable")
    shapes = dict(model.named_parameters())
    no_decay = match_params(names, cfg.optim.no_decay, "optim.no_decay") if cfg.optim.no_decay else set()
    also = match_params(names, cfg.optim.decay_also, "optim.decay_also") if cfg.optim.decay_also else set()
    ordered = [n for n in names if n in trainable]
    decay = [n for n in ordered if (shapes[n].ndim >= 2 and n not in no_decay) or n in also]
    rest = [n for n in ordered if n not in set(decay)]
    rows = None
    if "*" not in cfg.params.embedding_rows:
        rows = []
        for tok in cfg.params.embedding_rows:
            if tok in tokenizer.special_ids:
                rows.append(tokenizer.special_ids[tok])
            else:
                i = tokenizer.sp.piece_to_id(tok)
                if i == tokenizer.sp.unk_id() and tok != tokenizer.sp.id_to_piece(i):
                    raise TrainConfigError(f"params.embedding_rows: {tok!r} is not a token of this tokenizer")
                rows.append(i)
    return ParamPlan(ordered, decay, rest, rows)


# ---------------------------------------------------------------------------------------
# text: sequences, targets (sections 6 and 8)
# ---------------------------------------------------------------------------------------


@dataclass
class TextBatch:
    tokens: torch.Tensor  # [B, T] text ids (pad_id after each sample's end)
    targets: torch.Tensor  # [B, T-1] target of the logits at text position j, IGNORE if none
    answer_index: int  # position `a` of the last prompt token in the whole sequence
    n_targets: int


def text_rng(seed: int, step: int, slot: int) -> random.Random:
    """Template and label order of micro-batch `slot` (= micro index x world + rank) of
    optimizer step `step`: a pure function of them, so a resumed run draws the same."""
    return random.Random(f"nxtrec/{seed}/{step}/{slot}")


def make_text_batch(
    tokenizer,
    labels: list[list[str]],
    template: str,
    rng: random.Random,
    num_image_tokens: int,
    max_seq_len: int,
    padding: str = "longest",
    span: str = "text",
    image_token: str = "<|image|>",
) -> TextBatch:
    """Encode `image_token + template + " " + ", ".join(shuffled labels)` with BOS and EOS,
    swap the first two ids, truncate to `max_seq_len` in all, pad, and build the targets:
    the next token at every text position, except padding and EOS; with `span="answer"`
    only from the last prompt token on."""
    p = num_image_tokens
    prompt = tokenizer.prompt_ids(image_token, template)
    room = max_seq_len - p
    if room < len(prompt) + 1:
        raise TrainConfigError(
            f"data.max_seq_len {max_seq_len} leaves no room for labels after {p} image tokens and a "
            f"{len(prompt)}-token prompt"
        )
    seqs = []
    for labs in labels:
        labs = list(labs)
        rng.shuffle(labs)
        ids = tokenizer.encode(image_token + template + " " + ", ".join(labs), bos=True, eos=True)
        ids[0], ids[1] = ids[1], ids[0]
        if ids[: len(prompt)] != prompt:
            raise TrainError(f"the tokenizer merges the prompt {template!r} with the labels that follow it")
        seqs.append(ids[:room])
    t = room if padding == "max" else max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), t), tokenizer.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    targets = tokens[:, 1:].clone()
    targets[(targets == tokenizer.pad_id) | (targets == tokenizer.eos_id)] = IGNORE
    if span == "answer":
        targets[:, : len(prompt) - 1] = IGNORE
    return TextBatch(tokens, targets, p + len(prompt) - 1, int((targets != IGNORE).sum()))


# ---------------------------------------------------------------------------------------
# the model's training forward
# ---------------------------------------------------------------------------------------


class TrainStep(nn.Module):
    """Wraps the model so DDP / FSDP see one forward: images + text -> (sum of the target
    tokens' cross-entropy, number of target tokens)."""

    def __init__(self, model: NxtpModel, delimiter_id: int, pad_id: int):
        super().__init__()
        self.model = model
        self.delimiter_id = delimiter_id
        self.pad_id = pad_id

    def forward(self, pixels, tokens, targets, answer_index: int):
        m = self.model
        dec = m.language_decoder
        image = m.vision_encoder(pixels)  # [B, P, dim]
        b, p, _ = image.shape
        t = tokens.shape[1]
        h = torch.cat([image, dec.embed(tokens).to(image.dtype)], dim=1)
        seq = torch.cat([tokens.new_full((b, p), self.pad_id), tokens], dim=1)
        mask = training_mask(seq, answer_index, self.delimiter_id, p, dtype=h.dtype)
        cos, sin = dec.rope(torch.arange(p + t, device=h.device))
        for layer in dec.layers:
            h, _ = layer(h, cos, sin, mask)
        sel = targets != IGNORE  # [B, T-1]: logits at text position j predict token j+1
        h = h[:, p : p + t - 1][sel]
        logits = dec.output(dec.norm(h))
        loss = F.cross_entropy(logits.float(), targets[sel], reduction="sum")
        return loss, sel.sum()


def enable_activation_checkpointing(blocks) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant checkpoint
    inside the block's forward, so DDP and FSDP hooks around the block still run)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up over
    `warmup` steps (reaching the peak at the last one), then cosine to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return min(max(int(cfg.optim.warmup_ratio * total), cfg.optim.warmup_steps), total)


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


class LoaderStream:
    """Micro-batches `(pixels, labels)` from the data pipeline's `StreamLoader` as an endless
    stream over epochs, in a canonical order that does not depend on when the loader was
    (re)started: batch k of loader worker w comes before batch k of worker w+1 and before
    batch k+1 of any worker (the order torch's DataLoader yields in an uninterrupted epoch).
    A restarted DataLoader begins its round-robin at worker 0 again; holding back batches
    that arrive early keeps a resumed run on exactly the uninterrupted run's sequence.

    `state_dict()` holds the epoch and, per worker stream, the position of the last batch
    *consumed* (not merely received: the loader prefetches), which the loader replays."""

    def __init__(self, loader):
        self.loader = loader
        self.dataset = loader.dataset
        self.n = self.dataset.num_workers
        self.first_stream = self.dataset.stream_id(0)
        self.epoch = 0
        self._new_epoch()

    def _new_epoch(self) -> None:
        self.counts = [0] * self.n  # batches consumed per worker this epoch
        self.positions: dict[int, int] = {}  # stream -> samples consumed (last consumed batch)
        self.queues = [[] for _ in range(self.n)]
        self._it = None
        self._done = False

    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def _finished(self, w: int) -> bool:
        if self.queues[w]:
            return False
        if self._done:
            return True
        lo, hi = self.dataset.stream_range(w)
        return self.loader.positions.get(self.first_stream + w, 0) >= hi - lo

    def next_batch(self):
        while True:
            if self._it is None:
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
            live = [w for w in range(self.n) if not self._finished(w)]
            if not live:
                self.epoch += 1
                self._new_epoch()
                continue
            w = min(live, key=lambda i: (self.counts[i], i))
            if self.queues[w]:
                batch = self.queues[w].pop(0)
                self.counts[w] += 1
                self.positions[batch.stream] = batch.position
                return batch.pixels, batch.labels
            try:
                batch = next(self._it)
            except StopIteration:
                self._done = True
                continue
            self.queues[batch.stream - self.first_stream].append(batch)

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "counts": list(self.counts),
            "positions": {str(k): v for k, v in self.positions.items()},
            "fingerprint": self.dataset.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._new_epoch()
        self.counts = [int(c) for c in state["counts"]]
        self.positions = {int(k): int(v) for k, v in state["positions"].items()}
        self.loader.load_state_dict({"epoch": self.epoch, "positions": dict(state["positions"]), "skipped": {},
                                     "fingerprint": state["fingerprint"]})


def make_data(cfg: TrainConfig, model_config, info: DistInfo) -> LoaderStream:
    """This process's share of the configured datasets (registry names in `data.datasets`,
    shard files / folders / globs in `data.shards`): each rank reads N // world samples per
    epoch, in full micro-batches."""
    from nxtrec.data import build_loader

    names = list(cfg.data.datasets) + list(cfg.data.shards)
    loader = build_loader(
        names,
        cfg.data.registry or None,
        batch_size=cfg.train.micro_batch_size,
        image_size=model_config.encoder.image_size,
        num_workers=cfg.data.num_workers,
        shuffle=cfg.data.shuffle,
        shuffle_buffer=max(cfg.data.shuffle_buffer, 1),
        seed=cfg.run.seed,
        rank=info.rank,
        world_size=info.world,
        balance="drop",
        empty_labels=cfg.data.empty_labels,
        drop_last=True,
        pin_memory=info.device.type == "cuda",
    )
    return LoaderStream(loader)


# ---------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = re.fullmatch(CKPT_PREFIX + r"(\d+)", d.name)
            if m and (d / TRAINABLE_FILE).is_file() and (d / STATE_FILE).is_file():
                out.append((int(m.group(1)), d))
    return sorted(out)


def retained_steps(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    keep = set(sorted(steps)[-keep_last:])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(run_dir: Path, step: int, tensors: dict, state: dict, keep_last: int, keep_every: int) -> Path:
    """Write `ckpt-STEP/` atomically (temporary folder, then rename), then apply retention."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TRAINABLE_FILE),
              metadata={"format": "pt", "step": str(step)})
    torch.save(state, tmp / STATE_FILE)
    for name in (TRAINABLE_FILE, STATE_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    if final.exists():  # e.g. resumed from an older checkpoint: replace the stale one
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    ckpts = checkpoint_dirs(run_dir)
    keep = retained_steps([s for s, _ in ckpts], keep_last, keep_every)
    for s, d in ckpts:
        if s not in keep:
            shutil.rmtree(d, ignore_errors=True)
    return final


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / TRAINABLE_FILE))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user-facing error
        raise TrainError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]})") from None
    return tensors, state


def find_resume(run_dir: Path, resume: str | bool | None) -> Path | None:
    """`resume`: None = automatic (the newest checkpoint if any), True = must exist, a path
    = that checkpoint."""
    if isinstance(resume, (str, Path)):
        p = Path(resume)
        if not ((p / TRAINABLE_FILE).is_file() and (p / STATE_FILE).is_file()):
            raise TrainError(f"{p}: not a checkpoint folder (expected {TRAINABLE_FILE} and {STATE_FILE})")
        return p
    ckpts = checkpoint_dirs(run_dir)
    if not ckpts:
        if resume is True:
            raise TrainError(f"{run_dir}: no checkpoint to resume from")
        return None
    return ckpts[-1][1]


# ---------------------------------------------------------------------------------------
# logging
# ---------------------------------------------------------------------------------------


class Metrics:
    """Main rank only: JSON lines (`metrics.jsonl`) and TensorBoard. On resume the records
    after the checkpoint's step (written by the interrupted run) are dropped."""

    def __init__(self, run_dir: Path, resume_step: int, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
            except ImportError as e:
                warnings.warn(f"TensorBoard logging is off ({e})")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise TrainError(f"{run_dir}: no {METRICS_FILE} (is this a run directory?)")
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss and learning-rate curves of a run as one PNG (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        raise TrainError(f"{run_dir}: {METRICS_FILE} has no loss records yet")
    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    lr = [r.get("lr", float("nan")) for r in records]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(steps, loss, lw=0.8, alpha=0.5 if len(loss) > 50 else 1.0, label="loss")
    if len(loss) > 50:
        w = max(len(loss) // 50, 2)
        smooth = [sum(loss[max(0, i - w + 1) : i + 1]) / len(loss[max(0, i - w + 1) : i + 1]) for i in range(len(loss))]
        ax1.plot(steps, smooth, lw=1.5, label=f"mean of {w}")
    ax1.set_ylabel("training loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, lr, color="tab:orange")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------
# model set-up
# ---------------------------------------------------------------------------------------


def _init_dir(cfg: TrainConfig, run_dir: Path, info: DistInfo) -> Path:
    """The model directory training starts from: `model.init`, or a random initialisation
    of `model.preset` written once into RUN_DIR/init-model (by the main rank)."""
    if cfg.model.init and cfg.model.preset:
        raise TrainConfigError("set either model.init (a model directory) or model.preset, not both")
    if cfg.model.init:
        return Path(cfg.model.init)
    if not cfg.model.preset:
        raise TrainConfigError("set model.init (a model directory, e.g. from `nxtrec convert llama`) or model.preset")
    from nxtrec.pretrained import init_model

    out = run_dir / "init-model"
    if info.main and not (out / "model.safetensors").is_file():
        init_model(cfg.model.preset, out, tokenizer=cfg.model.tokenizer or None, seed=cfg.run.seed)
    _barrier(info)
    return out


def _apply_fsdp(model: NxtpModel, step_module: nn.Module, info: DistInfo):
    from torch.distributed.fsdp import fully_shard

    # Decoder blocks also return their keys/values (views); training never modifies them.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    for block in model.vision_encoder.transformer.resblocks:
        fully_shard(block)
    for layer in model.language_decoder.layers:
        fully_shard(layer)
    fully_shard(step_module)
    return step_module


@dataclass
class Trainer:
    cfg: TrainConfig
    info: DistInfo
    model: NxtpModel
    tokenizer: object
    tokenizer_file: Path
    plan: ParamPlan
    module: nn.Module  # what forward is called on (DDP / FSDP / plain TrainStep)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    params: dict[str, nn.Parameter]
    grad_mask: torch.Tensor | None


def _build(cfg: TrainConfig, info: DistInfo, init_dir: Path, total_steps: int) -> Trainer:
    from nxtrec.pretrained import load_model_dir

    model, tokenizer = load_model_dir(init_dir, device="cpu", dtype=torch.float32)
    model.train()
    plan = plan_parameters(model, cfg, tokenizer)
    trainable = set(plan.trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    model.to(info.device)
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(list(model.vision_encoder.transformer.resblocks) + list(model.language_decoder.layers))
    if cfg.model.compile:
        for block in list(model.vision_encoder.transformer.resblocks) + list(model.language_decoder.layers):
            block.compile(dynamic=True)
    step_module = TrainStep(model, tokenizer.delimiter_id, tokenizer.pad_id)
    if cfg.train.parallel == "fsdp":
        module = _apply_fsdp(model, step_module, info)
    elif info.enabled and info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(step_module, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    else:
        module = step_module
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in plan.decay], "weight_decay": cfg.optim.weight_decay},
        {"params": [params[n] for n in plan.no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = info.device.type == "cuda" and cfg.train.parallel != "fsdp"
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=fused or None)
    warm = warmup_steps(cfg, total_steps)
    min_ratio = cfg.optim.min_lr / cfg.optim.lr if cfg.optim.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warm, total_steps, min_ratio)
    )
    scaler = torch.amp.GradScaler(info.device.type) if cfg.train.precision == "fp16" else None
    grad_mask = None
    emb = "language_decoder.tok_embeddings.weight"
    if plan.embedding_rows is not None and emb in trainable:
        w = params[emb]
        full = torch.zeros(w.shape[0], 1, device=info.device)
        full[plan.embedding_rows] = 1.0
        grad_mask = full
        if hasattr(w, "device_mesh"):  # FSDP2: this rank's rows of the parameter (sharded on dim 0)
            from torch.distributed.tensor import distribute_tensor

            grad_mask = distribute_tensor(full, w.device_mesh, w.placements).to_local()
    tok_file = init_dir / "tokenizer.model"
    return Trainer(cfg, info, model, tokenizer, tok_file, plan, module, optimizer, scheduler, scaler, params, grad_mask)


def _trainable_state(tr: Trainer) -> dict[str, torch.Tensor]:
    """Full (unsharded) trainable tensors; under FSDP a collective, filled on the main rank."""
    if tr.cfg.train.parallel == "fsdp":
        out = {}
        for n in tr.plan.trainable:
            p = tr.params[n]
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if tr.info.main:
                out[n] = full.detach().cpu().float()
        return out
    return {n: tr.params[n].detach().cpu() for n in tr.plan.trainable}


def _optimizer_state(tr: Trainer):
    if tr.cfg.train.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(tr.module, tr.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return tr.optimizer.state_dict()


def _load_optimizer_state(tr: Trainer, state) -> None:
    if tr.cfg.train.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(tr.module, tr.optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
    else:
        tr.optimizer.load_state_dict(state)


def _gather_objects(obj, info: DistInfo) -> list:
    if info.enabled and info.world > 1:
        out = [None] * info.world
        dist.all_gather_object(out, obj)
        return out
    return [obj]


# ---------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _say(info: DistInfo, *args) -> None:
    if info.main:
        print(*args, file=sys.stderr, flush=True)


def train(cfg: TrainConfig, resume: str | bool | None = None, data=None, info: DistInfo | None = None,
          grad_hook=None) -> dict:
    """Train as configured. `resume`: None = continue from the newest checkpoint of the run
    directory if there is one, True = it must exist, a path = that checkpoint. `data`: a batch source replacing the configured shards (tests, custom pipelines).
    `grad_hook(step, params)`: called with the final gradients of every step (after masking,
    unscaling and clipping, before the update; `step` counts from 1).
    Returns a summary (run directory, steps, last loss, exported model)."""
    own_info = info is None
    info = info or setup_distributed(cfg.run.device)
    try:
        return _train(cfg, resume, data, info, grad_hook)
    finally:
        if own_info and info.initialised_here and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, resume, data, info: DistInfo, grad_hook) -> dict:
    run_dir = Path(cfg.run.dir)
    world, rank = info.world, info.rank
    micro, glob_batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if glob_batch % (micro * world):
        raise TrainConfigError(
            f"train.global_batch_size {glob_batch} is not a multiple of micro_batch_size x processes = {micro} x {world}"
        )
    accum = glob_batch // (micro * world)
    if cfg.train.parallel == "fsdp" and not info.enabled:
        raise TrainConfigError("train.parallel = 'fsdp' needs torchrun (several processes)")
    if data is None and not (cfg.data.datasets or cfg.data.shards):
        raise TrainConfigError("no training data: set data.datasets (names in data.registry) or data.shards (files, globs)")
    if data is None and cfg.data.datasets and not cfg.data.registry:
        from nxtrec.data import default_registry_path

        if not default_registry_path().is_file():
            raise TrainConfigError(
                f"data.datasets {cfg.data.datasets} are registry names, but data.registry is not set and there is "
                f"no {default_registry_path()} (see docs/data.md)"
            )
    if cfg.model.init and not (Path(cfg.model.init) / "config.json").is_file():
        raise TrainConfigError(
            f"model.init = {cfg.model.init!r}: no model directory there (make one with `nxtrec convert llama ...`, "
            "or set model.preset for random weights)"
        )
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    _barrier(info)
    torch.manual_seed(cfg.run.seed)

    init_dir = _init_dir(cfg, run_dir, info)
    from nxtrec.config import ModelConfig

    model_config = ModelConfig.load(init_dir / "config.json")
    source = data if data is not None else make_data(cfg, model_config, info)
    if cfg.train.max_steps > 0:
        total = cfg.train.max_steps
    else:
        per_rank = torch.tensor([float(source.batches_per_epoch())], device=info.device)
        per_rank = int(_all_reduce(per_rank, info, dist.ReduceOp.MIN).item())
        total = cfg.train.epochs * (per_rank // accum)
        if total < 1:
            raise TrainError(f"one epoch gives this process {per_rank} micro-batches of {micro}: no full step of {accum}")
    tr = _build(cfg, info, init_dir, total)

    # resume
    ckpt = find_resume(run_dir, resume)
    start = 0
    if ckpt is not None:
        tensors, state = read_checkpoint(ckpt)
        differ = sorted(set(tr.plan.trainable) ^ set(tensors))
        if differ:
            raise TrainError(f"{ckpt}: its trainable tensors differ from this config's params.trainable (e.g. {differ[0]!r})")
        if state.get("world_size") != world and state.get("data") is not None:
            raise TrainError(f"{ckpt}: saved by {state.get('world_size')} processes; resume with the same number (now {world})")
        with torch.no_grad():
            for n in tr.plan.trainable:
                p = tr.params[n]
                if hasattr(p, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    p.copy_(distribute_tensor(tensors[n].to(p.device, p.dtype), p.device_mesh, p.placements))
                else:
                    p.copy_(tensors[n])
        _load_optimizer_state(tr, state["optimizer"])
        tr.scheduler.load_state_dict(state["scheduler"])
        if tr.scaler is not None and state.get("scaler"):
            tr.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        source.load_state_dict(state["data"][rank])
        start = int(state["step"])
        if info.main:  # checkpoints past the one resumed from belong to an abandoned trajectory
            for s, d in checkpoint_dirs(run_dir):
                if s > start:
                    os.replace(d, d.with_name(f"{d.name}.abandoned-{int(time.time())}"))
                    _say(info, f"note: {d} is newer than the checkpoint resumed from; renamed it *.abandoned-*")
        _barrier(info)
        saved = run_dir / CONFIG_FILE
        if info.main and saved.is_file():
            with contextlib.suppress(NxtrecError):
                changes = diff_configs(load_config(saved), cfg)
                if changes:
                    _say(info, "note: the config differs from the run's saved config:\n  " + "\n  ".join(changes))
        _say(info, f"resuming from {ckpt} at step {start} of {total}" + (" (already complete)" if start >= total else ""))
    if info.main:
        cfg.save(run_dir / CONFIG_FILE)
        n_all = sum(p.numel() for p in tr.params.values())
        n_train = sum(tr.params[n].numel() for n in tr.plan.trainable)
        _say(info, f"model {init_dir}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; "
                   f"{world} process(es) on {info.device.type}, global batch {glob_batch} = {micro} x {accum} accumulation x {world}; "
                   f"{total} steps, warm-up {warmup_steps(cfg, total)}")
    metrics = Metrics(run_dir, start, cfg.log.tensorboard, info.main)

    autocast_dtype = AUTOCAST[cfg.train.precision]
    amp = (
        torch.autocast(info.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    bar = None
    lines = info.main and cfg.log.progress and not sys.stderr.isatty()  # e.g. a Slurm log: no \r bar
    if info.main and cfg.log.progress and not lines:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    last = {}
    step = start
    t_start = time.perf_counter()
    try:
        while step < total:
            t0 = time.perf_counter()
            batches = [source.next_batch() for _ in range(accum)]
            texts = [
                _text_batch(tr, labels, text_rng(cfg.run.seed, step, k * world + rank), model_config)
                for k, (_, labels) in enumerate(batches)
            ]
            stats = _forward_backward(tr, batches, texts, amp)
            if cfg.loss.reduction == "tokens":
                loss = float(stats[0] / stats[1]) if stats[1] > 0 else 0.0
            else:
                loss = float(stats[2] / (accum * world))
            if not math.isfinite(loss):
                good = checkpoint_dirs(run_dir)
                where = f"the last good checkpoint is {good[-1][1]}" if good else "no checkpoint was written yet"
                raise TrainingDiverged(
                    f"step {step + 1}: the loss is {loss}; stopped before applying this update ({where}; "
                    f"resume from it with a lower optim.lr or with optim.grad_clip)"
                )
            lr = tr.optimizer.param_groups[0]["lr"]
            grad_norm = _update(tr, step + 1, grad_hook)
            step += 1
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)
            dt = time.perf_counter() - t0
            images = float(stats[3])
            last = {"step": step, "epoch": getattr(source, "epoch", 0), "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "images_per_s": images / dt, "step_time": dt, "targets": int(stats[1]), "padded_tokens": int(stats[4])}
            if tr.scaler is not None:
                last["scale"] = float(tr.scaler.get_scale())
            if step % cfg.log.every == 0 or step == total:
                metrics.write(last)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images / dt:.1f}", refresh=False)
                bar.update(1)
            elif lines and (step % cfg.log.every == 0 or step == total):
                elapsed = time.perf_counter() - t_start
                eta = elapsed / (step - start) * (total - step)
                _say(info, f"step {step}/{total}  loss {loss:.4f}  lr {lr:.3e}  {images / dt:.1f} img/s  "
                           f"elapsed {_hms(elapsed)}  eta {_hms(eta)}")
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == total):
                metrics.write(evaluate_during_training(tr, step))
            if step % cfg.checkpoint.every == 0 or step == total:
                save_checkpoint(tr, run_dir, step, source)
            if cfg.run.kill_after_steps and step == cfg.run.kill_after_steps:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # testing: die like a preempted job
    finally:
        if bar is not None:
            bar.close()
        metrics.close()

    final = None
    if cfg.checkpoint.export:
        final = export_model(tr, run_dir / "final", step)
        _say(info, f"exported {final}")
    _barrier(info)
    return {"run_dir": str(run_dir), "step": step, "total_steps": total, "loss": last.get("loss"),
            "final": str(final) if final else None, "checkpoint": str(checkpoint_dirs(run_dir)[-1][1]) if checkpoint_dirs(run_dir) else None}


def evaluate_during_training(tr: Trainer, step: int) -> dict:
    """R/P/F1 of the current weights on the first `eval.images` validation images (main rank
    only; the other ranks wait at their next collective)."""
    from nxtrec.data import build_loader
    from nxtrec.evaluate import predict_records, score
    from nxtrec.recognizer import Recognizer

    cfg = tr.cfg.eval
    if not cfg.data:
        raise TrainConfigError("eval.every is set but eval.data names no validation shards")
    if tr.cfg.train.parallel == "fsdp":
        raise TrainConfigError("eval.every needs whole weights on the main rank: use train.parallel = \"ddp\"")
    if not tr.info.main:
        return {}
    rec = Recognizer(tr.model, tr.tokenizer, tr.info.device)
    loader = build_loader(cfg.data, tr.cfg.data.registry or None, batch_size=cfg.batch_size,
                          image_size=tr.model.config.encoder.image_size, num_workers=0, rank=0, world_size=1)
    with torch.inference_mode():
        records = predict_records(rec, loader, max(cfg.top_k), limit=cfg.images, progress=False)
    tr.model.train()
    record = {"step": step}
    for k, s in score(records, sorted(cfg.top_k)).items():
        record.update({f"eval_R@{k}": s.recall, f"eval_P@{k}": s.precision, f"eval_F1@{k}": s.f1})
    _say(tr.info, "eval at step {}: {}".format(step, "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")))
    return record


def _text_batch(tr: Trainer, labels, rng: random.Random, model_config) -> TextBatch:
    cfg = tr.cfg
    template = rng.choice(cfg.data.templates)
    return make_text_batch(tr.tokenizer, labels, template, rng, model_config.encoder.num_patches, cfg.data.max_seq_len,
                           cfg.data.padding, cfg.loss.span, model_config.image_token)


def _forward_backward(tr: Trainer, batches, texts: list[TextBatch], amp) -> torch.Tensor:
    """Forward and backward of the step's micro-batches (gradients synchronised on the last
    one). Returns, summed over processes: loss sum, target tokens, sum of micro-batch mean
    losses, images, padded text positions."""
    info, cfg = tr.info, tr.cfg
    accum = len(batches)
    count = _all_reduce(torch.tensor([float(sum(t.n_targets for t in texts))], device=info.device), info)
    global_count = float(count.item())
    stats = torch.zeros(5, dtype=torch.float64, device=info.device)
    for k, ((pixels, _), text) in enumerate(zip(batches, texts)):
        sync = k == accum - 1
        ctx = tr.module.no_sync() if (not sync and hasattr(tr.module, "no_sync")) else contextlib.nullcontext()
        if hasattr(tr.module, "set_requires_gradient_sync"):  # FSDP2
            tr.module.set_requires_gradient_sync(sync)
        with ctx:
            with amp:
                loss_sum, n = tr.module(pixels.to(info.device, non_blocking=True), text.tokens.to(info.device),
                                        text.targets.to(info.device), text.answer_index)
            # DDP / FSDP average gradients over processes, hence the factor `world` for tokens
            if cfg.loss.reduction == "tokens":
                weight = info.world / global_count if global_count > 0 else 0.0
            else:
                weight = 1.0 / (max(text.n_targets, 1) * accum)
            scaled = loss_sum * weight
            (tr.scaler.scale(scaled) if tr.scaler is not None else scaled).backward()
        ls = loss_sum.detach().double()
        stats += torch.stack([ls, n.detach().double(), ls / max(text.n_targets, 1),
                              ls.new_tensor(float(pixels.shape[0])), ls.new_tensor(float(text.tokens.numel()))])
    return _all_reduce(stats, info)


def _update(tr: Trainer, step: int, grad_hook) -> float:
    """Mask the embedding gradient, unscale (fp16), clip, step optimizer and schedule.
    Returns the gradient norm before clipping."""
    if tr.grad_mask is not None:
        g = tr.params["language_decoder.tok_embeddings.weight"].grad
        if g is not None:
            (g.to_local() if hasattr(g, "to_local") else g).mul_(tr.grad_mask)
    if tr.scaler is not None:
        tr.scaler.unscale_(tr.optimizer)
    clip = tr.cfg.optim.grad_clip if tr.cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([tr.params[n] for n in tr.plan.trainable], clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    if grad_hook is not None:
        grad_hook(step, tr.params)
    if tr.scaler is not None:
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        tr.optimizer.step()
    tr.scheduler.step()
    tr.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def save_checkpoint(tr: Trainer, run_dir: Path, step: int, source) -> Path | None:
    """Collective (every rank calls it): gathers data positions (and FSDP shards); the main
    rank writes."""
    tensors = _trainable_state(tr)
    optim_state = _optimizer_state(tr)
    data_states = _gather_objects(source.state_dict(), tr.info)
    path = None
    if tr.info.main:
        state = {
            "step": step,
            "world_size": tr.info.world,
            "optimizer": optim_state,
            "scheduler": tr.scheduler.state_dict(),
            "scaler": tr.scaler.state_dict() if tr.scaler is not None else {},
            "rng": {"torch": torch.get_rng_state()},
            "data": data_states,
        }
        path = write_checkpoint(run_dir, step, tensors, state, tr.cfg.checkpoint.keep_last, tr.cfg.checkpoint.keep_every)
    _barrier(tr.info)
    return path


class _Exported:
    """What `save_model_dir` needs of a model: `.config` and `.state_dict()`."""

    def __init__(self, config, state):
        self.config, self._state = config, state

    def state_dict(self):
        return self._state


def export_model(tr: Trainer, out: Path, step: int) -> Path | None:
    """A model directory (`config.json`, `model.safetensors`, `tokenizer.model`) that
    `nxtrec predict --model` loads. Collective under FSDP; the main rank writes."""
    import copy

    from nxtrec.pretrained import save_model_dir

    if tr.cfg.train.parallel == "fsdp":
        state = {}
        for n, t in tr.model.state_dict().items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            if tr.info.main:
                state[n] = full.detach().cpu()
    else:
        state = {n: t.detach().cpu() for n, t in tr.model.state_dict().items()}
    if not tr.info.main:
        return None
    config = copy.deepcopy(tr.model.config)
    config.description = f"trained with nxtrec train: {tr.cfg.run.dir}, step {step}"
    return save_model_dir(_Exported(config, state), tr.tokenizer_file, out)
