"""The one interface every alignment algorithm implements.

An algorithm is tensor math only: it never sees the model, accelerate, files or loggers.
The runner (benchmarks/) drives it each epoch:

1. samples `needs.group_size` trajectories per prompt as `needs` asks (shared x_T or
   not, x̂0 recorded or not, reference log-probs or not);
2. decodes and scores the images that `reward_steps` names (terminal images by default);
3. `shape_rewards` turns those scores into per-trajectory returns, locally;
4. gathers prompts and returns from every process and calls `advantages` on the global
   batch (identical on every process), then keeps its own slice;
5. for each minibatch and chunk of steps, recomputes log-probs under the current
   weights and calls `loss`, which returns (loss, metrics).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch

from zoo.trajectory import Trajectory


@dataclass(frozen=True)
class SamplingNeeds:
    group_size: int
    """Trajectories sampled per prompt: 1 (DDPO), 2 (pair methods)."""
    shared_noise: bool
    """Whether the members of a group start from the same x_T."""
    record_pred_x0: bool = False
    """Whether the sampler keeps x̂0 at every step (SDPO's dense rewards need it)."""
    reference_log_probs: bool = False
    """Whether the loss needs log-probs under the frozen base model (adapter disabled)."""
    whole_trajectory_loss: bool = False
    """Whether one loss term spans all K steps of a trajectory (REBEL's sequence ratio),
    so the runner must pass every step of a minibatch to one `loss` call."""
    same_step_order_in_group: bool = True
    """Whether the members of a group see their steps in the same shuffled order."""


@dataclass
class LossInputs:
    """One minibatch of transitions: p groups, G members, S steps of each trajectory."""

    log_probs: torch.Tensor  # (p, G, S) under the current weights, carries the gradient
    old_log_probs: torch.Tensor  # (p, G, S) recorded at sampling time
    advantages: torch.Tensor  # (p, G, S)
    step_index: torch.Tensor  # (p, G, S) long, k = 0 for the first (noisiest) step
    ref_log_probs: torch.Tensor | None = None  # (p, G, S) under the frozen base model


class Algorithm(abc.ABC):
    """Base class: subclasses set `needs` and implement `advantages` and `loss`."""

    needs: SamplingNeeds

    def reward_steps(self, traj: Trajectory) -> torch.Tensor | None:
        """(P, G, M) step indices whose decoded x̂0 is scored, or None to score the final
        images only (one reward call per trajectory)."""
        return None

    def shape_rewards(self, traj: Trajectory, scores: torch.Tensor) -> torch.Tensor:
        """Per-trajectory returns from the scores of `reward_steps`, computed locally.

        scores: (P, G) for final images, or (P, G, M) for `reward_steps`.
        Returns (P, G) terminal or (P, G, K) per-step returns.
        """
        return scores

    @abc.abstractmethod
    def new_tracker(self) -> Any:
        """A fresh statistics tracker (its `state_dict` is saved with checkpoints)."""

    @abc.abstractmethod
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: Any) -> torch.Tensor:
        """(P, G, K) advantages for the global batch; updates `tracker`. No gradient."""

    @abc.abstractmethod
    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss for one minibatch and detached scalar metrics to log."""
