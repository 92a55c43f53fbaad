"""DDPO: PPO-clip on every denoising step, advantages from a per-prompt stat tracker.

Paper: Black, Janner, Du, Kostrikov, Levine, "Training Diffusion Models with Reinforcement
Learning", ICLR 2024 (arXiv 2305.13301); the DDPO_IS variant.
Reference code: kvablack/ddpo-pytorch (`scripts/train.py`, `config/base.py`,
`ddpo_pytorch/stat_tracking.py`).

Implementation details (numbers refer to the reference's training script):
1. Sampling: DDIM with eta = 1, K = 50, classifier-free guidance 5, one trajectory per
   prompt from its own x_T; the log-prob of each transition is the Gaussian log-density
   averaged over the latent's elements (see `zoo.sampling`).
2. Rewards: one score of the final image per trajectory, gathered across processes.
3. Advantages: per-prompt stat tracker (buffer 16, min_count 16; `zoo.stat_tracking`),
   one scalar per trajectory, broadcast over its K steps.
4. Training order: shuffle trajectories, permute the time axis independently per
   trajectory, then for each minibatch and each step j recompute log p under the current
   weights (CFG on, the sampling guidance scale).
5. Loss per step: ratio = exp(logp - old_logp), A_c = clamp(A, +-adv_clip_max),
   loss = mean(max(-A_c * ratio, -A_c * clamp(ratio, 1 - clip_range, 1 + clip_range))).
   The clip range 1e-4 is tiny because the log-probs are element means.
6. Gradient accumulation spans every step of a minibatch: one optimizer step per
   `gradient_accumulation_steps` minibatches x K steps (`loss_calls_per_update`), so each
   update sees whole trajectories.
7. Metrics: approx_kl = 0.5 * mean((logp - old_logp)^2) (the reference's estimator, not
   Schulman's k3), clipfrac = mean(|ratio - 1| > clip_range).
8. Optimizer: AdamW, lr 3e-4, betas (0.9, 0.999), eps 1e-8, weight decay 1e-4, grad-norm
   clip 1.0; LoRA rank 4 (scale 1, i.e. alpha = rank) on attention q, k, v, out.

Deliberate deviations: none in the math. The stat tracker keeps prompts in order of first
appearance instead of sorting them (each prompt's statistics are independent of the others,
so the advantages are identical).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.algorithm import (
    LossInputs, ReplayAlgorithm, SamplingNeeds, TrainingConfig, check_field_rules, check_tracker_sizes, ppo_clip_loss,
)
from zoo.stat_tracking import PerPromptStatTracker

_FIELD_RULES = (
    ("clip_range", "must be positive", lambda v: v > 0),
    ("adv_clip_max", "must be positive", lambda v: v > 0),
    ("tracker_buffer_size", "must be at least 1", lambda v: v >= 1),
    ("tracker_min_count", "must be at least 1", lambda v: v >= 1),
)
"""(field, rule, predicate): the values of its own fields that `DDPOConfig` refuses."""


@dataclass(frozen=True)
class DDPOConfig(TrainingConfig):
    """DDPO's hyperparameters; defaults are ddpo-pytorch's `config/base.py`, as are
    `TrainingConfig`'s for the shared fields."""

    clip_range: float = 1e-4
    """PPO clip range: the ratio is clamped to [1 - clip_range, 1 + clip_range]."""
    adv_clip_max: float = 5.0
    """Advantages are clamped to [-adv_clip_max, adv_clip_max] in the loss."""
    tracker_buffer_size: int = 16
    """Rewards kept per prompt by the stat tracker, across epochs."""
    tracker_min_count: int = 16
    """Below this many buffered rewards a prompt is normalised by the whole batch's mean and std."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_rules(self, _FIELD_RULES)
        check_tracker_sizes(self, "per-prompt")

    def build(self) -> "DDPO":
        return DDPO(self)


class DDPO(ReplayAlgorithm):
    def __init__(self, config: DDPOConfig):
        self.config = config
        self.needs = SamplingNeeds(group_size=1, shared_noise=False)

    def new_tracker(self) -> PerPromptStatTracker:
        return PerPromptStatTracker(self.config.tracker_buffer_size, self.config.tracker_min_count)

    @torch.no_grad()
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: PerPromptStatTracker) -> torch.Tensor:
        """returns: (P, G) final-image rewards -> (P, G, K) advantages, constant along K."""
        num_prompts, group_size = returns.shape
        member_major = returns.transpose(0, 1).reshape(-1)  # (G*P,)
        per_trajectory = tracker.update(prompts * group_size, member_major)
        per_trajectory = per_trajectory.view(group_size, num_prompts).transpose(0, 1)  # (P, G)
        return per_trajectory[:, :, None].expand(-1, -1, self.config.num_steps).clone()

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = ppo_clip_loss(inputs, self.config.clip_range, self.config.adv_clip_max)  # (p, 1, S) steps
        return loss, {"loss": loss.detach(), **metrics}
