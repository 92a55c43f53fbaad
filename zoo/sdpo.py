"""SDPO: step-generalised pair regression with dense rewards interpolated by x̂0 similarity.

Paper: Zhang, Shen, Zhang, Hu, Wang, Bian, "Aligning Few-Step Diffusion Models with Dense
Reward Difference Learning" (arXiv 2411.11727).
Reference code: ZiyiZhang27/sdpo (`scripts/train_sdpo.py`,
`sdpo_pytorch/diffusers_patch/pipeline_with_logprob_sdpo.py`, `sdpo_pytorch/stat_tracking.py`,
`config/base_sdpo.py`, `config/config_sdpo.py`).

Implementation details:
1. Sampling: stabilityai/sd-turbo with its scheduler swapped to DDIM ("trailing"), eta = 1,
   guidance 1 (no CFG), K = 50; members 0 and 1 of a pair start from the same x_T, and x_t,
   logp_t and x̂0_t are kept at every step.
2. Anchor, per trajectory, on flattened x̂0 latents: sim_first_t = cos(x̂0_t, x̂0_0),
   sim_last_t = cos(x̂0_t, x̂0_{K-1}), anchor = argmin_t (sim_first_t + sim_last_t) over all
   K steps (first index on ties), sim_anchor_t = cos(x̂0_t, x̂0_anchor).
3. Three images per trajectory are decoded and scored (`reward_steps`): x̂0 of the first
   step, of the anchor, of the last step (the reference's "final image"). The sampled final
   latent x_0 itself is never decoded (`needs.final_images` is off).
4. Dense rewards: r_t = (R_first·sim_first_t + R_anchor·sim_anchor_t + R_last·sim_last_t)
   / (sim_first_t + sim_anchor_t + sim_last_t); then the exact scores overwrite r_0 and
   r_{K-1}, and after them R_anchor overwrites r_anchor (the reference's order).
5. Discounted return-to-go, from the last step back: r_t += γ · r_{t+1} (γ = 0.99).
6. Advantages: the per-(prompt, step) stat tracker (buffer 32, min_count 16) over the
   gathered batch in the reference's order [every member 0; every member 1]; its fallback is
   that step's mean and std over the whole batch.
7. Training order: shuffle pairs, permute steps per pair (one permutation for both members),
   then for each step j the minibatches in turn (steps are the outer loop,
   `steps_in_outer_loop`), one `loss` call each, and an optimizer step every
   `gradient_accumulation_steps` calls (not multiplied by K, unlike DDPO).
8. Loss per (pair, step), k the step's index from the first step:
   w = λ^k / η;  ΔA = clamp(A_0, ±adv_clip_max) - clamp(A_1, ±adv_clip_max);
   Δρ = (logp_0 - old_0) - (logp_1 - old_1), Δρ_c the same with each logp clamped to
   old ± clip_range; loss = mean(max((w·Δρ - ΔA)², (w·Δρ_c - ΔA)²)). clip_range = 0 uses the
   unclipped term alone, as the reference does.
9. Metrics: clipfrac = mean((w·Δρ_c - ΔA)² > (w·Δρ - ΔA)²), adv_clipfrac (the share of
   advantages that the clamp changed).
10. Optimizer: AdamW, weight decay 1e-4, grad-norm clip 1.0, LoRA rank 4 (scale 1) on
    attention q, k, v, out; per-reward lr, batch and accumulation in `config_for_reward`.

Deliberate deviations:
- Cosine similarities are computed in float32 whatever the sampling precision (the
  reference takes them in its sampler's precision).
- adv_clipfrac counts advantages clamped on either side; the reference's `clamped > raw`
  counts only those below -adv_clip_max.

Cost: 3 reward calls per trajectory, against 1 for DDPO; the runner counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from zoo.algorithm import (
    LossInputs, ReplayAlgorithm, SamplingNeeds, TrainingConfig, check_field_rules, check_tracker_sizes,
)
from zoo.stat_tracking import PerPromptStepStatTracker
from zoo.trajectory import Trajectory

_FIELD_RULES = (
    ("clip_range", "must be non-negative (0 disables clipping)", lambda v: v >= 0),
    ("adv_clip_max", "must be positive", lambda v: v > 0),
    ("step_weight_decay", "must lie in (0, 1]", lambda v: 0 < v <= 1),
    ("log_scale", "must be positive", lambda v: v > 0),
    ("discount", "must lie in [0, 1]", lambda v: 0 <= v <= 1),
    ("tracker_buffer_size", "must be at least 1", lambda v: v >= 1),
    ("tracker_min_count", "must be at least 1", lambda v: v >= 1),
)
"""(field, rule, predicate): the values of its own fields that `SDPOConfig` refuses."""


@dataclass(frozen=True)
class SDPOConfig(TrainingConfig):
    """SDPO's hyperparameters; defaults are the reference's aesthetic configuration, a fork
    of ddpo-pytorch's (shared fields are re-declared where it changed `TrainingConfig`'s)."""

    learning_rate: float = 1e-4
    """AdamW learning rate (the reference's for aesthetic; see `config_for_reward`)."""
    train_batch_size: int = 2
    """Pairs per minibatch, per process (the reference's for aesthetic)."""
    gradient_accumulation_steps: int = 8
    """`loss` calls per optimizer step; each call is one step j of one minibatch (not multiplied by K)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale, at sampling and when recomputing log-probs (1 = no guidance, as the reference)."""
    clip_range: float = 1e-4
    """Each recomputed log-prob is clamped to old ± clip_range in the clipped term; 0 disables it."""
    adv_clip_max: float = 5.0
    """Advantages are clamped to [-adv_clip_max, adv_clip_max] before their difference is taken."""
    step_weight_decay: float = 0.99
    """λ: the log-ratio difference of the step with index k (0 = first) is weighted by λ^k / η."""
    log_scale: float = 1.0
    """η: divides every step's weight λ^k."""
    discount: float = 0.99
    """γ: dense rewards become discounted returns-to-go, r_t += γ · r_{t+1}."""
    tracker_buffer_size: int = 32
    """Returns kept per (prompt, step) by the stat tracker, across epochs."""
    tracker_min_count: int = 16
    """Below this many buffered returns a (prompt, step) is normalised by that step's whole-batch mean and std."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_rules(self, _FIELD_RULES)
        check_tracker_sizes(self, "per-step")

    @property
    def loss_calls_per_update(self) -> int:
        """`loss` calls (backward passes) between optimizer steps: one per step j of each
        accumulated minibatch."""
        return self.gradient_accumulation_steps

    @property
    def steps_in_outer_loop(self) -> bool:
        """The reference trains step j of every minibatch before step j + 1."""
        return True

    def build(self) -> "SDPO":
        return SDPO(self)


PAPER_REWARD_SETTINGS: dict[str, tuple[float, int, int, int]] = {
    # sdpo config/base_sdpo.py:66 (lr), config/config_sdpo.py:23, :24, :15
    "aesthetic": (1e-4, 2, 8, 100),
    # sdpo config/config_sdpo.py:43, :44, :45, :38
    "imagereward": (5e-5, 1, 32, 200),
    # sdpo config/config_sdpo.py:58, :59, :60, :53
    "hpsv2": (5e-5, 1, 32, 200),
    # sdpo config/config_sdpo.py:73, :74, :75, :68
    "pickscore": (6e-5, 1, 16, 200),
}
"""(learning_rate, train_batch_size, gradient_accumulation_steps, epochs) per reward in the
paper's configs (ZiyiZhang27/sdpo at fcee34d; made for 4 GPUs, README.md:84), each of which
samples 8 prompts x 4 batches per GPU per epoch (config_sdpo.py:20-21), every prompt twice:
32 pairs."""


def config_for_reward(reward: str) -> SDPOConfig:
    """The paper's per-reward settings (the epoch budget is the runner's: see
    `PAPER_REWARD_SETTINGS`)."""
    if reward not in PAPER_REWARD_SETTINGS:
        raise ValueError(f"SDPO's paper has settings for {sorted(PAPER_REWARD_SETTINGS)}, not {reward!r}.")
    learning_rate, batch, accumulation, _ = PAPER_REWARD_SETTINGS[reward]
    return replace(
        SDPOConfig(), learning_rate=learning_rate, train_batch_size=batch, gradient_accumulation_steps=accumulation
    )


def anchor_similarities(pred_x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """pred_x0 (P, G, K, C, h, w) -> anchor (P, G) long and sim_first, sim_anchor, sim_last (P, G, K)."""
    flat = pred_x0.flatten(start_dim=3).float()  # (P, G, K, C*h*w)
    sim_first = F.cosine_similarity(flat, flat[:, :, :1], dim=-1)
    sim_last = F.cosine_similarity(flat, flat[:, :, -1:], dim=-1)
    anchor = (sim_first + sim_last).argmin(dim=-1)  # (P, G)
    anchor_x0 = torch.gather(flat, 2, anchor[:, :, None, None].expand(-1, -1, 1, flat.shape[-1]))
    sim_anchor = F.cosine_similarity(flat, anchor_x0, dim=-1)
    return anchor, sim_first, sim_anchor, sim_last


def discounted_returns(rewards: torch.Tensor, discount: float) -> torch.Tensor:
    """rewards (..., K) -> returns-to-go (..., K): G_t = r_t + discount * G_{t+1}."""
    returns = rewards.clone()
    for t in reversed(range(rewards.shape[-1] - 1)):
        returns[..., t] += discount * returns[..., t + 1]
    return returns


class SDPO(ReplayAlgorithm):
    def __init__(self, config: SDPOConfig):
        self.config = config
        self.needs = SamplingNeeds(group_size=2, shared_noise=True, record_pred_x0=True, final_images=False)

    def reward_steps(self, traj: Trajectory) -> torch.Tensor:
        """(P, G, 3): the first step, the anchor and the last step of every trajectory."""
        if traj.pred_x0 is None:
            raise ValueError("SDPO needs x̂0 at every step: sample with needs.record_pred_x0.")
        anchor, *_ = anchor_similarities(traj.pred_x0)
        first = torch.zeros_like(anchor)
        last = torch.full_like(anchor, traj.num_steps - 1)
        return torch.stack([first, anchor, last], dim=-1)

    def shape_rewards(self, traj: Trajectory, scores: torch.Tensor) -> torch.Tensor:
        """scores (P, G, 3) of the first, anchor and last x̂0 -> (P, G, K) discounted returns."""
        anchor, sim_first, sim_anchor, sim_last = anchor_similarities(traj.pred_x0)
        scores = scores.float()
        score_first, score_anchor, score_last = (scores[..., i : i + 1] for i in range(3))  # (P, G, 1) each
        dense = (score_first * sim_first + score_anchor * sim_anchor + score_last * sim_last) / (
            sim_first + sim_anchor + sim_last
        )  # (P, G, K)
        dense[..., 0] = scores[..., 0]
        dense[..., -1] = scores[..., 2]
        dense.scatter_(-1, anchor[..., None], score_anchor)
        return discounted_returns(dense, self.config.discount)

    def new_tracker(self) -> PerPromptStepStatTracker:
        return PerPromptStepStatTracker(self.config.tracker_buffer_size, self.config.tracker_min_count)

    @torch.no_grad()
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: PerPromptStepStatTracker) -> torch.Tensor:
        """returns (P, G, K) -> (P, G, K) advantages normalised per (prompt, step)."""
        num_prompts, group_size, num_steps = returns.shape
        member_major = returns.transpose(0, 1).reshape(group_size * num_prompts, num_steps)
        advantages = tracker.update(prompts * group_size, member_major)
        return advantages.view(group_size, num_prompts, num_steps).transpose(0, 1).contiguous()

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        clamped_advantages = inputs.advantages.clamp(-c.adv_clip_max, c.adv_clip_max)  # (p, 2, S)
        advantage_diff = clamped_advantages[:, 0] - clamped_advantages[:, 1]  # (p, S)
        weight = c.step_weight_decay ** inputs.step_index[:, 0].to(inputs.log_probs.dtype) / c.log_scale  # (p, S)
        log_ratio = inputs.log_probs - inputs.old_log_probs  # (p, 2, S)
        log_ratio_diff = log_ratio[:, 0] - log_ratio[:, 1]  # (p, S)
        unclipped = (weight * log_ratio_diff - advantage_diff) ** 2
        metrics = {
            "approx_kl": 0.5 * (log_ratio.detach() ** 2).mean(),
            "adv_clipfrac": (clamped_advantages != inputs.advantages).float().mean(),
        }
        if c.clip_range > 0:
            clamped_log_probs = torch.clamp(
                inputs.log_probs, inputs.old_log_probs - c.clip_range, inputs.old_log_probs + c.clip_range
            )
            clipped_log_ratio = clamped_log_probs - inputs.old_log_probs  # (p, 2, S)
            clipped = (weight * (clipped_log_ratio[:, 0] - clipped_log_ratio[:, 1]) - advantage_diff) ** 2
            loss = torch.maximum(unclipped, clipped).mean()
            metrics["clipfrac"] = (clipped > unclipped).float().mean()
        else:
            loss = unclipped.mean()
        metrics["loss"] = loss.detach()
        return loss, metrics
