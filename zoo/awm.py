"""AWM: Advantage Weighted Matching, the flow-matching loss on the clean samples, weighted by
their advantages.

Paper: Xue, Ge, Zhang, Li, Ma, "Advantage Weighted Matching: Aligning RL with Pretraining in
Diffusion Models" (arXiv 2509.25050).
Reference code: the authors' scxue/advantage_weighted_matching at be51372 (2026-03-27),
`advantage_weighted_matching/scripts/train_sd3_awm.py` (below "train"),
`config/dgx_awm.py` ("dgx", its `pickscore_sd3_no_cfg_1node`, whose values are the defaults
here), `config/base_awm.py` ("base") and `flow_grpo/stat_tracking.py`; on SD3.5-Medium, a
flow-matching model. Second reference: X-GenGroup/Flow-Factory at a0b2bc5
(`src/flow_factory/trainers/awm.py`, "ff", `examples/awm/lora/sd3_5/default.yaml`,
"ff-yaml"), where it differs (last deviation). Line numbers are those files' at those commits.

The loss. On the forward process x_σ = (1-σ)·x0 + σ·ε of each sampled clean latent x0, the
reference scores the velocity prediction v̂ against v = ε - x0 by a "log-probability"
log p = -w(mean((v̂ - v)²), σ) (the negative flow-matching loss under a weighting w; train:210-252)
and puts it in GRPO's PPO-clip in place of a transition's log-prob: ratio = exp(log p - log p_old),
loss = mean(max(-A·ratio, -A·clamp(ratio, 1 ± clip_range))). Sampling with the current
weights and taking one optimizer step per epoch, log p_old is log p itself, detached
(train:1282-1284), so ratio = 1 and the gradient is A·∇w: the advantage-weighted matching
loss, pretraining's loss with each sample weighted by its advantage.

Model families. The reference's model is a rectified flow; on a flow model (`sampler` flow)
every quantity here is the reference's: σ is the forward process's (`ForwardLossInputs.x0_scale`
is σ there), the prediction and target are v̂ and ε - x0. An ε-prediction UNet (`sampler`
ddim or lcm) noises x_t = a·x0 + s·ε (a = sqrt(ᾱ_t), s = sqrt(1-ᾱ_t)); dividing by a + s
makes it a rectified flow at σ̃ = s/(a+s) with the same x0 and ε: x_t/(a+s) = (1-σ̃)·x0 + σ̃·ε.
With c = s/a (the UNet's `x0_scale`), σ̃ = c/(1+c), and the velocity the UNet implies there is
v̂ = ε̂ - x̂0(ε̂), x̂0(ε̂) = (x_t - s·ε̂)/a, so v̂ - v = (ε̂ - ε) - (x̂0 - x0) = (1+c)·(ε̂ - ε): the
loss and both KL terms below are the reference's of that rectified flow, σ̃ in place of σ and
(1+c)·(ε̂ - ε) in place of v̂ - v (`flow_view`; tests/test_algo_awm.py checks it against the
reference's formula on the reparametrised model).

Implementation details:
1. Data: each trajectory's final clean latent x0 (`Trajectory.final_latents`; train:1209) and
   the reward of its image, one reward call per trajectory. No log-prob is read, so any
   sampler produces the data, deterministic DDIM included (the reference samples with
   SA-Solver at noise level 0, the ODE: dgx:326-327, :349).
2. Sampling policy: the current weights (`off_policy = False`, dgx:347; train:883-904 samples
   with the EMA adapter only when it is on, and `off_policy=True` here does the same).
3. Advantages (train:1013-1041, stat_tracking.py:12-32): A = (r - mean of the prompt's rewards
   in the gathered batch) / (population std of the whole gathered batch + 1e-4) (`global_std`,
   dgx:350); the tracker is cleared every epoch (train:1039), so no history. Then A is
   clipped to ±adv_clip_max and scaled to advantage_max: A·advantage_max/adv_clip_max
   (train:1293-1299), adv_clip_max 5 (base:91), advantage_max 1 (dgx:336): A/5 in [-1, 1].
   G = 24 trajectories per prompt, each from its own x_T (dgx:323).
4. Timesteps (train:1172-1180, `time_type = "discrete"`, dgx:367): `train_timesteps` S = 6
   (dgx:334) of the sampler's own K = 14 steps (dgx:315), stratified: boundaries =
   linspace(first, int(K·timestep_fraction), S + 1) truncated to integers, one step drawn
   uniformly in each [lower, upper) (the lower bound where the stratum is empty); first = 0,
   or 1 with `discrete_wo_init` (train:1197-1205, GenEval's and OCR's, dgx:88, :228),
   which never trains the pure-noise step; timestep_fraction 0.9 (dgx:338). At K = 14: one
   step of each pair 0-1, 2-3, ..., 10-11; steps 12 and 13 are never trained. Fewer steps
   than S repeat steps (at K = 4, 0.9: steps 0, 0, 1, 1, 2, 2), as the reference's formula
   does. x_σ from x0 with fresh ε per (sample, timestep) (train:1215-1220, :1232).
5. Weighted log-probability (train:234-252): e = mean over the latent of (v̂ - v)²; with t = σ
   (the scheduler's t / 1000), `weighting` uniform: -e; t: -e·t; t-squared: -e·t²; huber:
   -(sqrt(e + 1e-10) - 1e-5)·t; ghuber (published, dgx:341, power 0.25, :342):
   -((e + 1e-10)^p - (1e-10)^p)·t/p. Computed in float64 (train:236-237).
6. Policy loss (`loss_type = "exp_first"`, dgx:339; train:1305-1327): per (sample, timestep)
   ratio = exp(log p - log p_old), mean of max(-A·ratio, -A·clamp(ratio, 1 - clip_range,
   1 + clip_range)), clip_range 1 (dgx:365). log p_old: log p detached (on-policy,
   train:1282-1284), or under the EMA adapter with `off_policy` (train:1233-1238).
7. KL to the base model (train:1272-1275, :1330-1340; `kl_weight = "Uniform"`, dgx:335):
   kl_weight·mean((v̂ - v̂_base)²), the base being the adapter disabled, without guidance
   (`train.cfg = False`, base:89); kl_weight = `train.beta` 1e-4 (dgx:333; 1e-3 GenEval,
   :55, 3e-3 OCR, :194).
8. KL to an EMA of the adapter (train:1276-1280, :1341-1352; `kl_ema_weight = "Uniform"`,
   dgx:343): ema_kl_weight·mean((v̂ - v̂_ema)²), ema_kl_weight = `ema_beta` 1 (dgx:345). The
   EMA adapter starts as a copy of the LoRA (train:649-658) and after each epoch's updates
   becomes d·ema + (1-d)·current, d = min(ema_decay, 0.001·s) (`linear`) or ema_decay
   (`constant`), s the optimizer steps so far (train:1409-1419); ema_decay = `kl_ema_decay`
   0.3 (dgx:344), linear (:346). Here it is the runner's old policy
   (`ForwardProcessAlgorithm.needs_old_policy`), which the current weights' sampling leaves
   alone (`samples_with_old_policy` off) unless `off_policy`.
9. Accumulation: the reference accumulates every minibatch of the epoch into one optimizer
   step (dgx:330), 36 minibatches of 2 samples per GPU, each with its 6 timesteps: 72
   trajectories per GPU per update. Here 3 groups of 24, one group per minibatch, and one loss
   call (one backward pass) per trained timestep: `loss_calls_per_update` = 3 x 6. Grad-norm
   clip 1.0 (base:83).
10. Optimizer: AdamW lr 3e-4 (dgx:340), weight decay 1e-4 (base:76), betas and epsilon
    `TrainingConfig`'s (base:72-78); LoRA rank 32, alpha 64 (train:632-637). Training
    predictions without classifier-free guidance (base:89), sampling at guidance 1 (dgx:317).
11. Metrics: loss, policy_loss (the reference's), matching_loss = mean(-log p), clipfrac =
    mean(|ratio - 1| > clip_range) (train:1356-1362), ref_deviation = mean((v̂ - v̂_base)²)
    (its kl_loss before β) with kl_weight > 0, old_deviation = mean((v̂ - v̂_ema)²) (its
    ema_kl_loss before ema_beta) when the EMA is kept.

Deliberate deviations:
- ε-prediction models (every UNet preset) have no reference: the rectified-flow view above is
  stepzoo's reading, which makes the loss the reference's on the same x_t, x0 and ε.
- With several optimizer steps in an epoch (the tiny preset takes 8), log p_old is still
  log p detached at every step: the reference's later steps of an epoch read log-probs made
  before the epoch's first step, under the sampling weights (train:1226-1238). Its published
  configurations take one step per epoch, where the two agree; a third adapter state (the
  weights the epoch started from, beside the current ones and the EMA) would be needed
  otherwise, which the interface does not keep.
- Timesteps are drawn per trajectory once per epoch (`Algorithm.trained_steps`, from the
  epoch's generator) and trained one per loss call in the runner's shuffled order; the
  reference draws one set per minibatch, shared by its samples (train:1176-1179), and trains
  a minibatch's 6 timesteps in one batched call. An optimizer step spans every (trajectory,
  timestep) of its minibatches either way.
- Only the discrete time samplings. The continuous ones (`logit_normal`, `uniform`,
  train:1138-1170) draw σ off the sampler's grid, and a forward-process loss call noises at
  the sampler's own timesteps; `discrete_with_init` (train:1181-1196) is in no published
  configuration. Where int(K·timestep_fraction) leaves no step to draw from (K = 1, or
  K <= 2 without the first step), the range is widened to one step.
- The EMA term is on whenever ema_kl_weight > 0, as Flow-Factory has it (ff:523-537); the
  reference adds it only when β > 0 (train:1330-1352), as every published configuration has.
- Only the `Uniform` KL weightings (published); `ELBO` (train:1334-1335, :1343-1344), only
  `exp_first` (published; `sum_first` averages log p over a sample's timesteps before the
  ratio, train:1301-1304, which needs all of them in one loss call), only `global_std`.
- The reference also keeps an EMA for evaluation and saving (`train.ema`, decay 0.99, dgx:337,
  :370; train:647, :1391-1392), apart from the KL's: that is the runner's `--ema.decay 0.99`
  here, off by default, so that the trained weights are evaluated. Its learning-rate
  schedule (cosine over 1e10 steps to lr/3, dgx:369, train:688-704) is constant in practice:
  constant here. It skips its first two epochs (train:880-881); not here.
- Minibatches hold whole groups (the runner's unit), and a group lives on one process; the
  reference spreads a prompt's 24 samples over its GPUs and shuffles single samples into
  minibatches of 2 (dgx:329). Zero-advantage samples are trained on, as in the reference
  (train:1074-1077).
- With a guided sampler (a preset that samples every algorithm with CFG) the data come from
  the guided policy while the loss's predictions are unguided; the reference samples at
  guidance 1.
- Flow-Factory's SD3.5 example differs from the authors' code in three defaults, which
  follow the authors': it clips A to ±1 without the division by 5 (ff-yaml:54, ff:466-469),
  draws `discrete_wo_init` timesteps for PickScore (ff-yaml:49) and samples groups of 16
  (ff-yaml:75).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from zoo.algorithm import (
    EpochContext, ForwardLossInputs, ForwardProcessAlgorithm, SamplingNeeds, TrainingConfig, check_field_rules,
)
from zoo.stat_tracking import NoStatTracker

STD_EPS = 1e-4
"""Added to the batch's reward std (flow_grpo/stat_tracking.py:28)."""
LOG_EPS = 1e-10
"""Added to the squared error under the (generalised) Huber weightings (train_sd3_awm.py:247, :249)."""
HUBER_OFFSET = 1e-5
"""Subtracted from the Huber weighting's root (train_sd3_awm.py:247)."""
EMA_DECAY_RATE = 0.001
"""The linear schedule's growth of the EMA's decay per optimizer step (train_sd3_awm.py:1413)."""

