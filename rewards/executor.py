"""Score the previous batch in a background thread while the next one samples."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from rewards.base import Reward


class RewardExecutor:
    """One worker thread that runs `reward.score`; jobs run in submission order.

    Torch releases the GIL inside its kernels, so a CPU reward (JPEG encoding, a model on
    the CPU) overlaps the sampler's work. On CUDA the worker also runs on its own stream:
    on the sampler's stream its kernels would queue behind the next batch's UNet calls.
    `submit` detaches and copies the images, so the caller may reuse its buffers at once.
    `Future.result()` returns the (B,) scores, ready to use on any stream, or re-raises
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
        images = images.detach().clone()
        if images.device.type != "cuda":
            return self._pool.submit(self.reward.score, images, list(prompts))
        # The copy is queued on the caller's stream: the worker's stream waits for it.
        ready = torch.cuda.Event()
        ready.record()
        return self._pool.submit(self._score_on_side_stream, images, list(prompts), ready)

    def _score_on_side_stream(self, images: torch.Tensor, prompts: list[str], ready: torch.cuda.Event) -> torch.Tensor:
        stream = torch.cuda.Stream(images.device)
        stream.wait_event(ready)
        # The allocator must not hand the images' memory to the caller's stream while
        # this stream may still read it.
        images.record_stream(stream)
        with torch.cuda.stream(stream):
            scores = self.reward.score(images, prompts)
        stream.synchronize()
        return scores

    def shutdown(self) -> None:
        """Waits for submitted jobs, then stops the thread."""
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "RewardExecutor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()
