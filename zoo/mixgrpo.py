"""MixGRPO: GRPO on a sliding window of SDE steps, the ODE everywhere else.

Paper: Li, Cui, Huang, Ma, Fan, Yang, Zhong, "MixGRPO: Unlocking Flow-based GRPO Efficiency
with Mixed ODE-SDE" (arXiv 2507.21802; the reference's README.md:173-181).
Reference code: Tencent-Hunyuan/MixGRPO at e5cdd6a427778d8c8b2e7a48ce16972141adbe7c:
`fastvideo/train_grpo_flux.py` (train.py below), `fastvideo/utils/grpo_states.py` (states.py),
`fastvideo/utils/sampling_utils.py` (sampling.py) and the published run,
`scripts/finetune/finetune_flux_grpo_MixGRPO.sh` (script.sh); line numbers are that commit's.
The reference's "iteration" (one sampling of every process's group and its updates,
train.py:936-965) is a stepzoo epoch here; its `group_size` (the window's size) is
`window_size` and its `num_generations` (the group) is `group_size`.

Implementation details:
1. Window schedule, the published "progressive" strategy (script.sh:59): the window is
   `window_size` consecutive steps (4, script.sh:58) starting at step `start`; each epoch
   trains the window of the start it begins with (`get_current_timesteps` before
   `update_iteration`, train.py:945-947, from start 0, :920). The start moves by
   `window_stride` (`prog_overlap` with `prog_overlap_step` 1, script.sh:60, :164-165; without
   `prog_overlap` the stride is the window's size, states.py:91-94) after every
   `epochs_per_window` epochs (`iters_per_group` 25, script.sh:57; states.py:87-90), and a
   start past the last window (here: the last that fits, see the deviations) rolls back to
   step 0 (`roll_back`, script.sh:168; states.py:95-97, :136-139) or, without it, stays at
   the last window (states.py:98-99). Deterministic in the epoch, so nothing is drawn and a
   resumed run continues the schedule.
2. Where windows lie: steps 0 .. K - 1 - `untrained_last_steps`. The reference drops each
   trajectory's last transition from the replayed samples (train.py:392-400, whatever
   `--ignore_last` says) and ends its windows before step K - 2 (`max_timesteps =
   sampling_steps - 2`, train.py:919, an exclusive end in states.py:148): with K = 25 the
   windows lie in steps 0 .. 22, so `untrained_last_steps` is 2.
3. Sampling (`noise_levels`): the window's steps with the SDE at the config's `eta`, every
   other step with the ODE, noise level 0 (`determistic` per step, train.py:236-241, which
   sampling.py:84-93 passes to `flow_grpo_step`: the Flow-GRPO SDE, sampling.py:177, :186,
   :195, or the Euler step, :198-199); the published run samples Flow-GRPO's SDE
   (`--flow_grpo_sampling`, script.sh:196) at noise level 0.7 (script.sh:55) on K = 25 steps
   (script.sh:54). Decided before the epoch samples, from the epoch alone.
4. Group: `group_size` trajectories per prompt (`num_generations` 12, script.sh:150; the
   prompt repeated, train.py:354-370), all from one x_T (`--init_same_noise`, script.sh:155;
   one draw per sampling call, train.py:210-215), so the members differ only by the window's
   noise.
5. Advantages, per group of one prompt: A = (r - mean) / (std + 1e-8) over the group's G
   rewards, with torch's default (unbiased, n - 1) std (train.py:458-479, "reward_aggr"; the
   published "advantage_aggr", script.sh:62, normalises each reward model's scores this way
   and sums them with normalised weights, train.py:428-456, :764-767, which is the same for
   one reward). No statistics kept between epochs. One scalar per trajectory, broadcast over
   its steps.
6. Trained steps (`trained_steps`): the window's, the same for every trajectory of the
   epoch (train.py:519-520, :543-544); each replayed once per epoch.
7. Loss per trained step (train.py:567-584): ratio = exp(logp - old_logp), A_c = clamp(A,
   ±adv_clip_max), policy = mean(max(-A_c·ratio, -A_c·clamp(ratio, 1 ± clip_range))) with
   clip_range 1e-4 (script.sh:156) and adv_clip_max 5 (script.sh:157) (`ppo_clip_loss`);
   loss = policy + kl_coeff·0.5·mean((logp - old_logp)²), the squared log-ratio to the
   sampling policy (train.py:583-584), kl_coeff 0 (script.sh:56; the argument's default is
   0.01, train.py:1321-1325). Each call's loss is divided by accumulation x window steps
   before its backward pass (train.py:582-586), as the runner divides by
   `loss_calls_per_update`.
8. Optimizer (script.sh:128-149, train.py:820-826): AdamW, lr 1e-5, betas (0.9, 0.999), eps
   1e-8, weight decay 1e-4, grad-norm clip 1.0, a constant rate without warm-up
   (`lr_warmup_steps` 0, script.sh:146). FLUX.1-dev's guidance embedding 3.5 (train.py:133-137,
   sampling.py:72-76) and no classifier-free guidance (`--cfg 0.0`, script.sh:139).
9. Metrics: loss, policy_loss, approx_kl = 0.5·mean((logp - old_logp)²) (the reference's
   kl_loss before its division, train.py:583), clipfrac (train.py:581).

Deliberate deviations:
- The window keeps its size to the end: `trained_steps_per_trajectory` is one number per
  run (the loop's and the budget's schedule), so the start rolls back (or stops) at the
  last window that fits, where the reference's start goes on to `max_timesteps`, its window
  shrinking to 3, 2, 1 and 0 steps (states.py:148; an empty window trains nothing). At the
  published K = 25 the two agree on the first 500 epochs (starts 0 .. 19; the reference's
  loop repeats its 300 steps without end, script.sh:134, train.py:931-936, so its schedule
  goes on); a roll-back cycle is then 20 x 25 epochs here, 24 x 25 iterations there.
  Without `roll_back` the window stays at the last one that fits, where the reference's
  stays empty.
- A window longer than the steps it may lie in is cut to them (K = 4: steps 0 and 1), as
  the reference cuts its windows (states.py:148); K <= `untrained_last_steps` (where the
  reference has no step to train) trains step 0.
- An update spans whole groups: `train_batch_size` groups per minibatch, so the default (1
  group of 12, accumulation 1) updates once per group, where the reference steps its
  optimizer after every 3 trajectories (`gradient_accumulation_steps` 3 counts trajectories,
  script.sh:68, train.py:543, :606-610): four updates per group of 12.
- Trained steps are replayed in the runner's shuffled order (the reference replays them
  in order, train.py:544); an update spans the same steps either way.
- The adapter is a LoRA at `TrainingConfig`'s rank and alpha; the reference trains every
  weight of the FLUX transformer (train.py:778-818).
- The sigmas are the model's scheduler's, where the reference shifts linspace(1, 0, K + 1)
  by 3 itself (train.py:187-189, script.sh:151), as zoo/kernels.py does for DanceGRPO.
- ODE steps have no density, so their recorded log-probs are NaN (never read); the
  reference records a number there (sampling.py:201-208) that it never reads either.
- On LCM, whose noise the schedule fixes (`zoo.kernels.LCMKernel`), the steps outside the
  window are sampled with that noise, not an ODE; the window is still the steps trained.
- Left out (beyond the published run): the "random", "decay" and "exp_decay" window
  strategies (states.py:100-130, with `max_iters_per_group`/`min_iters_per_group` 10/1,
  script.sh:166-167, which "progressive" does not read), the DPM-Solver sampling after the
  window and the MixGRPO-Flash scripts (`dpm_algorithm_type` "null" in the published run,
  script.sh:75; sampling.py:29-60, :99-144), trimmed advantages (`trimmed_ratio` 0,
  script.sh:61), the advantage re-ordering (`advantage_rerange_strategy`, "null" by default,
  train.py:529-539, :1275-1280), `training_strategy "all"` with `timestep_fraction` and
  `frozen_init_timesteps` (DanceGRPO's mode, train.py:521-527: the published 0.6, script.sh:71,
  is unread by "part"), and the sum of per-reward advantages (detail 5; stepzoo scores one
  reward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from zoo.algorithm import (
    EpochContext, LossInputs, ReplayAlgorithm, SamplingNeeds, TrainingConfig, check_field_rules, ppo_clip_loss,
)
from zoo.grpo import _FIELD_RULES as GRPO_FIELD_RULES
from zoo.stat_tracking import NoStatTracker

_FIELD_RULES = (
    ("group_size", "must be at least 2 (the unbiased std of one reward is undefined)", lambda v: v >= 2),
    ("window_size", "must be at least 1", lambda v: v >= 1),
    ("window_stride", "must be at least 1", lambda v: v >= 1),
    ("epochs_per_window", "must be at least 1", lambda v: v >= 1),
    ("untrained_last_steps", "must be non-negative", lambda v: v >= 0),
    *(rule for rule in GRPO_FIELD_RULES if rule[0] in ("std_epsilon", "clip_range", "adv_clip_max")),
    ("kl_coeff", "must be non-negative (0 drops the term)", lambda v: v >= 0),
)
"""(field, rule, predicate): the values of its own fields that `MixGRPOConfig` refuses."""


@dataclass(frozen=True)
class MixGRPOConfig(TrainingConfig):
    """MixGRPO's hyperparameters; defaults are the published run's
    (scripts/finetune/finetune_flux_grpo_MixGRPO.sh at e5cdd6a); shared fields are
    re-declared where it differs from `TrainingConfig`'s."""

    learning_rate: float = 1e-5
    """AdamW learning rate (the published run's, for every weight of FLUX.1-dev)."""
    sampler: Literal["ddim", "lcm", "flow"] = "flow"
    """Sampler whose transitions are trained on (the reference's: Flow-GRPO's SDE on FLUX)."""
    num_steps: int = 25
    """Sampling steps K during training (the published run's)."""
    guidance_scale: float = 3.5
    """Classifier-free guidance scale; FLUX.1-dev's embedded guidance (the reference's 3.5, without CFG)."""
    eta: float = 0.7
    """The SDE's noise level inside the window (Flow-GRPO's, the published run's); DDIM's eta with the ddim sampler."""
    group_size: int = 12
    """G: trajectories per group, one prompt each (the reference's num_generations); a group is its own baseline."""
    shared_noise: bool = True
    """Whether a group's trajectories start from one x_T (the reference's init_same_noise)."""
    window_size: int = 4
    """Consecutive steps sampled with the SDE and trained each epoch (the reference's group_size), at most those windowed."""
    window_stride: int = 1
    """Steps the window moves each time (the reference's prog_overlap_step with prog_overlap; its window size without)."""
    epochs_per_window: int = 25
    """Epochs the window stays at each position (the reference's iters_per_group, an iteration being an epoch here)."""
    roll_back: bool = True
    """Whether the window starts again at step 0 after the last position that fits; otherwise it stays there."""
    untrained_last_steps: int = 2
    """Last steps never in the window (always the ODE): the reference's windows end before step K - 2, so 2."""
    std_epsilon: float = 1e-8
    """Added to the group's std before dividing, so that a group of equal rewards gets advantages 0."""
    clip_range: float = 1e-4
    """PPO clip range: the ratio is clamped to [1 - clip_range, 1 + clip_range]."""
    adv_clip_max: float = 5.0
    """Advantages are clamped to [-adv_clip_max, adv_clip_max] in the loss."""
    kl_coeff: float = 0.0
    """Weight of 0.5·mean((logp - old_logp)²), the squared log-ratio to the sampling policy, added to the loss."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_rules(self, _FIELD_RULES)

    @property
    def windowed_steps(self) -> int:
        """Steps a window may lie in, 0 .. this - 1: K - `untrained_last_steps`, at least 1."""
        return max(1, self.num_steps - self.untrained_last_steps)

    @property
    def trained_steps_per_trajectory(self) -> int:
        """The window's steps: `window_size`, or all the steps a window may lie in when fewer."""
        return min(self.window_size, self.windowed_steps)

    def build(self) -> "MixGRPO":
        return MixGRPO(self)


