"""One optimizer step: the forward/backward of the micro-batches and the update."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from nxtrec.model.masks import training_mask
from nxtrec.model.network import NxtpModel
from nxtrec.training.distributed import all_reduce
from nxtrec.training.text import IGNORE, TextBatch

if TYPE_CHECKING:
    from nxtrec.training.trainer import Trainer


AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def forward_backward(tr: Trainer, batches, texts: list[TextBatch], amp) -> torch.Tensor:
    """Forward and backward of the step's micro-batches (gradients synchronised on the last
    one). Returns, summed over processes: loss sum, target tokens, sum of micro-batch mean
    losses, images, padded text positions."""
    info, cfg = tr.info, tr.cfg
    accum = len(batches)
    count = all_reduce(torch.tensor([float(sum(t.n_targets for t in texts))], device=info.device), info)
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
    return all_reduce(stats, info)


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
