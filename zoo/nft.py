"""DiffusionNFT: supervised training on the forward process of clean samples, weighted by
their rewards through implicit positive and negative policies.

Paper: Zheng, Chen, Ye, Wang, Zhang, Jiang, Su, Ermon, Zhu, Liu, "DiffusionNFT: Online
Diffusion Reinforcement with Forward Process" (arXiv 2509.16117).
Reference code: NVlabs/DiffusionNFT at 24af555 (`scripts/train_nft_sd3.py`, `config/nft.py`,
`config/base.py`, `flow_grpo/stat_tracking.py`), on SD3.5-Medium, a flow-matching model.
Line numbers below are those files' at that commit.

The ε-prediction form. The paper and its code are written for rectified flow,
x_t = (1-t)·x0 + t·ε, whose model predicts the velocity v = ε - x0 and whose clean-sample
estimate is x̂0(v̂) = x_t - t·v̂. The UNets here predict noise on the variance-preserving
process x_t = a·x0 + s·ε, a = sqrt(ᾱ_t), s = sqrt(1-ᾱ_t), with x̂0(ε̂) = (x_t - s·ε̂)/a.
1. At fixed (x_t, t) both x̂0 maps are affine in the prediction with one scalar slope
   (-t, -s/a). An affine map keeps every combination whose weights sum to 1, and both
   implicit policies are such combinations ((1-β) + β = 1, (1+β) - β = 1), so
   x̂0(u⁺) = (1-β)·x̂0(u_old) + β·x̂0(u_θ), and the same for u⁻: mixing velocities, noise
   predictions or x̂0 predictions defines the same implicit policies. In ε-form:
     ε⁺ = (1-β)·ε_old + β·ε_θ,    ε⁻ = (1+β)·ε_old - β·ε_θ.
2. The target: x̂0(ε̂) - x0 = (a·x0 + s·ε - s·ε̂)/a - x0 = -(s/a)·(ε̂ - ε), as in flow
   x̂0(v̂) - x0 = -t·(v̂ - (ε - x0)). So u* = ε, and ||ε̂ - ε||² is the x0 error over (s/a)²,
   as ||v̂ - v||² is over t².
3. The reference measures the loss on x̂0 with an adaptive weight (below, detail 6):
   ℓ(û) = mean(|x̂0(û) - x0|²) / sg(max(mean|x̂0(û) - x0|, 1e-5)). With e = ε̂ - ε and
   c = s/a this is ℓ = c²·mean(e²) / sg(max(c·mean|e|, 1e-5)), the same number for the
   same x̂0: ALGORITHMS.md's p·||u⁺ - u*||² + (1-p)·||u⁻ - u*||² with each term weighted by
   c²/sg(max(c·mean|e|, 1e-5)) from its own error. What changes from the flow model is
   only the forward process x_t is drawn from (the model's own) and c (t there, s/a here).
4. Gradient: ∂ℓ/∂ε̂ = 2c²·e / (n·W) (n = C·h·w, W the detached weight), and ∂ε⁺/∂ε_θ = β,
   ∂ε⁻/∂ε_θ = -β, so with the reference's factor 1/β the step does not scale with β. At
   θ = old (ε⁺ = ε⁻ = ε_old) the gradient is adv_clip_max·(2p - 1)·∂ℓ = clip(A, ±adv_clip_max)·∂ℓ:
   the clipped advantage weighting the denoising loss, so a sample at its prompt's mean
   reward (p = 1/2) gives none; away from old the two terms differ and pull θ back to it.
   p = 1 alone moves ε_θ toward old + (ε - old)/β, p = 0 alone toward old - (ε - old)/β.

Against docs/ALGORITHMS.md: its p (with Z as above), u⁺, u⁻ and u* = ε are the code's; the
code adds, and this module keeps, the adaptive x0-space weight of each term, the factor
adv_clip_max/β and the KL to the base model; its old policy is an EMA whose decay grows with
the optimizer steps taken (detail 8).

Implementation details:
1. Data: each trajectory's final clean latent x0 (`Trajectory.final_latents`, the latent
   its image decodes) and the reward of that image, one reward call per trajectory. No
   log-prob is read, so any sampler produces the data, deterministic DDIM included (the
   reference samples with a deterministic second-order solver, `config/nft.py:65-66`).
2. Sampling policy: the old policy (`next_old_policy`), not the current weights
   (`train_nft_sd3.py:640-659`, adapter "old"); it starts as a copy of the current weights
   (:576-579).
3. Optimality probability: A = (r - mean of the prompt's rewards in the gathered batch) /
   (population std of the whole gathered batch + 1e-4) (`flow_grpo/stat_tracking.py:26-31`
   with `sample.global_std = True`, `config/base.py:57`; the tracker is cleared every
   epoch, `train_nft_sd3.py:769`, so no history); p = clamp(clamp(A, ±adv_clip_max) /
   adv_clip_max / 2 + 1/2, 0, 1) (:910-914, :928-929) = 1/2 + 1/2·clip((r - mean)/Z, -1, 1)
   with Z = adv_clip_max·(std + 1e-4), adv_clip_max = 5 (`config/base.py:84`). Groups of
   `group_size` trajectories per prompt, each from its own x_T (24: `config/nft.py:28`);
   the statistic is per prompt, so groups of one prompt drawn several times pool.
4. Timesteps: the sampler's own, each trajectory in its own random order, one per loss call
   (:806-816, :854-864); x_t from x0 with fresh ε per call (:868-870).
5. Predictions without classifier-free guidance (the reference trains and samples at
   guidance 1, `config/nft.py:64`): the old policy's (no gradient, :872-882) and the current
   weights' (:885-892); with kl_weight > 0 also the base model's, adapter disabled
   (:894-905).
6. Loss per sample (see above): ε⁺, ε⁻ (:934-937); adaptive x0-space weights (:939-957);
   policy loss = (adv_clip_max / β)·mean over the minibatch of p·ℓ(ε⁺) + (1-p)·ℓ(ε⁻)
   (:959-960); plus kl_weight·mean((ε_θ - ε_ref)²) (:966-970; `train.beta`, 1e-4,
   `config/nft.py:24`). β = 1 (`config/nft.py:61`; 0.1 for OCR and multi-reward, :77, :137).
7. Accumulation: every timestep of every accumulated minibatch, one backward pass each
   (:801, :983, :993): `loss_calls_per_update` = accumulation x K. Grad-norm clip 1.0 (:996).
8. Old policy after each epoch's updates: old <- d·old + (1-d)·current with
   d = min(rate·(s - delay), d_max) for s >= delay, else 0, s the optimizer steps so far
   (:169-189, :1034-1039); `decay_type` 1 (`config/nft.py:60`): delay 0, rate 0.001,
   d_max 0.5 (type 2, for OCR: 75, 0.0075, 0.999, `config/nft.py:78`).
9. Optimizer: AdamW, lr 3e-4, weight decay 1e-4 (`config/base.py:66`, :72); LoRA rank 32,
   alpha 64 (`train_nft_sd3.py:431`) on the attention projections.
10. Metrics: loss, policy_loss (the reference's), old_deviation = mean((ε_θ - ε_old)²)
    (its old_deviate), ref_deviation = mean((ε_θ - ε_ref)²) with kl_weight > 0 (its kl_div).

Deliberate deviations:
- Every trajectory trains on all K of its timesteps per inner epoch; the reference keeps
  int(0.99·K) of them (`train.timestep_fraction`, `config/base.py:87`, :569), leaving one
  random timestep per sample out at its K = 10.
- Evaluation and saved adapters use the current weights, as for every algorithm; the
  reference evaluates and saves an EMA of them (decay min((1+s)/(10+s), 0.9) per optimizer
  step, :565-567, :220-221, :342-343, `flow_grpo/ema.py:25-26`).
- A resume restores the old policy as it was; the reference reloads the saved (EMA)
  adapter into both the current and the old weights (:540-541).
- The KL term is on ε-predictions (the flow's is on velocities, a per-timestep factor apart).
- The adaptive weight is computed in float32; the reference's float64 weight promotes its
  loss to float64 (:943-947).
- Only the reference's `adv_mode = "all"` (`config/nft.py:62`) is implemented.
- Minibatches hold whole groups (the runner's unit); the reference shuffles single samples
  (:806-808) into minibatches of 9 per GPU, 16 accumulated into one update per epoch on 8
  GPUs (`config/nft.py:31-46`). The defaults here are one group per minibatch and 16
  minibatches per update.
- With a guided sampler (a preset that samples every algorithm with CFG) the data come from
  the guided policy while ε_old is the unguided one; the reference samples at guidance 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.algorithm import ForwardLossInputs, ForwardProcessAlgorithm, SamplingNeeds, TrainingConfig, check_field_rules
from zoo.stat_tracking import NoStatTracker

STD_EPS = 1e-4
"""Added to the batch's reward std (flow_grpo/stat_tracking.py:28), not zoo.stat_tracking's 1e-6."""
MIN_WEIGHT = 1e-5
"""Floor of the adaptive weight, in x0 units (train_nft_sd3.py:945)."""

_FIELD_RULES = (
    ("beta", "must be positive", lambda v: v > 0),
    ("adv_clip_max", "must be positive", lambda v: v > 0),
    ("kl_weight", "must be non-negative (0 skips the base model's prediction)", lambda v: v >= 0),
    ("group_size", "must be at least 1", lambda v: v >= 1),
    ("old_policy_decay_delay", "must be non-negative", lambda v: v >= 0),
    ("old_policy_decay_rate", "must be non-negative", lambda v: v >= 0),
    ("old_policy_decay_max", "must lie in [0, 1) (1 would freeze the old policy)", lambda v: 0 <= v < 1),
)
"""(field, rule, predicate): the values of its own fields that `NFTConfig` refuses."""


@dataclass(frozen=True)
class NFTConfig(TrainingConfig):
    """DiffusionNFT's hyperparameters; defaults are NVlabs/DiffusionNFT's (24af555) SD3.5
    configuration (`config/nft.py` on `config/base.py`), whose optimizer fields equal
    `TrainingConfig`'s."""

    train_batch_size: int = 1
    """Groups per minibatch, per process (one group of `group_size`; the reference's 9 samples per GPU split groups)."""
    gradient_accumulation_steps: int = 16
    """Minibatches per optimizer step, each contributing all K timesteps (config/nft.py:43-45 on 8 GPUs)."""
    lora_rank: int = 32
    """LoRA rank of the UNet adapter (train_nft_sd3.py:431)."""
    lora_alpha: float = 64.0
    """LoRA alpha (train_nft_sd3.py:431; the adapter's scale is alpha / rank)."""
    num_steps: int = 10
    """Sampling steps K during training; every one of them is a training timestep (config/nft.py:20)."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale at sampling (config/nft.py:64); training predictions never use guidance."""
    eta: float = 0.0
    """DDIM eta when `sampler` is ddim: 0 samples deterministically, as the reference's solver does (config/nft.py:65)."""
    beta: float = 1.0
    """β: the implicit policies are (1-β)·old + β·θ and (1+β)·old - β·θ (config/nft.py:61)."""
    adv_clip_max: float = 5.0
    """Normalised rewards are clipped to ±adv_clip_max before p = 1/2 + A/(2·adv_clip_max), so Z = adv_clip_max·(std + 1e-4) (config/base.py:84)."""
    kl_weight: float = 1e-4
    """Weight of mean((ε_θ - ε_base)²) against the base model (config/nft.py:24); 0 skips its UNet pass."""
    group_size: int = 24
    """Trajectories sampled per prompt, each from its own x_T (config/nft.py:28)."""
    old_policy_decay_delay: int = 0
    """Optimizer steps during which the old policy is set to the current weights after each epoch (train_nft_sd3.py:175)."""
    old_policy_decay_rate: float = 0.001
    """After the delay, the old policy keeps d = rate·(steps - delay) of itself, at most `old_policy_decay_max` (train_nft_sd3.py:176)."""
    old_policy_decay_max: float = 0.5
    """The most of itself the old policy keeps after an epoch (train_nft_sd3.py:177)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_rules(self, _FIELD_RULES)

    @property
    def reads_log_probs(self) -> bool:
        """NFT trains on clean samples only, so deterministic DDIM (eta = 0) may produce them."""
        return False

    def build(self) -> "NFT":
        return NFT(self)


def old_policy_decay(config: NFTConfig, optimizer_updates: int) -> float:
    """d: the share of itself the old policy keeps after `optimizer_updates` steps in all."""
    steps = optimizer_updates - config.old_policy_decay_delay
    if steps < 0:
        return 0.0
    return min(steps * config.old_policy_decay_rate, config.old_policy_decay_max)


def adaptive_x0_loss(error: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample mean(E²) / sg(max(mean|E|, 1e-5)) of the x0 error E = scale·error.

    error: (p, G, C, h, w) ε̂ - ε; scale: (p, G) s/a. Returns (p, G).
    """
    x0_error = scale[..., None, None, None] * error
    weight = x0_error.detach().abs().flatten(2).mean(-1).clamp(min=MIN_WEIGHT)
    return (x0_error**2).flatten(2).mean(-1) / weight


