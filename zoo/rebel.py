"""REBEL: regress the difference of sequence log-ratios of a pair onto its advantage difference.

Paper: Gao, Chang, Zhan, Oertell, Swamy, Brantley, Joachims, Bagnell, Lee, Sun, "REBEL:
Reinforcement Learning via Regressing Relative Rewards", NeurIPS 2024 (arXiv 2404.16767).
Reference code for diffusion: Owen-Oertell/rlcm (`lcm_rl_pytorch/core/rebel_training_loop.py`,
`conf/task/aesthetic.yaml`, `scripts/main.py`), on SimianLuo/LCM_Dreamshaper_v7.

Implementation details:
1. Sampling: LCM multistep sampling (K = 8, guidance w = 8 as an embedding), every prompt
   sampled twice with independent noise: group member 0 is y, member 1 is y'.
2. Rewards: one score of each final image.
3. Advantages: the per-prompt stat tracker (buffer 32, min_count 16) over the gathered batch
   in the reference's order [r(y) of every prompt; r(y') of every prompt], split back. No
   advantage clipping (the reference's `adv_clip_max` is read only by its PPO loop).
4. Training order: both members get the same batch permutation (they stay one group) and
   the same time permutation; each `loss` call sees all K steps of its pairs.
5. Loss per pair: Δ = Σ_k (logp_θ(y) - old(y)) - Σ_k (logp_θ(y') - old(y')),
   loss = mean((Δ / η - (A(y) - A(y')))²), η = `log_scale` (the reference's multiplier
   `rebel_rl` = 1/η = 1).
6. Accumulation: one backward pass per minibatch, an optimizer step every
   `gradient_accumulation_steps` minibatches (4 x 2 pairs). At rlcm's latest commit
   (b8330ed, `scripts/main.py` lines 43-48) the accelerator multiplies accumulation by K
   for PPO only; the earlier REBEL commit (815ef1b) multiplied it for REBEL too, which
   made an update span 4 x 8 = 32 minibatches.
7. Metrics: loss, approx_kl = 0.5 * mean((logp - old)^2) over steps, log_ratio_diff =
   mean |Δ|, advantage_diff = mean |A(y) - A(y')|.
8. Optimizer: Adam (AdamW with weight decay 0 here), lr 1e-4, no gradient clipping; LoRA
   rank 8, alpha 8 on to_q, to_k, to_v, to_out.0.

Deliberate deviations:
- The reference concatenates per-step log-probs of shape (B,) along the batch axis and sums
  the result to one scalar, so every pair's Δ is the whole minibatch's sum; here Δ sums over
  steps per pair.
- The reference decays the learning rate linearly (LinearLR to 0 over 3 x num_epochs
  scheduler steps, stepped once per epoch); schedules are the runner's, which keeps lr fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from zoo.algorithm import (
    LossInputs, ReplayAlgorithm, SamplingNeeds, TrainingConfig, check_field_rules, check_tracker_sizes,
)
from zoo.stat_tracking import PerPromptStatTracker

_FIELD_RULES = (
    ("log_scale", "must be positive", lambda v: v > 0),
    ("tracker_buffer_size", "must be at least 1", lambda v: v >= 1),
    ("tracker_min_count", "must be at least 1", lambda v: v >= 1),
)
"""(field, rule, predicate): the values of its own fields that `REBELConfig` refuses."""


@dataclass(frozen=True)
class REBELConfig(TrainingConfig):
    """REBEL's hyperparameters; defaults are RLCM's aesthetic task on LCM_Dreamshaper_v7
    (shared fields are re-declared where RLCM's differ from `TrainingConfig`'s)."""

    learning_rate: float = 1e-4
    """AdamW learning rate (RLCM's)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (0: RLCM's plain Adam)."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this value before each optimizer step; None disables it (RLCM's)."""
    train_batch_size: int = 2
    """Pairs per minibatch, per process (RLCM's); each `loss` call covers all K steps of its pairs."""
    gradient_accumulation_steps: int = 4
    """Minibatches per optimizer step (RLCM's; one backward pass each, not multiplied by K)."""
    lora_rank: int = 8
    """LoRA rank of the UNet adapter (RLCM's)."""
    lora_alpha: float = 8.0
    """LoRA alpha (RLCM's; the adapter's scale is alpha / rank)."""
    sampler: Literal["ddim", "lcm", "flow"] = "lcm"
    """Sampler whose transitions are trained on (RLCM's LCM multistep sampling)."""
    num_steps: int = 8
    """Sampling steps K during training (RLCM's)."""
    guidance_scale: float = 8.0
    """Guidance scale, RLCM's w (LCM: embedded as w = guidance_scale - 1; DDIM: classifier-free guidance)."""
    log_scale: float = 1.0
    """η: the pair's log-ratio difference is divided by η before it is regressed onto the advantage difference."""
    tracker_buffer_size: int = 32
    """Rewards kept per prompt by the stat tracker, across epochs."""
    tracker_min_count: int = 16
    """Below this many buffered rewards a prompt is normalised by the whole batch's mean and std."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_rules(self, _FIELD_RULES)
        check_tracker_sizes(self, "per-prompt")

    @property
    def loss_calls_per_update(self) -> int:
        """One `loss` call per minibatch covers all K steps, so an update is
        `gradient_accumulation_steps` calls (rlcm b8330ed, `scripts/main.py` lines 43-48)."""
        return self.gradient_accumulation_steps

    def build(self) -> "REBEL":
        return REBEL(self)


class REBEL(ReplayAlgorithm):
    def __init__(self, config: REBELConfig):
        self.config = config
        self.needs = SamplingNeeds(group_size=2, shared_noise=False, whole_trajectory_loss=True)

    def new_tracker(self) -> PerPromptStatTracker:
        return PerPromptStatTracker(self.config.tracker_buffer_size, self.config.tracker_min_count)

    @torch.no_grad()
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: PerPromptStatTracker) -> torch.Tensor:
        """returns: (P, 2) final-image rewards -> (P, 2, K) advantages, constant along K."""
        num_prompts, group_size = returns.shape
        member_major = returns.transpose(0, 1).reshape(-1)  # (2P,) [r(y) of every prompt; r(y')]
        per_trajectory = tracker.update(prompts * group_size, member_major)
        per_trajectory = per_trajectory.view(group_size, num_prompts).transpose(0, 1)  # (P, 2)
        return per_trajectory[:, :, None].expand(-1, -1, self.config.num_steps).clone()

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if inputs.log_probs.shape[2] != self.config.num_steps:
            raise ValueError(
                f"REBEL's loss spans whole trajectories: expected all {self.config.num_steps} steps "
                f"in one call, got {inputs.log_probs.shape[2]}."
            )
        log_ratio = inputs.log_probs - inputs.old_log_probs  # (p, 2, K)
        sequence_log_ratio = log_ratio.sum(dim=2)  # (p, 2), each trajectory's own sum over steps
        log_ratio_diff = sequence_log_ratio[:, 0] - sequence_log_ratio[:, 1]  # (p,)
        trajectory_advantages = inputs.advantages[:, :, 0]  # (p, 2), constant along steps
        advantage_diff = trajectory_advantages[:, 0] - trajectory_advantages[:, 1]  # (p,)
        loss = ((log_ratio_diff / self.config.log_scale - advantage_diff) ** 2).mean()
        metrics = {
            "loss": loss.detach(),
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
            "log_ratio_diff": log_ratio_diff.detach().abs().mean(),
            "advantage_diff": advantage_diff.detach().abs().mean(),
        }
        return loss, metrics