Weighting = Literal["uniform", "t", "t-squared", "huber", "ghuber"]
TimeSampling = Literal["discrete", "discrete-wo-init"]

_FIELD_RULES = (
    ("group_size", "must be at least 1", lambda v: v >= 1),
    ("adv_clip_max", "must be positive", lambda v: v > 0),
    ("advantage_max", "must be positive", lambda v: v > 0),
    ("clip_range", "must be positive", lambda v: v > 0),
    ("kl_weight", "must be non-negative (0 skips the base model's prediction)", lambda v: v >= 0),
    ("ema_kl_weight", "must be non-negative (0 keeps no EMA unless off_policy)", lambda v: v >= 0),
    ("ema_decay", "must lie in [0, 1) (1 would freeze the EMA)", lambda v: 0 <= v < 1),
    ("ghuber_power", "must be positive", lambda v: v > 0),
    ("train_timesteps", "must be at least 1", lambda v: v >= 1),
    ("timestep_fraction", "must lie in (0, 1]", lambda v: 0 < v <= 1),
)
"""(field, rule, predicate): the values of its own fields that `AWMConfig` refuses."""


@dataclass(frozen=True)
class AWMConfig(TrainingConfig):
    """AWM's hyperparameters; defaults are scxue/advantage_weighted_matching's (be51372)
    PickScore configuration (`config/dgx_awm.py:pickscore_sd3_no_cfg_1node` on
    `config/base_awm.py`), whose optimizer fields equal `TrainingConfig`'s."""

    group_size: int = 24
    """G: images of each prompt an epoch, sampled from independent starting noises (dgx_awm.py:323)."""
    num_steps: int = 14
    """K: the sampler's steps in training, whose timesteps the trained ones are drawn among (dgx_awm.py:315)."""
    eta: float = 0.0
    """Sampler noise (DDIM's eta, or the flow SDE's level); 0, the ODE, as the PickScore run samples (dgx_awm.py:326)."""
    guidance_scale: float = 1.0
    """CFG of the sampler (dgx_awm.py:317: none); the loss's predictions are always unguided (base_awm.py:89)."""
    train_batch_size: int = 1
    """Groups in a minibatch on each process; the reference's minibatches of 2 samples cut groups (dgx_awm.py:329)."""
    gradient_accumulation_steps: int = 3
    """Minibatches an optimizer step accumulates, each with all its drawn timesteps: 3 x 24 = the 72 trajectories per GPU of the reference's one update an epoch (dgx_awm.py:322-330)."""
    lora_rank: int = 32
    """Rank of the adapter (train_sd3_awm.py:633)."""
    lora_alpha: float = 64.0
    """Alpha of the adapter, scaled by alpha / rank (train_sd3_awm.py:634)."""
    train_timesteps: int = 6
    """S: timesteps trained per trajectory, one per stratum of the sampler's steps (dgx_awm.py:334)."""
    timestep_fraction: float = 0.9
    """The strata cover the first int(K·timestep_fraction) sampling steps (dgx_awm.py:338)."""
    time_sampling: TimeSampling = "discrete"
    """discrete: the strata start at the first (noisiest) step (dgx_awm.py:367); discrete-wo-init: at the second (GenEval's and OCR's, dgx_awm.py:88)."""
    weighting: Weighting = "ghuber"
    """Time weighting of the matching log-probability (dgx_awm.py:341; train_sd3_awm.py:240-251)."""
    ghuber_power: float = 0.25
    """Power p of the generalised Huber weighting, -((e + 1e-10)^p - 1e-10^p)·σ/p (dgx_awm.py:342)."""
    adv_clip_max: float = 5.0
    """Normalised rewards are clipped to ±adv_clip_max (base_awm.py:91) ..."""
    advantage_max: float = 1.0
    """... then scaled by advantage_max / adv_clip_max, so advantages lie in ±advantage_max (dgx_awm.py:336)."""
    clip_range: float = 1.0
    """PPO clip range of the matching ratio: clamped to [1 - clip_range, 1 + clip_range] (dgx_awm.py:365)."""
    kl_weight: float = 1e-4
    """β of mean((v̂_θ - v̂_base)²), the base being the adapter disabled (`train.beta`, dgx_awm.py:333); 0 skips that UNet pass."""
    ema_kl_weight: float = 1.0
    """Of mean((v̂_θ - v̂_ema)²) against the EMA of the adapter (`ema_beta`, dgx_awm.py:345); 0 keeps no EMA (unless off_policy)."""
    ema_decay: float = 0.3
    """Cap on the share of itself the EMA keeps at each epoch's end (`kl_ema_decay`, dgx_awm.py:344)."""
    ema_decay_schedule: Literal["linear", "constant"] = "linear"
    """linear: the EMA keeps min(ema_decay, 0.001·optimizer steps) of itself after an epoch; constant: ema_decay (dgx_awm.py:346, train_sd3_awm.py:1410-1413)."""
    off_policy: bool = False
    """Sample with the EMA and take the ratio against it, instead of the current weights (dgx_awm.py:347)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_rules(self, _FIELD_RULES)
        if self.time_sampling == "discrete-wo-init" and self.num_steps < 2:
            raise ValueError(f"time_sampling discrete-wo-init leaves no step of num_steps {self.num_steps} to train.")

    def build(self) -> "AWM":
        return AWM(self)

    @property
    def reads_log_probs(self) -> bool:
        """No: the loss reads the final latents alone, so an ODE sampler (DDIM at eta 0) may sample them."""
        return False

    @property
    def trained_steps_per_trajectory(self) -> int:
        """S = `train_timesteps`, whatever K."""
        return self.train_timesteps


def ema_decay(config: AWMConfig, optimizer_updates: int) -> float:
    """d: the share of itself the EMA keeps after `optimizer_updates` steps in all."""
    if config.ema_decay_schedule == "constant":
        return config.ema_decay
    return min(config.ema_decay, EMA_DECAY_RATE * optimizer_updates)


def flow_view(x0_scale: torch.Tensor, epsilon_model: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ, velocity scale) of each example (p, G): a flow model's σ (its `x0_scale`) and 1; for
    an ε-prediction model with x0_scale c = s/a, the rectified flow of the same x_t, σ̃ =
    c/(1+c), whose velocity error is (1+c)·(ε̂ - ε) (module docstring)."""
    scale = x0_scale.to(torch.float64)
    if epsilon_model:
        return scale / (1 + scale), 1 + scale
    return scale, torch.ones_like(scale)


