"""DRaFT-K / AlignProp: the reward's gradient back-propagated through the last K sampling steps.

Paper: Clark, Vicol, Swersky, Fleet, "Directly Fine-Tuning Diffusion Models on
Differentiable Rewards", ICLR 2024 (arXiv 2309.17400); no official code. DRaFT samples,
decodes and scores with autograd on and maximises the reward by gradient ascent on the
LoRA weights; DRaFT-K truncates the backward pass to the last K sampling steps (DRaFT-1:
K = 1). AlignProp (Prabhudesai, Goyal, Pathak, Fragkiadaki, "Aligning Text-to-Image
Diffusion Models with Reward Backpropagation", arXiv 2310.03739) is the same method with K
drawn at random per batch; its code, mihirp1998/AlignProp at b22918a (cited below as
file:line), is the reference where the paper has none.

Implementation details (the runner's side is `benchmarks.epochs.reward_backprop_epoch`):
1. On-policy minibatches: each minibatch of `train_batch_size` prompts is sampled with the
   weights the previous update left, scored and trained on once, as AlignProp samples
   inside its accumulation loop (alignprop_trainer.py:318-322); no log-probs, advantages
   or stat tracker. `num_inner_epochs` must be 1.
2. Truncation: the first K_total - K steps run without gradients, the last K with them,
   through the latents as well as the UNet (the gradient of step k's output reaches
   step k - 1's LoRA calls through x_{t_k}); AlignProp detaches the UNet output before its
   truncation step (sd_pipeline.py:224-225), so no gradient reaches the weights there
   either. K = `grad_steps`; AlignProp's 'fixed' strategy is K = 1 (value 49 of 50 steps,
   alignprop_config.py:112).
3. Randomised truncation (`random_grad_steps`): K drawn uniformly from 1..grad_steps per
   minibatch, from the epoch's generator, as AlignProp's 'uniform' strategy draws its
   truncation step per batch (sd_pipeline.py:126-130, alignprop_config.py:112).
4. Every UNet call with gradients is checkpointed, non-reentrantly
   (`zoo.sampling.TrajectorySampler.final_latents`; sd_pipeline.py:206-214), so memory does
   not grow with K; the VAE decoder and the reward run with gradients, not checkpointed
   (sd_pipeline.py:251).
5. Sampler: deterministic DDIM (eta = 0) by default, DRaFT's (docs/ALGORITHMS.md, "Frontier
   methods"), so the truncated gradient is the gradient of a deterministic map; eta > 0 is
   allowed (AlignProp samples with eta = 1, alignprop_config.py:108), its noise then enters
   as a constant (reparametrised). K_total = 50 (alignprop_config.py:103), CFG 5 (:109).
6. Loss = -loss_scale * mean(rewards) over the minibatch, loss_scale 0.01 (AlignProp's
   loss_coeff, alignprop_config.py:106, applied at alignprop_trainer.py:330-331). Its
   aesthetic loss |r - 10| (alignprop_trainer.py:120-130; aesthetic_target 10,
   alignprop_config.py:107) and HPS loss 1 - r (alignprop_trainer.py:102) both have -r's
   gradient wherever r is below the target.
7. Rewards: the image's gradient needs a differentiable reward
   (`rewards.base.Reward.score_with_grad`): its preprocessing keeps the graph (resize and
   normalise in torch, no 8-bit rounding), as AlignProp's does (alignprop_trainer.py:121-123).
   The runner refuses a non-differentiable one before any model loads.
8. Optimizer (AlignProp's): AdamW lr 1e-3 (alignprop_config.py:116), betas (0.9, 0.999)
   (:117-118), weight decay 1e-4 (:119), eps 1e-8 (:120), grad-norm clip 1.0 (:122); 8
   trajectories per minibatch and 4 minibatches per update per process (aesthetic.sh:10,
   :5). LoRA: `TrainingConfig`'s (rank 4 on attention q, k, v, out).

Deliberate deviations:
- No `aesthetic_target` (AlignProp's |r - target|): the loss is -r, whose gradient is the
  same below the target.
- AlignProp's default 'gaussian' truncation (K ~ 50 - N(42, 5), alignprop_config.py:111-112)
  is not offered; the uniform draw is. Its uniform draw never reaches K = 50 (its truncation
  step is at least 1, sd_pipeline.py:126); here grad_steps = K_total is allowed.
- AlignProp scores images that it maps to [0, 1] twice (the pipeline's postprocess,
  sd_pipeline.py:261, then (x / 2 + 0.5) again, alignprop_trainer.py:121), so its scorer
  sees [0.5, 1]; here the reward sees the decoder's [0, 1] image, as in sampling.
- DRaFT-LV (K = 1 with several re-noised copies of the last step) is not implemented.

Metrics: loss, reward (minibatch mean), reward_std (AlignProp logs both,
alignprop_trainer.py:346-347); the runner adds grad_steps (the mean K: each backward pass
goes through that many UNet calls) and train_reward. Over several processes each computes
them on its part of the minibatch and the runner averages the parts: the mean is the
minibatch's, the standard deviation the mean of the parts' (the spread within a part, a
little below the minibatch's).

Cost: one reward call per trajectory and one backward pass per minibatch, through K UNet
calls (each recomputed once by checkpointing), the VAE decoder and the reward model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.algorithm import RewardBackpropAlgorithm, SamplingNeeds, TrainingConfig, check_field_rules

_FIELD_RULES = (
    ("grad_steps", "must be at least 1", lambda v: v >= 1),
    ("loss_scale", "must be positive", lambda v: v > 0),
    ("num_inner_epochs", "must be 1: every minibatch is sampled with the current weights and trained on once",
     lambda v: v == 1),
)
"""(field, rule, predicate): the values of its own fields that `DRaFTConfig` refuses."""


@dataclass(frozen=True)
class DRaFTConfig(TrainingConfig):
    """DRaFT-K's and AlignProp's hyperparameters; defaults are AlignProp's (mihirp1998/AlignProp
    at b22918a) where the DRaFT paper publishes no code."""

    learning_rate: float = 1e-3
    """AdamW learning rate (alignprop_config.py:116)."""
    train_batch_size: int = 8
    """Trajectories per minibatch, per process, sampled with the current weights; one backward pass each (aesthetic.sh:10)."""
    gradient_accumulation_steps: int = 4
    """Minibatches per optimizer step (aesthetic.sh:5)."""
    eta: float = 0.0
    """DDIM eta of the training sampler: 0 is deterministic DDIM (DRaFT's); AlignProp samples with 1."""
    grad_steps: int = 1
    """K: the last K sampling steps are back-propagated through (1 is DRaFT-1); the maximum with `random_grad_steps`."""
    random_grad_steps: bool = False
    """Draw K uniformly from 1..grad_steps for each minibatch (AlignProp's randomised truncation)."""
    loss_scale: float = 0.01
    """The loss is -loss_scale x the minibatch's mean reward (AlignProp's loss_coeff)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_rules(self, _FIELD_RULES)
        if self.grad_steps > self.num_steps:
            raise ValueError(
                f"grad_steps ({self.grad_steps}) exceeds num_steps ({self.num_steps}), the sampling steps there are to "
                "back-propagate through."
            )

    @property
    def reads_log_probs(self) -> bool:
        """The loss is the reward: deterministic DDIM (eta = 0), which has no log-density, is allowed."""
        return False

    @property
    def loss_calls_per_update(self) -> int:
        """`loss` calls (backward passes) between optimizer steps: one per accumulated minibatch."""
        return self.gradient_accumulation_steps

    def build(self) -> "DRaFT":
        return DRaFT(self)


class DRaFT(RewardBackpropAlgorithm):
    def __init__(self, config: DRaFTConfig):
        self.config = config
        self.needs = SamplingNeeds(group_size=1, shared_noise=False, whole_trajectory_loss=True)

    def grad_steps(self, generator: torch.Generator) -> int:
        if not self.config.random_grad_steps:
            return self.config.grad_steps
        return int(torch.randint(1, self.config.grad_steps + 1, (1,), generator=generator))

    def loss(self, rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = -self.config.loss_scale * rewards.mean()
        detached = rewards.detach()
        metrics = {"loss": loss.detach(), "reward": detached.mean(), "reward_std": detached.std(correction=0)}
        return loss, metrics
