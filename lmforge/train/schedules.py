"""Learning-rate schedules as pure functions of the step: resume needs no scheduler state."""

from __future__ import annotations

import math

from lmforge.config import OptimCfg


def lr_at(step: int, cfg: OptimCfg, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine/linear/constant decay
    to `lr * min_lr_ratio` at `max_steps`. Warmup takes at most half the run, so a run that a
    time budget made shorter than its warmup still anneals."""
    warmup = min(cfg.warmup_steps, max_steps // 2)
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if cfg.schedule == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        frac = 1.0 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * frac)
