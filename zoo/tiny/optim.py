"""The two training-loop steps every stage of the tiny world's build shares: linear learning-
rate warm-up and an exponential moving average of the weights (the benchmark's EMA of the
trained LoRA, `benchmarks.ema`, moves its tensors with the same step)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def warmup_lr(optimizer: torch.optim.Optimizer, step: int, base_lr: float, warmup: int = 100) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * min(1.0, (step + 1) / warmup)


def ema_update_tensors(ema: Iterable[torch.Tensor], weights: Iterable[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, in place, pairing the tensors in order."""
    with torch.no_grad():
        for e, p in zip(ema, weights, strict=True):
            e.lerp_(p, 1 - decay)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_update_tensors(ema.parameters(), model.parameters(), decay)