class MixGRPO(ReplayAlgorithm):
    def __init__(self, config: MixGRPOConfig):
        self.config = config
        # The window's steps are trained in each trajectory's own shuffled order, as GRPO's.
        self.needs = SamplingNeeds(
            group_size=config.group_size, shared_noise=config.shared_noise, same_step_order_in_group=False,
        )

    def window_start(self, epoch: int) -> int:
        """The first step of epoch `epoch`'s window (details 1, 2): the window's positions are
        0, stride, 2·stride, ... while the window fits; the start moves one position every
        `epochs_per_window` epochs and rolls back to 0 (or stays) after the last."""
        c = self.config
        positions = (c.windowed_steps - c.trained_steps_per_trajectory) // c.window_stride + 1
        moves = epoch // c.epochs_per_window
        position = moves % positions if c.roll_back else min(moves, positions - 1)
        return position * c.window_stride

    def window(self, epoch: int) -> torch.Tensor:
        """(S,) long: the steps of epoch `epoch`'s window."""
        return self.window_start(epoch) + torch.arange(self.config.trained_steps_per_trajectory)

    def noise_levels(self, context: EpochContext, num_steps: int) -> torch.Tensor:
        """(K,) float64: `eta` at the window's steps, 0 (the ODE) at every other."""
        if num_steps != self.config.num_steps:
            raise ValueError(f"MixGRPO is configured for {self.config.num_steps} steps, the sampler has {num_steps}")
        levels = torch.zeros(num_steps, dtype=torch.float64)
        levels[self.window(context.epoch)] = self.config.eta
        return levels

    def trained_steps(self, context: EpochContext, num_prompts: int, group_size: int) -> torch.Tensor:
        """(P, G, S): the window's steps for every trajectory; nothing is drawn."""
        return self.window(context.epoch).repeat(num_prompts, group_size, 1)

    def new_tracker(self) -> NoStatTracker:
        return NoStatTracker()

    @torch.no_grad()
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: NoStatTracker) -> torch.Tensor:
        """returns: (P, G) final-image rewards -> (P, G, K) advantages, constant along K,
        normalised within each group by its mean and unbiased std."""
        rewards = returns.to(torch.float64)
        mean = rewards.mean(dim=1, keepdim=True)
        std = rewards.std(dim=1, correction=1, keepdim=True)
        advantages = (rewards - mean) / (std + self.config.std_epsilon)
        return advantages.to(returns.dtype)[:, :, None].expand(-1, -1, self.config.num_steps).clone()

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        policy_loss, clip_metrics = ppo_clip_loss(inputs, c.clip_range, c.adv_clip_max)  # over (p, G, S)
        loss = policy_loss
        if c.kl_coeff > 0:
            loss = policy_loss + c.kl_coeff * 0.5 * ((inputs.log_probs - inputs.old_log_probs) ** 2).mean()
        return loss, {"loss": loss.detach(), "policy_loss": policy_loss.detach(), **clip_metrics}
