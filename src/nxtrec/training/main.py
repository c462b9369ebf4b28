"""Training (docs/design.md#training-sequence-and-loss): one process on a CPU or GPU, `torchrun` on a node, or
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
with `torch.load(weights_only=True)`; each is written to a temporary folder and renamed."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from nxtrec.distributed import RankInfo, setup_distributed
from nxtrec.errors import NxtrecError
from nxtrec.model.config import ModelConfig
from nxtrec.training.checkpoint import (
    checkpoint_dirs,
    find_resume,
    read_checkpoint,
    read_newest_readable,
)
from nxtrec.training.config import (
    TrainConfig,
    TrainConfigError,
    diff_configs,
    load_config,
)
from nxtrec.training.data import make_data
from nxtrec.training.errors import TrainError, TrainingDiverged
from nxtrec.training.logger import TrainMetrics, TrainProgress, say
from nxtrec.training.scheduler import warmup_steps
from nxtrec.training.text import make_text_batch, text_rng
from nxtrec.training.trainer import (
    AUTOCAST,
    Trainer,
    apply_update,
    build_trainer,
    export_model,
    forward_backward,
    load_trainer_state,
    resolve_init_dir,
    save_checkpoint,
)

CONFIG_FILE = "config.toml"


def train(cfg: TrainConfig, resume: str | bool | None = None, data=None, info: RankInfo | None = None,
          grad_hook=None) -> dict:
    """Train as configured. `resume`: None = continue from the newest checkpoint of the run
    directory if there is one, True = it must exist, a path = that checkpoint. `data`: a batch
    source replacing the configured shards (tests, custom pipelines).
    `grad_hook(step, params)`: called with the final gradients of every step (after masking,
    unscaling and clipping, before the update; `step` counts from 1).
    Returns a summary (run directory, steps, last loss, exported model)."""
    own_info = info is None
    if own_info and cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("run.device = 'cuda' but no CUDA device is visible")
    info = info or setup_distributed(cfg.run.device)
    try:
        return _train(cfg, resume, data, info, grad_hook)
    finally:
        if own_info:
            info.close()


def _train(cfg: TrainConfig, resume, data, info: RankInfo, grad_hook) -> dict:
    run_dir = Path(cfg.run.dir)
    accum = accumulation_steps(cfg, info)
    check_inputs(cfg, info, data)
    prepare_run_dir(run_dir, info)
    torch.manual_seed(cfg.run.seed)
    init_dir = resolve_init_dir(cfg, run_dir, info)
    model_config = ModelConfig.load(init_dir / "config.json")
    source = data if data is not None else make_data(cfg, model_config, info)
    total = total_steps(cfg, source, accum, info)
    tr = build_trainer(cfg, info, init_dir, total)
    start = resume_run(tr, run_dir, resume, source, total)
    if info.main:
        cfg.save(run_dir / CONFIG_FILE)
        describe_run(tr, init_dir, total, accum)
    step, last = run_steps(tr, source, model_config, run_dir, start, total, accum, grad_hook)
    final = None
    if cfg.checkpoint.export:
        final = export_model(tr, run_dir / "final", step)
        say(info, f"exported {final}")
    info.barrier()
    checkpoints = checkpoint_dirs(run_dir)
    return {"run_dir": str(run_dir), "step": step, "total_steps": total, "loss": last.get("loss"),
            "final": str(final) if final else None, "checkpoint": str(checkpoints[-1][1]) if checkpoints else None}


# ---------------------------------------------------------------------------------------
# before the first step
# ---------------------------------------------------------------------------------------


def accumulation_steps(cfg: TrainConfig, info: RankInfo) -> int:
    """Micro-batches per process per step: global batch = micro batch x accumulation x processes."""
    micro, glob_batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if glob_batch % (micro * info.world):
        raise TrainConfigError(
            f"train.global_batch_size {glob_batch} is not a multiple of micro_batch_size x processes = {micro} x {info.world}"
        )
    return glob_batch // (micro * info.world)


def check_inputs(cfg: TrainConfig, info: RankInfo, data) -> None:
    """Fail before any work when the config cannot run: data, model and parallelism."""
    if cfg.train.parallel == "fsdp" and not info.enabled:
        raise TrainConfigError("train.parallel = 'fsdp' needs torchrun (several processes)")
    if data is None and not (cfg.data.datasets or cfg.data.shards):
        raise TrainConfigError("no training data: set data.datasets (names in data.registry) or data.shards (files, globs)")
    if data is None and cfg.data.datasets and not cfg.data.registry:
        from nxtrec.data.registry import default_registry_path

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


def prepare_run_dir(run_dir: Path, info: RankInfo) -> None:
    """Create the run directory; remove temporary folders of checkpoints that a killed run
    did not finish writing."""
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in (run_dir / "checkpoints").glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    info.barrier()


def total_steps(cfg: TrainConfig, source, accum: int, info: RankInfo) -> int:
    """`train.max_steps`, or the epochs' worth of full steps of the process with the fewest batches."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_rank = torch.tensor([float(source.batches_per_epoch())], device=info.device)
    per_rank = int(info.all_reduce(per_rank, "min").item())
    total = cfg.train.epochs * (per_rank // accum)
    if total < 1:
        raise TrainError(
            f"one epoch gives this process {per_rank} micro-batches of {cfg.train.micro_batch_size}: no full step of {accum}"
        )
    return total


def resume_run(tr: Trainer, run_dir: Path, resume, source, total: int) -> int:
    """Load the checkpoint to resume from (if any) into the trainer and the data stream.
    Returns the step to start from."""
    info = tr.info
    ckpt = find_resume(run_dir, resume)
    if ckpt is None:
        return 0
    if isinstance(resume, (str, Path)):  # the checkpoint asked for, or an error
        tensors, state = read_checkpoint(ckpt)
    else:
        ckpt, tensors, state, unreadable = read_newest_readable(run_dir)
        for problem in unreadable:
            say(info, f"warning: {problem}; falling back to the checkpoint before it")
    load_trainer_state(tr, ckpt, tensors, state)
    source.load_state_dict(state["data"][info.rank])
    start = int(state["step"])
    if info.main:  # checkpoints past the one resumed from belong to an abandoned trajectory
        for s, d in checkpoint_dirs(run_dir):
            if s > start:
                os.replace(d, d.with_name(f"{d.name}.abandoned-{int(time.time())}"))
                say(info, f"note: {d} is newer than the checkpoint resumed from; renamed it *.abandoned-*")
    info.barrier()
    saved = run_dir / CONFIG_FILE
    if info.main and saved.is_file():
        with contextlib.suppress(NxtrecError):
            changes = diff_configs(load_config(saved), tr.cfg)
            if changes:
                say(info, "note: the config differs from the run's saved config:\n  " + "\n  ".join(changes))
    say(info, f"resuming from {ckpt} at step {start} of {total}" + (" (already complete)" if start >= total else ""))
    return start


def describe_run(tr: Trainer, init_dir: Path, total: int, accum: int) -> None:
    cfg, info = tr.cfg, tr.info
    n_all = sum(p.numel() for p in tr.params.values())
    n_train = sum(tr.params[n].numel() for n in tr.plan.trainable)
    say(info, f"model {init_dir}: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trainable; "
              f"{info.world} process(es) on {info.device_type}, global batch {cfg.train.global_batch_size} = "
              f"{cfg.train.micro_batch_size} x {accum} accumulation x {info.world}; "
              f"{total} steps, warm-up {warmup_steps(cfg, total)}")


# ---------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------


def run_steps(tr: Trainer, source, model_config, run_dir: Path, start: int, total: int, accum: int,
              grad_hook) -> tuple[int, dict]:
    """Steps `start + 1 .. total`, each followed by its logging, evaluation and checkpoint.
    Returns the last step and its record."""
    cfg, info = tr.cfg, tr.info
    metrics = TrainMetrics(run_dir, start, cfg.log.tensorboard, info.main)
    progress = TrainProgress(info, cfg.log, start, total)
    autocast_dtype = AUTOCAST[cfg.train.precision]
    amp = torch.autocast(info.device_type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    last: dict = {}
    step = start
    try:
        while step < total:
            last = train_step(tr, source, model_config, step, accum, amp, grad_hook, run_dir)
            step = last["step"]
            progress.update(last)
            after_step(tr, source, metrics, last, run_dir, total)
    finally:
        progress.close()
        metrics.close()
    return step, last


def train_step(tr: Trainer, source, model_config, step: int, accum: int, amp, grad_hook, run_dir: Path) -> dict:
    """One optimizer step (the `step + 1`-th): micro-batches, their text, forward/backward,
    update. Returns the step's metrics record."""
    cfg, info = tr.cfg, tr.info
    t0 = time.perf_counter()
    batches = [source.next_batch() for _ in range(accum)]
    texts = []
    for k, (_, labels) in enumerate(batches):
        rng = text_rng(cfg.run.seed, step, k * info.world + info.rank)
        template = rng.choice(cfg.data.templates)
        texts.append(make_text_batch(tr.tokenizer, labels, template, rng, model_config.encoder.num_patches,
                                     cfg.data.max_seq_len, cfg.data.padding, cfg.loss.span, model_config.image_token))
    stats = forward_backward(tr, batches, texts, amp)
    if cfg.loss.reduction == "tokens":
        loss = float(stats[0] / stats[1]) if stats[1] > 0 else 0.0
    else:
        loss = float(stats[2] / (accum * info.world))
    if not math.isfinite(loss):
        good = checkpoint_dirs(run_dir)
        where = f"the last good checkpoint is {good[-1][1]}" if good else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"step {step + 1}: the loss is {loss}; stopped before applying this update ({where}; "
            f"resume from it with a lower optim.lr or with optim.grad_clip)"
        )
    lr = tr.optimizer.param_groups[0]["lr"]
    grad_norm = apply_update(tr, step + 1, grad_hook)
    if info.device_type == "cuda":
        torch.cuda.synchronize(info.device)
    dt = time.perf_counter() - t0
    record = {"step": step + 1, "epoch": getattr(source, "epoch", 0), "loss": loss, "lr": lr, "grad_norm": grad_norm,
              "images_per_s": float(stats[3]) / dt, "step_time": dt, "targets": int(stats[1]),
              "padded_tokens": int(stats[4])}
    if tr.scaler is not None:
        record["scale"] = float(tr.scaler.get_scale())
    return record


def after_step(tr: Trainer, source, metrics: TrainMetrics, record: dict, run_dir: Path, total: int) -> None:
    """What follows a step on its schedule: the metrics record, evaluation, the checkpoint."""
    cfg, step = tr.cfg, record["step"]
    if step % cfg.log.every == 0 or step == total:
        metrics.write(with_skipped_counts(record, source, tr.info))
    if cfg.eval.every and (step % cfg.eval.every == 0 or step == total):
        metrics.write(evaluate_during_training(tr, step))
    if step % cfg.checkpoint.every == 0 or step == total:
        save_checkpoint(tr, run_dir, step, source)
    if cfg.run.kill_after_steps and step == cfg.run.kill_after_steps:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # testing: die like a preempted job


def with_skipped_counts(record: dict, source, info: RankInfo) -> dict:
    """The record plus `skipped`: samples the data loaders of all ranks skipped so far, by
    reason (collective: every rank logs the same steps)."""
    if not hasattr(source, "skipped_counts"):
        return record  # a custom batch source
    total: Counter = Counter()
    for counts in info.gather(source.skipped_counts()):
        total.update(counts)
    return {**record, "skipped": dict(total)}


def evaluate_during_training(tr: Trainer, step: int) -> dict:
    """R/P/F1 of the current weights on the first `eval.images` validation images (main rank
    only; the other ranks wait at their next collective)."""
    from nxtrec.data.loader import build_loader
    from nxtrec.evaluation.evaluate import predict_records, score
    from nxtrec.inference.engine import DecodeOptions
    from nxtrec.inference.recognizer import Recognizer

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
        records = predict_records(rec, loader, DecodeOptions(top_k=max(cfg.top_k)), limit=cfg.images, progress=False)
    tr.model.train()
    record = {"step": step}
    for k, s in score(records, sorted(cfg.top_k)).items():
        record.update({f"eval_R@{k}": s.recall, f"eval_P@{k}": s.precision, f"eval_F1@{k}": s.f1})
    say(tr.info, "eval at step {}: {}".format(step, "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")))
    return record
