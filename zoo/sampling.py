"""Samplers whose every transition is a Gaussian with a known log-density.

Four transition kernels share one trajectory sampler:

- DDIM with eta > 0 (DDPO, D3PO, SDPO):
  x̂0 = (x_t - sqrt(1-ᾱ_t)·ε̂) / sqrt(ᾱ_t);  σ = eta·sqrt((1-ᾱ_t')/(1-ᾱ_t))·sqrt(1-ᾱ_t/ᾱ_t');
  x_t' ~ N(sqrt(ᾱ_t')·x̂0 + sqrt(1-ᾱ_t'-σ²)·ε̂, σ²).
- LCM multistep consistency sampling (RLCM): denoised = c_out·x̂0 + c_skip·x_t;
  x_t' ~ N(sqrt(ᾱ_t')·denoised, 1-ᾱ_t').
- Flow matching (SD3, FLUX; Flow-GRPO's SDE): the model predicts the velocity v = ε - x0
  of x_σ = (1-σ)·x0 + σ·ε; with noise level a (`eta`) and dt = σ' - σ < 0,
  std_σ = a·sqrt(σ/(1-σ)) (σ = 1 replaced by the schedule's second σ), x_σ' ~
  N(x·(1 + std_σ²·dt/(2σ)) + v·(1 + std_σ²·(1-σ)/(2σ))·dt, std_σ²·(-dt)); x̂0 = x - σ·v.
  a = 0 is the Euler step of diffusers' FlowMatchEulerDiscreteScheduler (the ODE).
- Flow matching, DanceGRPO's SDE (`SamplerConfig.flow_sde` "dance-grpo"): constant noise
  eta, x_σ' ~ N(x + (v + eta²·(x + (1-σ)·v)/(2σ))·dt, eta²·(-dt)); eta = 0 is the same ODE.

DDIM with eta = 0 is deterministic and has no density (its recorded log-probs are NaN); it
samples data for losses that read no log-probs (NFT trains on the final latents, noised
again by `TrajectorySampler.forward_process`); so does the flow ODE.

Both need ᾱ_t' < 1 at the last step to have a density. Past the end of the schedule
ᾱ_t' is ᾱ of timestep 0 (as the DDPO/SDPO reference code clamps it), never 1. That is a
deliberate deviation from diffusers' LCMScheduler, which returns `denoised` without noise
at the last step: here the last transition is stochastic like every other one and its
sample x_0 is what gets decoded, so every recorded log-prob belongs to an action that
affects the image (in the RLCM reference the last step's log-prob never reaches the
reward). The extra noise has std sqrt(1-ᾱ_0) ≈ 0.03 for Stable Diffusion's schedule.

Log-probs are averaged over the C·h·w latent elements, not summed: summed log-densities
of 16k-element latents make importance ratios overflow, and the published clip ranges
are tuned to the mean.

Flow sigmas are the model's own FlowMatchEulerDiscreteScheduler's at K steps (its time
shift, and its dynamic shift from the latent size when the config asks for one); the
model's timestep input is σ·1000, as the diffusers pipelines pass it.

Timesteps: `SamplerConfig.timestep_spacing` places them, or None keeps the model's
scheduler config. For DDIM, "trailing" starts every step count at the top of the schedule
(t = 999, and 999, 499 at 2 steps), where Stable Diffusion 1.5's own "leading" config
starts a 1-step sample at t = 1, pure noise that is never denoised. For LCM, "skipping"
is the LCM paper's skipping-step rule as RLCM computes it (`lcm_skipping_timesteps`).
Transitions are addressed by step index k (0 = first, noisiest step), which is all a
re-scoring call needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal, get_args

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
from torch.utils.checkpoint import checkpoint

from zoo.trajectory import Trajectory

if TYPE_CHECKING:
    from zoo.policy import Policy

SamplerKind = Literal["ddim", "lcm", "flow"]
FlowSDE = Literal["flow-grpo", "dance-grpo"]
FLOW_SDES: tuple[str, ...] = get_args(FlowSDE)

TIMESTEP_SPACINGS: dict[str, tuple[str, ...]] = {
    "ddim": ("leading", "trailing", "linspace"), "lcm": ("skipping",), "flow": (),
}
"""The timestep spacings each sampler kind accepts besides None (the scheduler config's own).
DDIM's are diffusers' (`Policy.scheduler_for` writes them into the scheduler's config);
LCM's "skipping" is computed here, since diffusers' LCMScheduler ignores `timestep_spacing`."""


class SamplerConfigError(ValueError):
    """An impossible sampler setting, named by its flag."""


@dataclass(frozen=True)
class SamplerConfig:
    kind: SamplerKind = "ddim"
    """Transition kernel: "ddim" (eta > 0, classifier-free guidance), "lcm" (consistency
    sampling, guidance as an embedding when the UNet has one) or "flow" (flow-matching
    models: the SDE with noise level `eta`, classifier-free guidance)."""
    num_steps: int = 50
    """Sampling steps K (1 to 50 for the published models)."""
    eta: float = 1.0
    """DDIM's eta, or the flow SDE's noise level a (Flow-GRPO's noise_level); 0 is
    deterministic (DDIM, the flow ODE) and has no density, so losses that read log-probs
    refuse it. Unused by LCM."""
    guidance_scale: float = 1.0
    """Classifier-free guidance scale (DDIM), or LCM's guidance w (embedded as w-1)."""
    timestep_spacing: str | None = None
    """Where the K timesteps sit; None keeps the model's scheduler config. DDIM: "leading",
    "trailing" or "linspace" (diffusers' spacings; "trailing" starts every K at t = N - 1).
    LCM: "skipping", every (n // K)-th of the n = `original_inference_steps` distillation
    timesteps counted down from the top (RLCM's rule; None is diffusers' LCMScheduler,
    whose indices floor(linspace(0, n, K)) differ from it at K = 3, 4, 6, 8, 9 and 11 on
    for n = 50)."""
    flow_sde: FlowSDE = "flow-grpo"
    """The flow sampler's SDE: "flow-grpo" (`flow_transition`: std a·sqrt(σ/(1-σ))·sqrt(-dt),
    `eta` = Flow-GRPO's noise level, 0.7 published) or "dance-grpo" (`dance_flow_transition`:
    std eta·sqrt(-dt), DanceGRPO's eta, 0.3 published for FLUX). Both share the model's
    sigmas, x̂0 and the element-mean log-density, and both are the Euler ODE at eta 0 (the
    evaluation's sampler, so it does not depend on this). Other kinds take only "flow-grpo",
    the default."""

    def validate(self, *, for_training: bool) -> None:
        if self.kind not in TIMESTEP_SPACINGS:
            raise SamplerConfigError(f"--sampler must be one of {', '.join(TIMESTEP_SPACINGS)}, got {self.kind!r}")
        allowed = TIMESTEP_SPACINGS[self.kind]
        if self.timestep_spacing is not None and self.timestep_spacing not in allowed:
            raise SamplerConfigError(
                f"timestep spacing {self.timestep_spacing!r} does not apply to the {self.kind} sampler; "
                f"choose from {', '.join(allowed)} or None (the scheduler config's own)"
            )
        if self.flow_sde not in FLOW_SDES:
            raise SamplerConfigError(f"--flow-sde must be one of {', '.join(FLOW_SDES)}, got {self.flow_sde!r}")
        if self.flow_sde != "flow-grpo" and self.kind != "flow":
            raise SamplerConfigError(
                f"--flow-sde {self.flow_sde} is an SDE of the flow sampler, and the sampler is {self.kind}: "
                "pass --sampler flow, or leave --flow-sde at flow-grpo"
            )
        if self.num_steps < 1:
            raise SamplerConfigError(f"--steps must be at least 1, got {self.num_steps}")
        if self.guidance_scale < 1.0:
            raise SamplerConfigError(f"--guidance must be >= 1 (1 disables guidance), got {self.guidance_scale}")
        if self.kind in ("ddim", "flow"):
            if self.eta < 0:
                raise SamplerConfigError(f"--eta must be >= 0, got {self.eta}")
            if for_training and self.eta == 0:
                published = {
                    "ddim": "--eta 1 (the published setting)",
                    "flow-grpo": "--eta 0.7 (Flow-GRPO's noise level)",
                    "dance-grpo": "--eta 0.3 (DanceGRPO's for FLUX)",
                }["ddim" if self.kind == "ddim" else self.flow_sde]
                raise SamplerConfigError(
                    f"--eta 0 makes the {self.kind} sampler deterministic: its transitions have no "
                    f"log-probability, so policy-gradient training cannot use them; pass {published}"
                )


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²) averaged over every dim but the first: (N, ...) -> (N,).

    std is (N,) or broadcastable. Computed in float32.
    """
    x, mean = x.float(), mean.float()
    std = _per_sample(std.float(), x)
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(dim=1)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std²) || N(ref_mean, std²)) per element, averaged over every dim but the
    first: (N, ...) -> (N,), in float32. Both Gaussians share their std, as a transition's
    std here depends on the schedule only, never on the weights; the KL is then
    (mean - ref_mean)² / (2 std²) per element, averaged like the log-probs."""
    mean, ref_mean = mean.float(), ref_mean.float()
    std = _per_sample(std.float(), mean)
    return ((mean - ref_mean) ** 2 / (2 * std**2)).flatten(1).mean(dim=1)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape (N,) per-sample scalars to broadcast against (N, C, h, w)."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def ddim_transition(
    eps: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDIM step as a Gaussian: returns (mean (N,C,h,w), std (N,), x̂0 (N,C,h,w)), float32
    (float64 when x_t is: gradient checks run the whole sampler in float64).

    alpha_t, alpha_prev are ᾱ_t and ᾱ_t' per sample, (N,).
    """
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    eps, x_t = eps.to(dtype), x_t.to(dtype)
    a_t, a_prev = _per_sample(alpha_t.to(dtype), x_t), _per_sample(alpha_prev.to(dtype), x_t)
    pred_x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    mean = a_prev.sqrt() * pred_x0 + direction
    return mean, std.flatten(), pred_x0


def lcm_transition(
    eps: torch.Tensor,
    x_t: torch.Tensor,
    alpha_t: torch.Tensor,
    alpha_prev: torch.Tensor,
    c_skip: torch.Tensor,
    c_out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LCM step as a Gaussian: returns (mean, std (N,), x̂0, denoised), float32.

    c_skip, c_out are the boundary-condition scalings of timestep t per sample, (N,).
    """
    eps, x_t = eps.float(), x_t.float()
    a_t, a_prev = _per_sample(alpha_t.float(), x_t), _per_sample(alpha_prev.float(), x_t)
    pred_x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    denoised = _per_sample(c_out.float(), x_t) * pred_x0 + _per_sample(c_skip.float(), x_t) * x_t
    mean = a_prev.sqrt() * denoised
    std = (1 - a_prev).sqrt().flatten()
    return mean, std, pred_x0, denoised


def flow_transition(
    velocity: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_max: torch.Tensor,
    noise_level: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step as a Gaussian: returns (mean, std (N,), x̂0), float32 (float64
    when x is). sigma, sigma_next (N,) are σ and σ' of the step; sigma_max (N,) the σ that
    replaces σ = 1 in the std's denominator, the schedule's second σ
    (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:42-46 at ac4c86e)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    velocity, x = velocity.to(dtype), x.to(dtype)
    s, s_next = _per_sample(sigma.to(dtype), x), _per_sample(sigma_next.to(dtype), x)
    dt = s_next - s
    denominator = 1 - torch.where(s == 1, _per_sample(sigma_max.to(dtype), x), s)
    std_t = noise_level * (s / denominator).sqrt()
    mean = x * (1 + std_t**2 / (2 * s) * dt) + velocity * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    std = (std_t * (-dt).sqrt()).flatten()
    return mean, std, x - s * velocity


def dance_flow_transition(
    velocity: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DanceGRPO's SDE step as a Gaussian: returns (mean, std (N,), x̂0), float32 (float64
    when x is). sigma, sigma_next (N,) are σ and σ' of the step, dt = σ' - σ < 0.

    XueZeyue/DanceGRPO at 15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344, fastvideo/
    train_grpo_flux.py:131-170 (`flux_step` with sde_solver=True, the only way its trainers
    call it, :250, :291): the Euler mean x + dt·v (:142-143) plus the reverse-SDE drift
    -½·eta²·score·dt with the score of x_σ estimated from x̂0 = x - σ·v as
    -(x - (1-σ)·x̂0)/σ² (:145, :151-153), and a constant diffusion eta, std =
    eta·sqrt(σ - σ') (:147-148). Its scripts pass eta 0.3 (FLUX, scripts/finetune/
    finetune_flux_grpo.sh:46; also Qwen-Image, Wan 2.1, SkyReels) and 0.25 (HunyuanVideo,
    finetune_hunyuan_grpo.sh:49); the argument's own default is None (train_grpo_flux.py:
    1103-1106).

    Deliberate deviations:
    - the score is written -(x + (1-σ)·v)/σ, the same number once x̂0 is substituted, so that
      small σ does not subtract nearly equal terms (the tiny flow model's 2-step schedule
      ends at σ = 0.0089);
    - the σ are the model's FlowMatchEulerDiscreteScheduler's and its timestep input σ·1000,
      as for Flow-GRPO's SDE, where DanceGRPO shifts linspace(1, 0, K + 1) itself (:311-313)
      and passes int(σ·1000) (:231), so the two SDEs differ only in this kernel.
    The log-prob (`gaussian_log_prob`) is DanceGRPO's: the Gaussian log-density of each
    element, constants included, averaged over every dim but the batch (:161-167)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    velocity, x = velocity.to(dtype), x.to(dtype)
    s, s_next = _per_sample(sigma.to(dtype), x), _per_sample(sigma_next.to(dtype), x)
    dt = s_next - s
    score = -(x + (1 - s) * velocity) / s
    mean = x + (velocity - 0.5 * eta**2 * score) * dt
    std = (eta * (-dt).sqrt()).flatten()
    return mean, std, x - s * velocity


def forward_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """The forward process q(x_t | x0): x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε, float32.

    x0, noise (..., C, h, w); alpha_cumprod ᾱ_t (...), one per latent.
    """
    alpha = alpha_cumprod.float()[..., None, None, None]
    return alpha.sqrt() * x0.float() + (1 - alpha).sqrt() * noise.float()


def forward_flow(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The flow-matching forward process: x_σ = (1-σ)·x0 + σ·ε, float32.

    x0, noise (..., C, h, w); sigma σ (...), one per latent.
    """
    sigma = sigma.float()[..., None, None, None]
    return (1 - sigma) * x0.float() + sigma * noise.float()


@dataclass(frozen=True)
class StepSchedule:
    """Per-step constants of one sampler at one step count K, all shaped (K,). The fields
    another kind's kernel reads are NaN (the ᾱ and LCM fields for flow, σ for the others)."""

    timesteps: torch.Tensor  # t of step k: long (DDIM, LCM), or float32 σ·1000 (flow)
    alpha_t: torch.Tensor  # float64, ᾱ_t
    alpha_prev: torch.Tensor  # float64, ᾱ_t' (ᾱ of timestep 0 past the end)
    c_skip: torch.Tensor  # float64, LCM boundary scalings (unused by DDIM)
    c_out: torch.Tensor
    sigma: torch.Tensor  # float64, flow σ of step k
    sigma_next: torch.Tensor  # float64, flow σ' (0 after the last step)


def lcm_skipping_timesteps(num_train_timesteps: int, original_steps: int, num_steps: int) -> torch.Tensor:
    """(K,) long: the LCM paper's skipping-step schedule as RLCM's patched LCMScheduler
    computes it (Owen-Oertell/rlcm lcm_rl_pytorch/diffusers_patch/lcm_scheduler.py:377-382):
    the distillation timesteps c·i - 1 (c = N // n, i = 1..n), every (n // K)-th from the
    top. N = 1000, n = 50: K = 8 gives 999, 879, 759, 639, 519, 399, 279, 159, where
    diffusers' LCMScheduler (0.42) gives 999, 879, 759, 639, 499, 379, 259, 139."""
    if not 1 <= num_steps <= original_steps:
        raise SamplerConfigError(
            f"--steps {num_steps}: LCM's skipping-step schedule takes 1 to {original_steps} steps "
            f"(the scheduler's original_inference_steps)"
        )
    step = num_train_timesteps // original_steps
    origin = torch.arange(1, original_steps + 1, dtype=torch.long) * step - 1
    return origin.flip(0)[:: original_steps // num_steps][:num_steps].clone()


def make_schedule(
    scheduler: DDIMScheduler | LCMScheduler, kind: SamplerKind, num_steps: int, timestep_spacing: str | None = None
) -> StepSchedule:
    """Timesteps from the scheduler's own `set_timesteps`, so its config's spacing applies,
    or LCM's skipping-step rule when `timestep_spacing` is "skipping". A DDIM spacing must
    already be the scheduler's (`Policy.scheduler_for` builds it so)."""
    if kind == "lcm" and timestep_spacing == "skipping":
        config = scheduler.config
        timesteps = lcm_skipping_timesteps(config.num_train_timesteps, config.original_inference_steps, num_steps)
    else:
        if timestep_spacing is not None and scheduler.config.get("timestep_spacing") != timestep_spacing:
            raise ValueError(
                f"the scheduler's timestep spacing is {scheduler.config.get('timestep_spacing')!r}, not "
                f"{timestep_spacing!r}: build it with Policy.scheduler_for"
            )
        scheduler.set_timesteps(num_steps, device="cpu")
        timesteps = scheduler.timesteps.to(torch.long).clone()
    if len(timesteps) != num_steps:
        raise SamplerConfigError(
            f"the {type(scheduler).__name__} gave {len(timesteps)} timesteps for --steps {num_steps}; "
            "choose a step count the scheduler supports"
        )
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    if kind == "ddim":
        prev = timesteps - scheduler.config.num_train_timesteps // num_steps
    else:
        prev = torch.cat([timesteps[1:], timesteps.new_tensor([-1])])
    alpha_prev = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], alphas_cumprod[0])
    if kind == "lcm":
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timesteps.to(torch.float64))
    else:
        c_skip, c_out = torch.zeros(num_steps, dtype=torch.float64), torch.ones(num_steps, dtype=torch.float64)
    unused = torch.full((num_steps,), math.nan, dtype=torch.float64)
    return StepSchedule(timesteps, alphas_cumprod[timesteps], alpha_prev, c_skip, c_out, unused, unused)


def flow_schedule(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int) -> StepSchedule:
    """The constants of a FlowMatchEulerDiscreteScheduler whose `set_timesteps` has been
    called for `num_steps` (as its pipeline calls it: `FlowPolicy.flow_scheduler`)."""
    if len(scheduler.timesteps) != num_steps:
        raise SamplerConfigError(
            f"the {type(scheduler).__name__} gave {len(scheduler.timesteps)} timesteps for --steps {num_steps}"
        )
    sigmas = scheduler.sigmas.to(torch.float64)  # (K + 1,), the last the terminal σ
    unused = torch.full((num_steps,), math.nan, dtype=torch.float64)
    timesteps = scheduler.timesteps.to(torch.float32).clone()
    return StepSchedule(timesteps, unused, unused, unused, unused, sigmas[:-1].clone(), sigmas[1:].clone())


class TrajectorySampler:
    """Samples trajectories with per-step log-probs and re-scores stored transitions.

    Sampling and re-scoring run the same `transition` code, so re-scoring a stored
    transition under unchanged weights reproduces its log-prob exactly.
    """

    def __init__(self, policy: "Policy", config: SamplerConfig):
        config.validate(for_training=False)
        self.policy = policy
        self.config = config
        if (config.kind == "flow") != (policy.family == "flow"):
            wanted = "a flow-matching model (SD3, FLUX)" if config.kind == "flow" else "an ε-prediction UNet model"
            raise SamplerConfigError(
                f"--sampler {config.kind} needs {wanted}, and the model is a {policy.family} one: pass "
                f"--sampler {'flow' if policy.family == 'flow' else 'ddim'} (or a preset of that family)"
            )
        if config.kind == "flow":
            schedule = flow_schedule(policy.flow_scheduler(config.num_steps), config.num_steps)
        else:
            scheduler = policy.scheduler_for(config.kind, config.timestep_spacing)
            schedule = make_schedule(scheduler, config.kind, config.num_steps, config.timestep_spacing)
        # On the policy's device once: a host-to-device copy per step would make the host
        # wait for the GPU to drain, so it could not queue the next UNet call meanwhile.
        self.schedule = StepSchedule(*(getattr(schedule, f.name).to(policy.device) for f in fields(StepSchedule)))

    def _step_constants(self, step_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        idx = step_index.to(self.policy.device)
        s = self.schedule
        return tuple(v[idx] for v in (s.timesteps, s.alpha_t, s.alpha_prev, s.c_skip, s.c_out, s.sigma, s.sigma_next))

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """The model's prediction at (x_t, t): ε̂ (DDIM, LCM) or the velocity v̂ (flow), guided."""
        if self.config.kind == "flow":
            return self.policy.predict_velocity(latents, timesteps, prompt_embeds, guidance_scale)
        return self.policy.predict_noise(latents, timesteps, prompt_embeds, guidance_scale, self.config.kind)

    def forward_process(
        self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise clean latents x0 (..., C, h, w) with ε to the noise level of step k (...):
        returns (x_t, timesteps (...), the prediction's target (ε; ε - x0 for flow), and
        the x̂0 error per unit of prediction error (...): sqrt((1-ᾱ_t)/ᾱ_t), or σ), float32."""
        s = self.schedule
        timesteps = s.timesteps[step_index]
        if self.config.kind == "flow":
            sigma = s.sigma[step_index].float()
            return forward_flow(x0, noise, sigma), timesteps, noise.float() - x0.float(), sigma
        alpha = s.alpha_t[step_index].float()
        return forward_noise(x0, noise, alpha), timesteps, noise.float(), ((1 - alpha) / alpha).sqrt()

    def _noise(self, shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
        """Standard normal noise drawn on the CPU (a seed gives the same trajectories on any
        device), copied to a GPU from pinned memory without blocking the host."""
        return self._to_device(torch.randn(shape, generator=generator))

    def initial_noise(
        self, num_prompts: int, group_size: int, shared_noise: bool, generator: torch.Generator | None
    ) -> torch.Tensor:
        """(P, G, C, h, w) x_T drawn on the CPU: one draw per group when its members share it."""
        latent_shape = self.policy.latent_shape
        noise_groups = 1 if shared_noise else group_size
        noise = torch.randn((num_prompts, noise_groups, *latent_shape), generator=generator)
        return noise.expand(num_prompts, group_size, *latent_shape)

    def _to_device(self, cpu_tensor: torch.Tensor) -> torch.Tensor:
        if self.policy.device.type == "cuda":
            return cpu_tensor.pin_memory().to(self.policy.device, non_blocking=True)
        return cpu_tensor

    def transition(
        self, latents: torch.Tensor, step_index: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The policy at (x_t, k): (mean (N,C,h,w), std (N,), x̂0 (N,C,h,w)), float32.
        The flow SDE's σ = 1 replacement is the schedule's second σ, σ' of step 0.

        latents (N,C,h,w), step_index (N,) long, prompt_embeds (N,L,D). Gradients flow
        through the UNet when enabled by the caller.
        """
        t, alpha_t, alpha_prev, c_skip, c_out, sigma, sigma_next = self._step_constants(step_index)
        prediction = self.predict(latents, t, prompt_embeds, self.config.guidance_scale)
        if self.config.kind == "flow" and self.config.flow_sde == "dance-grpo":
            return dance_flow_transition(prediction, latents, sigma, sigma_next, self.config.eta)
        if self.config.kind == "flow":
            sigma_max = self.schedule.sigma_next[0].expand_as(sigma)
            return flow_transition(prediction, latents, sigma, sigma_next, sigma_max, self.config.eta)
        if self.config.kind == "ddim":
            return ddim_transition(prediction, latents, alpha_t, alpha_prev, self.config.eta)
        mean, std, pred_x0, _ = lcm_transition(prediction, latents, alpha_t, alpha_prev, c_skip, c_out)
        return mean, std, pred_x0

    def log_prob(
        self,
        latents: torch.Tensor,
        step_index: torch.Tensor,
        next_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> torch.Tensor:
        """(N,) float32 log-density of x_t -> x_t' under the current weights (with grad)."""
        mean, std, _ = self.transition(latents, step_index, prompt_embeds)
        return gaussian_log_prob(next_latents, mean, std)

    def log_prob_and_kl(
        self,
        latents: torch.Tensor,
        step_index: torch.Tensor,
        next_latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) log-density of x_t -> x_t' under the current weights (with grad) and (N,)
        KL of the current transition Gaussian to the frozen base model's (`gaussian_kl`;
        the base's mean without grad, adapter disabled): two UNet calls."""
        mean, std, _ = self.transition(latents, step_index, prompt_embeds)
        with torch.no_grad(), self.policy.reference():
            ref_mean, _, _ = self.transition(latents, step_index, prompt_embeds)
        return gaussian_log_prob(next_latents, mean, std), gaussian_kl(mean, ref_mean, std)

    def final_latents(
        self, x: torch.Tensor, prompt_embeds: torch.Tensor, step_noise: torch.Tensor, grad_steps: int
    ) -> torch.Tensor:
        """x_T (N,C,h,w) -> the final latent (N,C,h,w) after the K transitions of `sample`,
        the first K - grad_steps without gradients and the last `grad_steps` with them
        (reward back-propagation, zoo/draft.py). Each of those UNet calls is checkpointed
        (torch.utils.checkpoint, non-reentrant: the LoRA weights get their gradients though
        no input requires one), so the backward pass recomputes its activations and memory
        does not grow with grad_steps. prompt_embeds (N,L,D); step_noise (N,K,C,h,w), each
        transition's z, as `sample` takes it (multiplied by σ = 0 at eta 0)."""
        num_steps = self.config.num_steps
        if not 0 <= grad_steps <= num_steps:
            raise ValueError(f"grad_steps must lie in 0..{num_steps}, the sampler's steps (got {grad_steps})")
        x = x.to(self.policy.device, torch.promote_types(x.dtype, torch.float32))
        step_noise = self._to_device(step_noise)
        for k in range(num_steps):
            step_index = torch.full((x.shape[0],), k, dtype=torch.long, device=self.policy.device)
            if k < num_steps - grad_steps:
                with torch.no_grad():
                    mean, std, _ = self.transition(x, step_index, prompt_embeds)
            else:
                mean, std, _ = checkpoint(self.transition, x, step_index, prompt_embeds, use_reentrant=False)
            x = mean + std.reshape(-1, 1, 1, 1) * step_noise[:, k]
        return x

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        group_size: int = 1,
        shared_noise: bool = False,
        generator: torch.Generator | None = None,
        record_pred_x0: bool = False,
        reference_log_probs: bool = False,
        record_transitions: bool = True,
        final_images: bool = True,
        initial_noise: torch.Tensor | None = None,
        step_noise: torch.Tensor | None = None,
    ) -> Trajectory:
        """Sample `group_size` trajectories for each prompt, all in one batch.

        Noise is drawn on the CPU from `generator` so that a seed gives the same
        trajectories on any device. `initial_noise` (P, G, C, h, w) overrides x_T (the
        evaluation uses it to hold noise fixed across checkpoints); `step_noise`
        (P, G, K, C, h, w) overrides the noise of every transition (the trainer draws an
        epoch's noise up front, so that its trajectories do not depend on how the epoch
        is split into sampling calls).

        Only what is asked for is computed and kept; the rest of the `Trajectory` is None
        (reading it raises `NotSampled`). `record_transitions` keeps every step's x_t, x_t'
        and log-prob (off: no log-prob is computed and nothing per step is stacked, for
        callers that read only images); `final_images` decodes the final latents (off for
        algorithms that score decoded x̂0 instead, SDPO). Neither changes the noise drawn,
        so the trajectories are the same either way.
        """
        if reference_log_probs and not record_transitions:
            raise ValueError("reference_log_probs are per-step transition log-probs: they need record_transitions=True")
        policy = self.policy
        num_prompts, num_steps = len(prompts), self.config.num_steps
        n = num_prompts * group_size
        latent_shape = policy.latent_shape
        if initial_noise is None:
            initial_noise = self.initial_noise(num_prompts, group_size, shared_noise, generator)
        x = initial_noise.reshape(n, *latent_shape).to(policy.device, torch.float32)
        if step_noise is not None:
            step_noise = self._to_device(step_noise.reshape(n, num_steps, *latent_shape))

        embeds = policy.encode_prompts(prompts)  # (P, L, D)
        flat_embeds = embeds.repeat_interleave(group_size, dim=0)  # (P*G, L, D)

        latents, next_latents, log_probs, pred_x0s, ref_log_probs = [], [], [], [], []
        for k in range(num_steps):
            step_index = torch.full((n,), k, dtype=torch.long, device=policy.device)
            mean, std, pred_x0 = self.transition(x, step_index, flat_embeds)
            z = self._noise(x.shape, generator) if step_noise is None else step_noise[:, k]
            x_next = mean + std.reshape(-1, 1, 1, 1) * z
            if record_transitions:
                latents.append(x)
                next_latents.append(x_next)
                log_probs.append(gaussian_log_prob(x_next, mean, std))
            if record_pred_x0:
                pred_x0s.append(pred_x0)
            if reference_log_probs:
                with policy.reference():
                    ref_log_probs.append(self.log_prob(x, step_index, x_next, flat_embeds))
            x = x_next

        def stack(steps: list[torch.Tensor]) -> torch.Tensor | None:
            """K tensors (N, ...) -> (P, G, K, ...); None when nothing was recorded."""
            if not steps:
                return None
            stacked = torch.stack(steps, dim=1)
            return stacked.reshape(num_prompts, group_size, num_steps, *stacked.shape[2:])

        images = None
        if final_images:
            decoded = policy.decode(x)
            images = decoded.reshape(num_prompts, group_size, *decoded.shape[1:])
        timesteps = self.schedule.timesteps.expand(num_prompts, group_size, num_steps)
        return Trajectory(
            prompts=list(prompts),
            prompt_embeds=embeds,
            timesteps=timesteps.clone(),
            latents=stack(latents),
            next_latents=stack(next_latents),
            log_probs=stack(log_probs),
            images=images,
            pred_x0=stack(pred_x0s),
            ref_log_probs=stack(ref_log_probs),
        )
