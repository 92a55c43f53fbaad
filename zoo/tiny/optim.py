"""The two training-loop steps every stage of the tiny world's build shares: linear learning-
rate warm-up and an exponential moving average of the weights."""

from __future__ import annotations

import torch


def warmup_lr(optimizer: torch.optim.Optimizer, step: int, base_lr: float, warmup: int = 100) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * min(1.0, (step + 1) / warmup)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
