"""Learning-rate schedule: linear warm-up, then cosine to `min_lr`."""

from __future__ import annotations

import math

from nxtrec.training.config import TrainConfig


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
