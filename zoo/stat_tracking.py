"""Reward statistics that turn rewards into advantages, kept across epochs.

Two trackers, as the reference codes run them:

- `PerPromptStatTracker` (DDPO, REBEL; ddpo-pytorch `ddpo_pytorch/stat_tracking.py`,
  copied unchanged into RLCM): one deque of the last `buffer_size` rewards per prompt.
- `PerPromptStepStatTracker` (SDPO; ZiyiZhang27/sdpo `sdpo_pytorch/stat_tracking.py`):
  one deque per (prompt, step), over per-step returns.

Order of operations in `update`, for every prompt (and step) of the gathered batch:
1. the batch's rewards of that prompt are pushed into its deque first (oldest evicted);
2. then the statistics are read: from the deque if it now holds at least `min_count`
   values, otherwise from the whole gathered batch (for the per-step tracker: that step's
   column over every prompt and trajectory);
3. A = (r - mean) / (std + 1e-6), std the population std (numpy's default, ddof = 0).
So a prompt's own current rewards are always part of its statistics, and with
`buffer_size == min_count` (DDPO's 16/16) a prompt uses its own deque from the epoch its
deque fills. Rewards enter a deque in the order given; callers pass the batch in the
reference's order (for pairs: every first member, then every second member).

Statistics are computed in float64 (the reference's numpy arrays are float64 once any
Python float enters them) and returned in the rewards' dtype. `state_dict()` is plain JSON:
sizes and the buffered rewards as lists of floats, so checkpoints can write it anywhere.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

STD_EPS = 1e-6


def _normalize(rewards: torch.Tensor, statistics_source: torch.Tensor) -> torch.Tensor:
    mean = statistics_source.mean()
    std = statistics_source.std(correction=0)
    return (rewards - mean) / (std + STD_EPS)


def _check_sizes(buffer_size: int, min_count: int) -> None:
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be at least 1 (got {buffer_size}).")
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1 (got {min_count}).")
    if min_count > buffer_size:
        raise ValueError(
            f"min_count ({min_count}) exceeds buffer_size ({buffer_size}): a buffer never holds "
            "that many rewards, so per-prompt statistics would never be used."
        )


def _check_loaded_sizes(tracker: Any, state: dict) -> None:
    if (state["buffer_size"], state["min_count"]) != (tracker.buffer_size, tracker.min_count):
        raise ValueError(
            f"The checkpoint's stat tracker was saved with buffer_size={state['buffer_size']}, "
            f"min_count={state['min_count']}, but this run uses buffer_size={tracker.buffer_size}, "
            f"min_count={tracker.min_count}; resume with the same tracker sizes."
        )


class PerPromptStatTracker:
    """A deque of the last `buffer_size` rewards per prompt (DDPO, REBEL)."""

    def __init__(self, buffer_size: int, min_count: int):
        _check_sizes(buffer_size, min_count)
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Push `rewards` (N,) of the gathered batch, then return advantages (N,)."""
        if rewards.dim() != 1 or rewards.shape[0] != len(prompts):
            raise ValueError(f"Expected rewards of shape ({len(prompts)},), got {tuple(rewards.shape)}.")
        batch = rewards.detach().to(torch.float64).cpu()
        advantages = torch.empty_like(batch)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(batch[rows].tolist())
            if len(buffer) < self.min_count:
                source = batch
            else:
                source = torch.tensor(list(buffer), dtype=torch.float64)
            advantages[rows] = _normalize(batch[rows], source)
        return advantages.to(device=rewards.device, dtype=rewards.dtype)

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        _check_loaded_sizes(self, state)
        self.buffers = {
            prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["buffers"].items()
        }


class PerPromptStepStatTracker:
    """A deque of the last `buffer_size` returns per (prompt, step) (SDPO)."""

    def __init__(self, buffer_size: int, min_count: int):
        _check_sizes(buffer_size, min_count)
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, list[deque[float]]] = {}

    def update(self, prompts: list[str], returns: torch.Tensor) -> torch.Tensor:
        """Push `returns` (N, K) of the gathered batch, then return advantages (N, K)."""
        if returns.dim() != 2 or returns.shape[0] != len(prompts):
            raise ValueError(f"Expected returns of shape ({len(prompts)}, K), got {tuple(returns.shape)}.")
        batch = returns.detach().to(torch.float64).cpu()  # (N, K)
        num_steps = batch.shape[1]
        advantages = torch.empty_like(batch)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts])
            step_buffers = self.buffers.setdefault(prompt, [])
            while len(step_buffers) < num_steps:
                step_buffers.append(deque(maxlen=self.buffer_size))
            for step in range(num_steps):
                buffer = step_buffers[step]
                buffer.extend(batch[rows, step].tolist())
                if len(buffer) < self.min_count:
                    source = batch[:, step]
                else:
                    source = torch.tensor(list(buffer), dtype=torch.float64)
                advantages[rows, step] = _normalize(batch[rows, step], source)
        return advantages.to(device=returns.device, dtype=returns.dtype)

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: [list(b) for b in steps] for prompt, steps in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        _check_loaded_sizes(self, state)
        self.buffers = {
            prompt: [deque(values, maxlen=self.buffer_size) for values in steps]
            for prompt, steps in state["buffers"].items()
        }


class NoStatTracker:
    """For algorithms whose advantages need no history (D3PO's preferences): an empty state,
    so the runner saves and restores every algorithm's tracker the same way."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError("This algorithm keeps no reward statistics, but the checkpoint holds some.")
