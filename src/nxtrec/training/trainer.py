"""The trainer's state: the model, its parameter plan, the wrapped module (plain, DDP or
FSDP2), optimizer, schedule and scaler; building it, one optimizer step (forward/backward of
the micro-batches, then the update), checkpointing and exporting it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from nxtrec.distributed import RankInfo
from nxtrec.model.network import NxtpModel
from nxtrec.training.checkpoint import write_checkpoint
from nxtrec.training.config import TrainConfig, TrainConfigError
from nxtrec.training.errors import TrainError
from nxtrec.training.fsdp import apply_fsdp
from nxtrec.training.params import ParamPlan, plan_parameters
from nxtrec.training.scheduler import lr_factor, warmup_steps
from nxtrec.training.step import TrainStep, enable_activation_checkpointing
from nxtrec.training.text import TextBatch

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_init_dir(cfg: TrainConfig, run_dir: Path, info: RankInfo) -> Path:
    """The model directory training starts from: `model.init`, or a random initialisation
    of `model.preset` written once into RUN_DIR/init-model (by the main rank)."""
    if cfg.model.init and cfg.model.preset:
        raise TrainConfigError("set either model.init (a model directory) or model.preset, not both")
    if cfg.model.init:
        return Path(cfg.model.init)
    if not cfg.model.preset:
        raise TrainConfigError("set model.init (a model directory, e.g. from `nxtrec convert llama`) or model.preset")
    from nxtrec.model.presets import init_model

    out = run_dir / "init-model"
    if info.main and not (out / "model.safetensors").is_file():
        init_model(cfg.model.preset, out, tokenizer=cfg.model.tokenizer or None, seed=cfg.run.seed)
    info.barrier()
    return out


@dataclass
class Trainer:
    cfg: TrainConfig
    info: RankInfo
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


def build_trainer(cfg: TrainConfig, info: RankInfo, init_dir: Path, total_steps: int) -> Trainer:
    from nxtrec.model.directory import load_model_dir

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
        module = apply_fsdp(model, step_module)
    elif info.enabled and info.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(step_module, device_ids=[torch.device(info.device).index] if info.device_type == "cuda" else None)
    else:
        module = step_module
    params = dict(model.named_parameters())
    groups = [
        {"params": [params[n] for n in plan.decay], "weight_decay": cfg.optim.weight_decay},
        {"params": [params[n] for n in plan.no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    fused = info.device_type == "cuda" and cfg.train.parallel != "fsdp"
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=fused or None)
    warm = warmup_steps(cfg, total_steps)
    min_ratio = cfg.optim.min_lr / cfg.optim.lr if cfg.optim.lr > 0 else 0.0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warm, total_steps, min_ratio)
    )
    scaler = torch.amp.GradScaler(info.device_type) if cfg.train.precision == "fp16" else None
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


def forward_backward(tr: Trainer, batches, texts: list[TextBatch], amp) -> torch.Tensor:
    """Forward and backward of the step's micro-batches (gradients synchronised on the last
    one). Returns, summed over processes: loss sum, target tokens, sum of micro-batch mean
    losses, images, padded text positions."""
    info, cfg = tr.info, tr.cfg
    accum = len(batches)
    count = info.all_reduce(torch.tensor([float(sum(t.n_targets for t in texts))], device=info.device))
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
    return info.all_reduce(stats)


def apply_update(tr: Trainer, step: int, grad_hook) -> float:
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


def trainable_state(tr: Trainer) -> dict[str, torch.Tensor]:
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


def optimizer_state(tr: Trainer):
    if tr.cfg.train.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(tr.module, tr.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return tr.optimizer.state_dict()


def load_trainer_state(tr: Trainer, ckpt: Path, tensors: dict, state: dict) -> None:
    """Trainable tensors, optimizer, schedule, scaler and RNG from a checkpoint."""
    differ = sorted(set(tr.plan.trainable) ^ set(tensors))
    if differ:
        raise TrainError(f"{ckpt}: its trainable tensors differ from this config's params.trainable (e.g. {differ[0]!r})")
    if state.get("world_size") != tr.info.world and state.get("data") is not None:
        raise TrainError(f"{ckpt}: saved by {state.get('world_size')} processes; resume with the same number (now {tr.info.world})")
    with torch.no_grad():
        for n in tr.plan.trainable:
            p = tr.params[n]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                p.copy_(distribute_tensor(tensors[n].to(p.device, p.dtype), p.device_mesh, p.placements))
            else:
                p.copy_(tensors[n])
    load_optimizer_state(tr, state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    if tr.scaler is not None and state.get("scaler"):
        tr.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])


def load_optimizer_state(tr: Trainer, state) -> None:
    if tr.cfg.train.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(tr.module, tr.optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
    else:
        tr.optimizer.load_state_dict(state)


def save_checkpoint(tr: Trainer, run_dir: Path, step: int, source) -> Path | None:
    """Collective (every rank calls it): gathers data positions (and FSDP shards); the main
    rank writes."""
    tensors = trainable_state(tr)
    optim_state = optimizer_state(tr)
    data_states = tr.info.gather(source.state_dict())
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
    tr.info.barrier()
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

    from nxtrec.model.directory import save_model_dir

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
