"""Rewards that stand in for a reward model: smooth, cheap functions of the pixels."""

from __future__ import annotations

import threading

import torch

from rewards.base import Reward


class Brightness(Reward):
    """Mean brightness (smooth, unlike JPEG sizes, and differentiable), recording the
    thread each batch is scored on; raises on call `fail_on_call` (1-based) if given."""

    name = "brightness"
    differentiable = True

    def __init__(self, fail_on_call: int | None = None):
        super().__init__()
        self.threads: list[str] = []
        self.fail_on_call = fail_on_call

    def _score(self, images, prompts):
        self.threads.append(threading.current_thread().name)
        if self.fail_on_call == len(self.threads):
            raise RuntimeError("reward server went away")
        return images.mean(dim=(1, 2, 3))


class DistanceToTarget(Reward):
    """Minus the mean squared distance of each image to a fixed target image: smooth and
    nonlinear in the pixels, differentiable; raises on the calls `fail_on_calls` (1-based)."""

    name = "distance"
    differentiable = True

    def __init__(self, target: torch.Tensor, fail_on_calls: tuple[int, ...] = ()):
        super().__init__(dtype=target.dtype)
        self.target = target
        self.fail_on_calls = fail_on_calls
        self.served = 0

    def _score(self, images, prompts):
        self.served += 1
        if self.served in self.fail_on_calls:
            raise RuntimeError("scorer broke")
        return -((images - self.target.to(images.dtype)) ** 2).mean(dim=(1, 2, 3))
