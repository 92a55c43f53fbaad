"""The reward interface: a batched scorer of images in [0, 1] against prompts, without
gradients (`Reward.score`) or, for rewards that are torch from the pixels to the score,
with the autograd graph kept back to the images (`Reward.score_with_grad`, for reward
back-propagation: zoo/draft.py)."""

from __future__ import annotations

import abc

import torch


class NotDifferentiable(TypeError):
    """`score_with_grad` was called on a reward whose score has no gradient."""


class Reward(abc.ABC):
    """Scores images against prompts; subclasses implement `_score` and `_modules`.

    `score` checks the inputs, moves them to the reward's device, runs `_score` without
    gradients, and returns float32 scores (B,) on that device. `score_with_grad` does the
    same with gradients, for rewards that declare `differentiable`. Both count their work
    because the benchmark reports reward-model calls as a budget: `calls` is the number of
    batched model evaluations served, `images_scored` the number of images they covered.
    """

    name: str
    differentiable: bool = False
    """Whether `_score` is torch all the way from the pixels to the score, so that its
    gradient with respect to the images exists (`score_with_grad`): True for the CLIP-,
    BLIP- and MLP-based models, False for JPEG sizes, pixel rules and remote servers."""

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

    def _check_inputs(self, images: torch.Tensor, prompts: list[str]) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) float32 scores on `self.device` for images (B, 3, H, W) in [0, 1]."""
        self._check_inputs(images, prompts)
        with torch.no_grad():
            # Detached: an input that requires grad would otherwise skip preprocessing's
            # 8-bit rounding (zoo/preprocess.py), which this path always applies.
            scores = self._score(images.detach().to(self.device, torch.float32), list(prompts))
        self._calls += 1
        self._images_scored += images.shape[0]
        return scores.to(device=self.device, dtype=torch.float32).reshape(images.shape[0])

    def score_with_grad(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) scores on `self.device` that keep the autograd graph back to `images`
        (B, 3, H, W) in [0, 1]; the reward's own parameters get no gradient. Images that
        require grad are preprocessed without the 8-bit rounding that `score` applies (its
        gradient is zero almost everywhere; zoo/preprocess.py), so such a score may
        differ from `score`'s by what half an 8-bit level moves it. float64 images are scored in float64 (with the reward moved `to` it),
        for gradient checks; any other dtype in float32. Raises NotDifferentiable, naming
        the reward, when it does not declare `differentiable`."""
        if not self.differentiable:
            raise NotDifferentiable(
                f"{self.name} is not differentiable: its score has no gradient with respect to the "
                "image; train with a differentiable reward (one whose class sets `differentiable = True`)"
            )
        self._check_inputs(images, prompts)
        for module in self._modules():
            module.requires_grad_(False)
        dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
        scores = self._score(images.to(self.device, dtype), list(prompts))
        self._calls += 1
        self._images_scored += images.shape[0]
        return scores.to(device=self.device, dtype=dtype).reshape(images.shape[0])

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
    over two models is two reward-model calls in the budget. It is differentiable when
    every member is.
    """

    def __init__(self, members: list[tuple[Reward, float]]):
        if not members:
            raise ValueError("WeightedSum needs at least one reward")
        first = members[0][0]
        super().__init__(first.device, first.dtype)
        self.members = members
        self.name = ",".join(f"{reward.name}:{weight:g}" for reward, weight in members)
        self.differentiable = all(reward.differentiable for reward, _ in members)

    @property
    def calls(self) -> int:
        return sum(reward.calls for reward, _ in self.members)

    @property
    def images_scored(self) -> int:
        return sum(reward.images_scored for reward, _ in self.members)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # `score` runs this without gradients, `score_with_grad` with them: the members follow.
        total = torch.zeros(images.shape[0], device=self.device, dtype=images.dtype)
        for reward, weight in self.members:
            score = reward.score_with_grad if torch.is_grad_enabled() else reward.score
            total = total + weight * score(images, prompts).to(self.device)
        return total

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "WeightedSum":
        super().to(device, dtype)
        for reward, _ in self.members:
            reward.to(device, dtype)
        return self
