"""The reward interface: a batched, no-grad scorer of images in [0, 1] against prompts."""

from __future__ import annotations

import abc

import torch


class Reward(abc.ABC):
    """Scores images against prompts; subclasses implement `_score` and `_modules`.

    `score` checks the inputs, moves them to the reward's device, runs `_score` without
    gradients, and returns float32 scores (B,) on that device. It counts its work because
    the benchmark reports reward-model calls as a budget: `calls` is the number of batched
    model evaluations served, `images_scored` the number of images they covered.
    """

    name: str

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self._calls = 0
        self._images_scored = 0

    @property
    def calls(self) -> int:
        """Batched model evaluations served so far."""
        return self._calls

    @property
    def images_scored(self) -> int:
        """Images scored so far."""
        return self._images_scored

    @abc.abstractmethod
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images: (B, 3, H, W) float32 in [0, 1] on `self.device`. Returns (B,)."""

    def _modules(self) -> list[torch.nn.Module]:
        """The torch modules that `to` moves; rewards without a network return []."""
        return []

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) float32 scores on `self.device` for images (B, 3, H, W) in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        with torch.no_grad():
            scores = self._score(images.to(self.device, torch.float32), list(prompts))
        self._calls += 1
        self._images_scored += images.shape[0]
        return scores.to(device=self.device, dtype=torch.float32).reshape(images.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Reward":
        """Moves the networks (in place) and returns self, like `nn.Module.to`."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for module in self._modules():
            module.to(device=self.device, dtype=self.dtype)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


class WeightedSum(Reward):
    """sum_i w_i * r_i(images, prompts), as flow_grpo's multi-reward `--reward a:1,b:0.5`.

    Its `calls` and `images_scored` are the sums over its members: one weighted-sum call
    over two models is two reward-model calls in the budget.
    """

    def __init__(self, members: list[tuple[Reward, float]]):
        if not members:
            raise ValueError("WeightedSum needs at least one reward")
        first = members[0][0]
        super().__init__(first.device, first.dtype)
        self.members = members
        self.name = ",".join(f"{reward.name}:{weight:g}" for reward, weight in members)

    @property
    def calls(self) -> int:
        return sum(reward.calls for reward, _ in self.members)

    @property
    def images_scored(self) -> int:
        return sum(reward.images_scored for reward, _ in self.members)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = torch.zeros(images.shape[0], device=self.device, dtype=torch.float32)
        for reward, weight in self.members:
            total += weight * reward.score(images, prompts).to(self.device)
        return total

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "WeightedSum":
        super().to(device, dtype)
        for reward, _ in self.members:
            reward.to(device, dtype)
        return self