class NFT(ForwardProcessAlgorithm):
    def __init__(self, config: NFTConfig):
        self.config = config
        self.needs = SamplingNeeds(
            group_size=config.group_size,
            shared_noise=False,
            same_step_order_in_group=False,
            reference_prediction=config.kl_weight > 0,
        )

    def new_tracker(self) -> NoStatTracker:
        return NoStatTracker()

    @torch.no_grad()
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: NoStatTracker) -> torch.Tensor:
        """returns: (P, G) final-image rewards of the gathered batch -> (P, G, K) optimality
        probabilities p, constant along K."""
        rewards = returns.to(torch.float64)  # (P, G)
        index = {prompt: i for i, prompt in enumerate(dict.fromkeys(prompts))}
        prompt_ids = torch.tensor([index[prompt] for prompt in prompts], device=rewards.device)  # (P,)
        sums = torch.zeros(len(index), dtype=torch.float64, device=rewards.device).index_add_(0, prompt_ids, rewards.sum(1))
        counts = torch.zeros_like(sums).index_add_(0, prompt_ids, torch.full_like(rewards[:, 0], rewards.shape[1]))
        prompt_means = (sums / counts)[prompt_ids][:, None]  # (P, 1)
        z = self.config.adv_clip_max * (rewards.std(correction=0) + STD_EPS)
        optimality = 0.5 + 0.5 * ((rewards - prompt_means) / z).clamp(-1.0, 1.0)
        return optimality.to(returns.dtype)[:, :, None].expand(-1, -1, self.config.num_steps).clone()

    def loss(self, inputs: ForwardLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        old = inputs.old_prediction.detach()
        positive = (1 - c.beta) * old + c.beta * inputs.prediction  # (p, G, C, h, w) ε⁺
        negative = (1 + c.beta) * old - c.beta * inputs.prediction  # ε⁻
        scale = inputs.x0_scale  # (p, G): x̂0 error per unit of prediction error
        optimality = inputs.advantages  # (p, G)
        per_sample = optimality * adaptive_x0_loss(positive - inputs.target, scale) + (1 - optimality) * adaptive_x0_loss(
            negative - inputs.target, scale
        )
        policy_loss = c.adv_clip_max / c.beta * per_sample.mean()
        loss = policy_loss
        deviation = inputs.prediction.detach() - old
        metrics = {"policy_loss": policy_loss.detach(), "old_deviation": (deviation**2).mean()}
        if c.kl_weight > 0:
            if inputs.ref_prediction is None:
                raise ValueError("NFT's loss with kl_weight > 0 needs ref_prediction: the base model's ε-prediction.")
            ref_deviation = ((inputs.prediction - inputs.ref_prediction.detach()) ** 2).mean()
            loss = loss + c.kl_weight * ref_deviation
            metrics["ref_deviation"] = ref_deviation.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics

    @torch.no_grad()
    def next_old_policy(
        self, old: dict[str, torch.Tensor], current: dict[str, torch.Tensor], optimizer_updates: int
    ) -> dict[str, torch.Tensor]:
        """old <- d·old + (1-d)·current, d = `old_policy_decay` of the steps taken so far."""
        decay = old_policy_decay(self.config, optimizer_updates)
        return {name: decay * old[name] + (1 - decay) * current[name] for name in current}
