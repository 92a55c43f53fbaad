"""GRPO: PPO-clip on every denoising step, each prompt's trajectories its own baseline.

Paper: Liu, Liu, Liu, Wang, Zhang, Wu, Ouyang, Yang, "Flow-GRPO: Training Flow Matching
Models via Online RL" (arXiv 2505.05470); GRPO itself is Shao et al., DeepSeekMath
(arXiv 2402.03300).
Reference code: yifan123/flow_grpo at ac4c86e (2025-07-18, the newest snapshot fetchable
here): `scripts/train_sd3.py`, `flow_grpo/stat_tracking.py`, `config/base.py`,
`config/grpo.py`. Flow-GRPO-Fast's window is in later commits, read from a code index
without line numbers: `config/base.py` at 54809b5, `scripts/train_sd3_fast.py` at 74db691,
and `flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py` (upstream's is not
indexed; read in the fork Xianchao-Wu/flow_grpo at 6cf00e0). Line numbers below are ac4c86e's.

Implementation details:
1. Sampling: G trajectories per prompt (`num_image_per_prompt`: 8 in the single-GPU config,
   config/grpo.py:234; 24 on 32 GPUs, :42), each from its own x_T: the sampling pipeline is
   called without a generator (train_sd3.py:639-651; `same_latent = False`, base.py at
   54809b5). The sampler is the preset's (`zoo.sampling`): on flow models (tiny-flow,
   sd3.5-medium) Flow-GRPO's own SDE, noise level 0.7 (base.py:54); on UNets DDIM eta > 0 or LCM.
2. Rewards: one score of each final image.
3. Advantages (stat_tracking.py:16-31), per prompt over the batch gathered from every
   process: A = (r - mean) / (std + 1e-4), mean over the prompt's rewards, population std
   (numpy's) of the prompt's rewards, or of the whole batch with `global_std`; the tracker
   is cleared every epoch (train_sd3.py:780), so nothing carries over: the prompt's own
   trajectories are its baseline. The tracker keys by prompt, so a prompt's rewards are
   all of its trajectories in the epoch: G of one group, N x G with `--groups-per-prompt` N
   (more if drawn again, as flow_grpo merges a prompt met in two sampling batches). One
   scalar per trajectory, broadcast over its K steps (train_sd3.py:740).
4. Loss per trained step (train_sd3.py:881-893), as DDPO's: ratio = exp(logp - old_logp),
   A_c = clamp(A, ±adv_clip_max), policy = mean(max(-A_c·ratio, -A_c·clamp(ratio,
   1 - clip_range, 1 + clip_range))); clip_range 1e-4 (base.py:86), adv_clip_max 5 (:84).
5. KL to the base model, when β > 0 (train_sd3.py:875-878, :894-897): the base's transition
   mean is recomputed with the LoRA adapter disabled and without gradients, and loss =
   policy + β·mean KL. β = 0.04 (config/grpo.py:244; base.py:91 has 0). `kl_form`
   "flow-grpo" is flow_grpo's term, mean over elements of (μ_θ - μ_ref)² / (2·std_dev_t²)
   (train_sd3.py:895), where std_dev_t is the SDE's noise level before the sqrt(σ - σ')
   that makes it the transition's std (sd3_sde_with_logprob.py:47, :59): the exact
   Gaussian KL times σ - σ'. The default, "exact", is the two transition Gaussians' KL
   (`zoo.kernels.gaussian_kl`; docs/ALGORITHMS.md states it so), σ - σ' times larger per
   step: 25.1, 21.4, ..., 3.7 at sd3.5-medium's K = 10 (shift 3), about 13 on average over
   its 9 trained steps, so the presets that carry flow_grpo's β (sd3.5-medium, flux-schnell)
   set "flow-grpo". With β = 0 the runner makes no reference UNet call
   (`needs.kl_to_reference`).
5b. The training log-prob's guidance detaches the unconditional prediction
   (train_sd3.py:189-190, `detach_unconditional`): the guided prediction's value is the
   sampler's, its gradient g·∂(conditional) only (`Policy.unconditional_detached`). At
   guidance 1 there is no unconditional prediction and nothing changes.
6. Training window (Flow-GRPO-Fast: `sde_window_size` 2 within `sde_window_range` (0, 10),
   base.py at 54809b5): with `window_size` set, each trajectory trains only `window_size`
   consecutive steps starting uniformly in `window_range` (the fast pipeline draws
   `random.randint(lo, hi - size)`); the runner replays only those
   (`Algorithm.trained_steps`), and an optimizer step spans `gradient_accumulation_steps` x
   `window_size` loss calls (train_sd3_fast.py multiplies accumulation by the window size).
   Without it every step is trained.
7. Accumulation: `gradient_accumulation_steps` minibatches x the trained steps per update
   (train_sd3.py:360), so each update sees whole trajectories (or whole windows).
8. Metrics: loss, policy_loss, kl_to_reference (β > 0), approx_kl = 0.5·mean((logp -
   old_logp)²) (train_sd3.py:901-904), clipfrac = mean(|ratio - 1| > clip_range) (:905-909).
9. Optimizer and loop (the single-GPU config, config/grpo.py:221-258, on base.py): AdamW lr
   3e-4 (base.py:63), weight decay 1e-4 (:69), grad-norm clip 1.0 (:76) (`TrainingConfig`'s
   defaults); K = 10 (grpo.py:228), guidance 4.5 (:230); a minibatch of 8 trajectories, one
   group (:239), accumulation 4 (:240), so two updates per epoch of 8 groups; LoRA rank 32,
   alpha 64 (train_sd3.py:430-431).

Deliberate deviations:
- KL form: exact by default (5.), flow_grpo's with `kl_form="flow-grpo"`, which the flow
  GPU presets set; on the ε samplers (DDIM, LCM) only the exact one exists.
- Standard deviation: the prompt's own by default, as GRPO defines it and the issue asks;
  flow_grpo's configs normalise by the whole batch's (`global_std = True`, base.py:52,
  grpo.py:246), which `global_std=True` reproduces.
- Trained steps: all K by default. flow_grpo trains the first int(0.99·K) (timestep_fraction,
  grpo.py:242, train_sd3.py:345: 9 of 10), leaving out the last step, whose SDE std
  vanishes; here the last step has a finite std and acts on the decoded image
  (`zoo.sampling`). `window_size = K - 1, window_range = (0, K - 1)` reproduces it.
- Outside the window, steps are sampled with the sampler's own noise, where Flow-GRPO-Fast
  samples them deterministically (noise level 0, the ODE): every algorithm of a preset then
  trains on trajectories of the one sampler it is evaluated against, and the sampler keeps
  one eta. The gradient stays unbiased; the untrained steps' noise adds variance to the
  rewards. (MixGRPO's sliding window, sampled with the ODE outside it, is zoo/mixgrpo.py.)
- The window is drawn per trajectory from the epoch's generator; the fast pipeline draws
  one per sampling call, shared by the trajectories of that call, whatever their prompt.
- Trajectories whose advantages are all zero are trained on (they add no policy gradient);
  flow_grpo drops them (train_sd3.py:796-816), which makes its minibatches vary in size.
- Steps are replayed in the runner's per-trajectory shuffled order (ddpo-pytorch's);
  flow_grpo replays them in sampling order (train_sd3.py:864). An update spans every
  trained step of its minibatches either way, so the update is the same.
- No EMA of the adapter (flow_grpo's configs evaluate and save an EMA, `train.ema`); the
  runner evaluates the trained weights.
- A group lives on one process; flow_grpo spreads a prompt's samples over its GPUs
  (train_sd3.py:78-120). Advantages are computed on the gathered batch either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zoo.algorithm import (
    EpochContext, LossInputs, ReplayAlgorithm, SamplingNeeds, TrainingConfig, check_field_rules, ppo_clip_loss,
)
from zoo.kernels import KL_FORMS, KLForm
from zoo.stat_tracking import NoStatTracker

_FIELD_RULES = (
    ("group_size", "must be at least 2 (one trajectory per prompt is its own mean: every advantage is 0)",
     lambda v: v >= 2),
    ("std_epsilon", "must be positive (a group of equal rewards would divide 0 by 0)", lambda v: v > 0),
    ("clip_range", "must be positive", lambda v: v > 0),
    ("adv_clip_max", "must be positive", lambda v: v > 0),
    ("beta", "must be non-negative (0 drops the KL term)", lambda v: v >= 0),
    ("kl_form", f"must be one of {', '.join(KL_FORMS)}", lambda v: v in KL_FORMS),
)
"""(field, rule, predicate): the values of its own fields that `GRPOConfig` refuses."""


@dataclass(frozen=True)
class GRPOConfig(TrainingConfig):
    """GRPO's hyperparameters; defaults are flow_grpo's single-GPU configuration
    (`config/grpo.py:general_ocr_sd3_1gpu` on `config/base.py`); shared fields are
    re-declared where it differs from `TrainingConfig`'s."""

    num_steps: int = 10
    """Sampling steps K during training (flow_grpo's)."""
    guidance_scale: float = 4.5
    """Classifier-free guidance scale, at sampling and when recomputing log-probs (flow_grpo's)."""
    gradient_accumulation_steps: int = 4
    """Minibatches per optimizer step; each minibatch contributes all of its trained steps (see `loss_calls_per_update`)."""
    lora_rank: int = 32
    """LoRA rank of the UNet adapter (flow_grpo's)."""
    lora_alpha: float = 64.0
    """LoRA alpha (flow_grpo's; the adapter's scale is alpha / rank)."""
    group_size: int = 8
    """G: trajectories per group, each from its own x_T; a prompt's baseline is all its trajectories of the epoch."""
    global_std: bool = False
    """Divide by the std of the whole gathered batch instead of the prompt's own (flow_grpo's configs do)."""
    std_epsilon: float = 1e-4
    """Added to the std before dividing, so that a prompt whose rewards are all equal gets advantages 0."""
    clip_range: float = 1e-4
    """PPO clip range: the ratio is clamped to [1 - clip_range, 1 + clip_range]."""
    adv_clip_max: float = 5.0
    """Advantages are clamped to [-adv_clip_max, adv_clip_max] in the loss."""
    beta: float = 0.04
    """β: weight of the per-step KL to the base model (adapter disabled) added to the loss; 0 skips its UNet calls."""
    window_size: int | None = None
    """Train only this many consecutive steps of each trajectory (Flow-GRPO-Fast); None trains all K."""
    window_range: tuple[int, int] | None = None
    """(lo, hi): each trajectory's window lies in steps lo .. hi - 1, its start drawn uniformly; None is (0, K)."""
    kl_form: KLForm = "exact"
    """The KL term's form: "exact", the two transition Gaussians' KL; or "flow-grpo", flow_grpo's, the exact KL times the step's σ - σ' (flow samplers only; what a β carried over from flow_grpo weighs)."""
    detach_unconditional: bool = True
    """Detach the unconditional prediction of classifier-free guidance in the training log-probs, as flow_grpo does (the gradient then reaches the adapter through the conditional prediction only)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field_rules(self, _FIELD_RULES)
        self._check_window()
        if self.kl_form == "flow-grpo" and self.sampler != "flow":
            raise ValueError(
                f"kl_form flow-grpo scales the KL by a flow step's size σ - σ', and the sampler is {self.sampler}: "
                "use kl_form exact, or the flow sampler."
            )

    def _check_window(self) -> None:
        if self.window_size is None:
            if self.window_range is not None:
                raise ValueError("window_range needs window_size: set both, or neither to train every step.")
            return
        if not 1 <= self.window_size <= self.num_steps:
            raise ValueError(f"window_size must lie in 1 .. num_steps ({self.num_steps}) (got {self.window_size}).")
        low, high = self.window_range or (0, self.num_steps)
        if not (0 <= low and high <= self.num_steps and high - low >= self.window_size):
            raise ValueError(
                f"window_range must lie in 0 .. num_steps ({self.num_steps}) and hold window_size "
                f"({self.window_size}) steps (got {self.window_range!r})."
            )

    @property
    def trained_steps_per_trajectory(self) -> int:
        """The window's steps, or all K."""
        return self.num_steps if self.window_size is None else self.window_size

    def build(self) -> "GRPO":
        return GRPO(self)