def matching_log_prob(
    prediction: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, velocity_scale: torch.Tensor,
    weighting: Weighting, power: float,
) -> torch.Tensor:
    """log p = -w(e, σ) per example, e = mean over the latent of (velocity_scale·(prediction -
    target))²: (p, G, C, h, w) and (p, G) in, (p, G) float64 out (module docstring, 5)."""
    error = velocity_scale[..., None, None, None] * (prediction.to(torch.float64) - target.to(torch.float64))
    squared = (error**2).flatten(2).mean(-1)
    if weighting == "uniform":
        return -squared
    if weighting == "t":
        return -squared * sigma
    if weighting == "t-squared":
        return -squared * sigma**2
    if weighting == "huber":
        return -((squared + LOG_EPS).sqrt() - HUBER_OFFSET) * sigma
    return -((squared + LOG_EPS) ** power - LOG_EPS**power) * sigma / power


class AWM(ForwardProcessAlgorithm):
    def __init__(self, config: AWMConfig):
        self.config = config
        self.needs = SamplingNeeds(
            group_size=config.group_size,
            shared_noise=False,
            same_step_order_in_group=False,
            reference_prediction=config.kl_weight > 0,
        )
        # The EMA adapter: read by the loss (its KL term, or the ratio off-policy), sampling
        # only off-policy.
        self.needs_old_policy = config.off_policy or config.ema_kl_weight > 0
        self.samples_with_old_policy = config.off_policy

    def trained_steps(self, context: EpochContext, num_prompts: int, group_size: int) -> torch.Tensor:
        """(P, G, train_timesteps) sampling steps, one drawn uniformly in each stratum of the
        first int(K·timestep_fraction) steps (module docstring, 4)."""
        c = self.config
        first = 0 if c.time_sampling == "discrete" else 1
        last = max(int(c.num_steps * c.timestep_fraction), first + 1)
        bounds = torch.linspace(first, last, c.train_timesteps + 1).long()
        lower, width = bounds[:-1], bounds[1:] - bounds[:-1]
        draws = torch.rand(num_prompts, group_size, c.train_timesteps, generator=context.generator)
        return lower + (draws * width).long()

    def new_tracker(self) -> NoStatTracker:
        return NoStatTracker()

    @torch.no_grad()
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: NoStatTracker) -> torch.Tensor:
        """returns: (P, G) final-image rewards of the gathered batch -> (P, G, K) advantages
        advantage_max·clip(A, ±adv_clip_max)/adv_clip_max, constant along K (module docstring, 3)."""
        c = self.config
        rewards = returns.to(torch.float64)
        index = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        prompt_ids = torch.tensor([index[prompt] for prompt in prompts])
        member = torch.nn.functional.one_hot(prompt_ids, len(index)).to(rewards)  # (P, U): prompt of each group
        prompt_means = (member.T @ rewards.sum(1)) / (member.sum(0) * rewards.shape[1])  # (U,)
        normalised = (rewards - (member @ prompt_means)[:, None]) / (rewards.std(correction=0) + STD_EPS)
        scaled = normalised.clamp(-c.adv_clip_max, c.adv_clip_max) * (c.advantage_max / c.adv_clip_max)
        return scaled.to(returns.dtype)[:, :, None].expand(-1, -1, c.num_steps).clone()

    def loss(self, inputs: ForwardLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        sigma, velocity_scale = flow_view(inputs.x0_scale, epsilon_model=c.sampler != "flow")

        def log_prob(prediction: torch.Tensor) -> torch.Tensor:
            return matching_log_prob(prediction, inputs.target, sigma, velocity_scale, c.weighting, c.ghuber_power)

        def deviation(other: torch.Tensor) -> torch.Tensor:
            difference = velocity_scale[..., None, None, None] * (inputs.prediction - other.detach())
            return (difference**2).mean()

        old = inputs.old_prediction
        if self.needs_old_policy and old is None:
            raise ValueError("AWM's loss with an EMA (ema_kl_weight > 0 or off_policy) needs old_prediction.")
        log_p = log_prob(inputs.prediction)  # (p, G)
        old_log_p = log_prob(old.detach()) if c.off_policy else log_p.detach()
        ratio = torch.exp(log_p - old_log_p)
        advantages = inputs.advantages.to(torch.float64)
        clipped = ratio.clamp(1 - c.clip_range, 1 + c.clip_range)
        policy_loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
        loss = policy_loss
        metrics = {
            "policy_loss": policy_loss.detach(),
            "matching_loss": -log_p.detach().mean(),
            "clipfrac": ((ratio.detach() - 1).abs() > c.clip_range).to(torch.float64).mean(),
        }
        if c.kl_weight > 0:
            if inputs.ref_prediction is None:
                raise ValueError("AWM's loss with kl_weight > 0 needs ref_prediction: the base model's prediction.")
            ref_deviation = deviation(inputs.ref_prediction)
            loss = loss + c.kl_weight * ref_deviation
            metrics["ref_deviation"] = ref_deviation.detach()
        if self.needs_old_policy:
            old_deviation = deviation(old)
            loss = loss + c.ema_kl_weight * old_deviation
            metrics["old_deviation"] = old_deviation.detach()
        metrics = {name: value.float() for name, value in metrics.items()}
        metrics["loss"] = loss.detach().float()
        return loss.float(), metrics

    @torch.no_grad()
    def next_old_policy(
        self, old: dict[str, torch.Tensor], current: dict[str, torch.Tensor], optimizer_updates: int
    ) -> dict[str, torch.Tensor]:
        """The EMA: ema <- d·ema + (1-d)·current, d = `ema_decay` of the steps taken so far."""
        decay = ema_decay(self.config, optimizer_updates)
        return {name: decay * old[name] + (1 - decay) * current[name] for name in current}
