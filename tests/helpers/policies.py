"""The tiny policy with a random adapter, and a check on a policy's sampler."""

from __future__ import annotations

import torch

from zoo.kernels import SamplerConfig
from zoo.loading import load_policy
from zoo.policy import LoraSettings, Policy
from zoo.sampling import TrajectorySampler

SHAPE_PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
"""Two prompts: those `assert_rescoring_gives_ratio_one` samples, and the flow tests'."""


def policy_with_random_adapter(folder: str, mixed_precision: str = "no") -> Policy:
    """LoRA's B starts at zero, which would leave A's gradient and the adapter's output
    zero: randomise both."""
    torch.manual_seed(0)
    policy = load_policy(folder, mixed_precision=mixed_precision, lora=LoraSettings())
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.normal_(0, 0.05)
    return policy


def assert_rescoring_gives_ratio_one(policy: Policy, config: SamplerConfig) -> None:
    """Samples two trajectories of each of SHAPE_PROMPTS with `config` and re-scores every
    stored transition: |exp(logp - stored) - 1| <= 1e-6 (float32 log-probs)."""
    sampler = TrajectorySampler(policy, config)
    traj = sampler.sample(SHAPE_PROMPTS, group_size=2, generator=torch.Generator().manual_seed(config.num_steps))
    n = 4
    embeds = traj.prompt_embeds.repeat_interleave(2, dim=0)
    for k in range(config.num_steps):
        step = torch.full((n,), k, dtype=torch.long)
        logp = sampler.log_prob(traj.latents[:, :, k].flatten(0, 1), step, traj.next_latents[:, :, k].flatten(0, 1),
                                embeds)
        ratio = torch.exp(logp - traj.log_probs[:, :, k].flatten())
        assert (ratio - 1).abs().max().item() <= 1e-6