class GRPO(ReplayAlgorithm):
    def __init__(self, config: GRPOConfig):
        self.config = config
        # Members are independent samples: each permutes its own steps, as DDPO's trajectories do.
        self.needs = SamplingNeeds(
            group_size=config.group_size, shared_noise=False, same_step_order_in_group=False,
            kl_to_reference=config.beta > 0, kl_form=config.kl_form,
            detach_unconditional=config.detach_unconditional,
        )

    def trained_steps(self, context: EpochContext, num_prompts: int, group_size: int) -> torch.Tensor | None:
        """(P, G, window_size) consecutive steps per trajectory, each window's start uniform
        over the starts that keep it inside `window_range`; None without a window."""
        c = self.config
        if c.window_size is None:
            return None
        low, high = c.window_range or (0, c.num_steps)
        starts = torch.randint(low, high - c.window_size + 1, (num_prompts, group_size, 1), generator=context.generator)
        return starts + torch.arange(c.window_size)

    def new_tracker(self) -> NoStatTracker:
        return NoStatTracker()

    @torch.no_grad()
    def advantages(self, prompts: list[str], returns: torch.Tensor, tracker: NoStatTracker) -> torch.Tensor:
        """returns: (P, G) final-image rewards -> (P, G, K) advantages, constant along K,
        normalised over every trajectory of the same prompt."""
        c = self.config
        rewards = returns.to(torch.float64)
        advantages = torch.empty_like(rewards)
        batch_std = rewards.std(correction=0)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts], device=rewards.device)
            own = rewards[rows]  # (groups of this prompt, G)
            std = batch_std if c.global_std else own.std(correction=0)
            advantages[rows] = (own - own.mean()) / (std + c.std_epsilon)
        return advantages.to(returns.dtype)[:, :, None].expand(-1, -1, c.num_steps).clone()

    def loss(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.config
        policy_loss, clip_metrics = ppo_clip_loss(inputs, c.clip_range, c.adv_clip_max)  # over (p, G, S)
        metrics = {"policy_loss": policy_loss.detach(), **clip_metrics}
        loss = policy_loss
        if c.beta > 0:
            if inputs.kl_to_reference is None:
                raise ValueError("GRPO with beta > 0 needs kl_to_reference: the per-step KL to the base model.")
            kl = inputs.kl_to_reference.mean()
            loss = policy_loss + c.beta * kl
            metrics["kl_to_reference"] = kl.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics
