"""Score the previous batch in a background thread while the next one samples."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from rewards.base import Reward


class RewardExecutor:
    """One worker thread that runs `reward.score`; jobs run in submission order.

    Torch releases the GIL inside its kernels, so a CPU or GPU reward model overlaps
    the sampler's work. `submit` detaches and copies the images, so the caller may
    reuse its buffers at once. `Future.result()` returns the (B,) scores or re-raises
    the scorer's exception in the caller.

        with RewardExecutor(reward) as executor:
            pending = executor.submit(images, prompts)
            next_images = sample(...)
            scores = pending.result()
    """

    def __init__(self, reward: Reward):
        self.reward = reward
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reward-{reward.name}")

    def submit(self, images: torch.Tensor, prompts: list[str]) -> Future:
        return self._pool.submit(self.reward.score, images.detach().clone(), list(prompts))

    def shutdown(self) -> None:
        """Waits for submitted jobs, then stops the thread."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "RewardExecutor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
