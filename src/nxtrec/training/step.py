"""The training forward: images + text -> the summed cross-entropy of the target tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nxtrec.model.masks import training_mask
from nxtrec.model.network import NxtpModel
from nxtrec.training.text import IGNORE


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
        sel = targets != IGNORE  # [B, T-1]: logits at text position j predict token j+1
        select = torch.zeros(b, p + t, dtype=torch.bool, device=sel.device)
        select[:, p : p + t - 1] = sel
        logits, _ = dec(h, mask, select=select)
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
