"""Transition kernels: every sampling step as a Gaussian with a known log-density.

A kernel holds one step count's per-step constants, all shaped (K,), and turns the model's
prediction at (x_t, step k) into the Gaussian of x_t' (mean, std, and the x̂0 it implies).
The model family's adapter builds it (`Policy.kernel`: the UNet's DDIM and LCM, the flow
transformer's SDEs), so nothing here knows a model or a scheduler class: torch only.

- DDIM with eta > 0 (DDPO, D3PO, SDPO), ε-prediction:
  x̂0 = (x_t - sqrt(1-ᾱ_t)·ε̂) / sqrt(ᾱ_t);  σ = eta·sqrt((1-ᾱ_t')/(1-ᾱ_t))·sqrt(1-ᾱ_t/ᾱ_t');
  x_t' ~ N(sqrt(ᾱ_t')·x̂0 + sqrt(1-ᾱ_t'-σ²)·ε̂, σ²).
- LCM multistep consistency sampling (RLCM), ε-prediction: denoised = c_out·x̂0 +
  c_skip·x_t; x_t' ~ N(sqrt(ᾱ_t')·denoised, 1-ᾱ_t').
- Flow matching (SD3, FLUX), Flow-GRPO's SDE: the model predicts the velocity v = ε - x0 of
  x_σ = (1-σ)·x0 + σ·ε; with noise level a and dt = σ' - σ < 0, std_σ = a·sqrt(σ/(1-σ))
  (σ = 1 replaced by the schedule's second σ), x_σ' ~ N(x·(1 + std_σ²·dt/(2σ)) +
  v·(1 + std_σ²·(1-σ)/(2σ))·dt, std_σ²·(-dt)); x̂0 = x - σ·v.
- Flow matching, DanceGRPO's SDE: constant noise eta, x_σ' ~ N(x + (v + eta²·(x +
  (1-σ)·v)/(2σ))·dt, eta²·(-dt)).
- The ODE: either flow SDE at noise level 0 is the Euler step of diffusers'
  FlowMatchEulerDiscreteScheduler; DDIM at eta 0 is deterministic DDIM.

Noise levels are per step (`Kernel.noise_levels`, (K,)): one level for every step is the
published samplers; a level of 0 on some steps runs the ODE there (MixGRPO's window of SDE
steps). A step at level 0 is deterministic and has no density (its log-prob is NaN): it can
be sampled, not replayed.

Both ε kernels need ᾱ_t' < 1 at the last step to have a density. Past the end of the
schedule ᾱ_t' is ᾱ of timestep 0 (as the DDPO/SDPO reference code clamps it), never 1: a
deliberate deviation from diffusers' LCMScheduler, which returns `denoised` without noise
at the last step. Here the last transition is stochastic like every other one and its
sample x_0 is what gets decoded, so every recorded log-prob belongs to an action that
affects the image (in the RLCM reference the last step's log-prob never reaches the
reward). The extra noise has std sqrt(1-ᾱ_0) ≈ 0.03 for Stable Diffusion's schedule.

Log-probs are averaged over the C·h·w latent elements, not summed: summed log-densities
of 16k-element latents make importance ratios overflow, and the published clip ranges
are tuned to the mean.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, fields, replace
from typing import ClassVar, Literal, get_args

import torch

SamplerKind = Literal["ddim", "lcm", "flow"]
FlowSDE = Literal["flow-grpo", "dance-grpo"]
FLOW_SDES: tuple[str, ...] = get_args(FlowSDE)
KLForm = Literal["exact", "flow-grpo"]
KL_FORMS: tuple[str, ...] = get_args(KLForm)


def takes_flow_sde(kind: str, flow_sde: str) -> bool:
    """Whether sampler `kind` runs the SDE `flow_sde`: only the flow sampler has another SDE
    than its default, so every other kind takes "flow-grpo" (the field's default) alone."""
    return flow_sde == "flow-grpo" or kind == "flow"


TIMESTEP_SPACINGS: dict[str, tuple[str, ...]] = {
    "ddim": ("leading", "trailing", "linspace"), "lcm": ("skipping",), "flow": (),
}
"""The timestep spacings each sampler kind accepts besides None (the scheduler config's own).
DDIM's are diffusers' (`UNetPolicy.scheduler_for` writes them into the scheduler's config);
LCM's "skipping" is computed by `zoo.unet_policy`, since diffusers' LCMScheduler ignores
`timestep_spacing`."""


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
    """The flow sampler's SDE: "flow-grpo" (`zoo.kernels.flow_transition`: std a·sqrt(σ/(1-σ))·sqrt(-dt),
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
        if not takes_flow_sde(self.kind, self.flow_sde):
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


def _level(noise_level: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A noise level as the kernels multiply by it: a number as it is, per-sample levels (N,)
    shaped to broadcast and in `like`'s dtype, so that a level given either way gives the
    same bits (a Python number multiplies a float32 tensor as its float32 value)."""
    if isinstance(noise_level, torch.Tensor):
        return _per_sample(noise_level.to(like.dtype), like)
    return noise_level


def ddim_transition(
    eps: torch.Tensor, x_t: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDIM step as a Gaussian: returns (mean (N,C,h,w), std (N,), x̂0 (N,C,h,w)), float32
    (float64 when x_t is: gradient checks run the whole sampler in float64).

    alpha_t, alpha_prev are ᾱ_t and ᾱ_t' per sample, (N,); eta a number or (N,).
    """
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    eps, x_t = eps.to(dtype), x_t.to(dtype)
    a_t, a_prev = _per_sample(alpha_t.to(dtype), x_t), _per_sample(alpha_prev.to(dtype), x_t)
    pred_x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = _level(eta, x_t) * variance.clamp(min=0).sqrt()
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
    noise_level: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step as a Gaussian: returns (mean, std (N,), x̂0), float32 (float64
    when x is). sigma, sigma_next (N,) are σ and σ' of the step; sigma_max (N,) the σ that
    replaces σ = 1 in the std's denominator, the schedule's second σ
    (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:42-46 at ac4c86e); noise_level a
    number or (N,)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    velocity, x = velocity.to(dtype), x.to(dtype)
    s, s_next = _per_sample(sigma.to(dtype), x), _per_sample(sigma_next.to(dtype), x)
    dt = s_next - s
    denominator = 1 - torch.where(s == 1, _per_sample(sigma_max.to(dtype), x), s)
    std_t = _level(noise_level, x) * (s / denominator).sqrt()
    mean = x * (1 + std_t**2 / (2 * s) * dt) + velocity * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    std = (std_t * (-dt).sqrt()).flatten()
    return mean, std, x - s * velocity


def dance_flow_transition(
    velocity: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DanceGRPO's SDE step as a Gaussian: returns (mean, std (N,), x̂0), float32 (float64
    when x is). sigma, sigma_next (N,) are σ and σ' of the step, dt = σ' - σ < 0; eta a
    number or (N,).

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
    # ½·eta² in float64 before it meets the float32 tensors, as a Python number would be.
    drift_scale = 0.5 * eta.double() ** 2 if isinstance(eta, torch.Tensor) else 0.5 * eta**2
    mean = x + (velocity - _level(drift_scale, x) * score) * dt
    std = (_level(eta, x) * (-dt).sqrt()).flatten()
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


Gaussian = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(mean (N,C,h,w), std (N,), x̂0 (N,C,h,w)) of one batch of transitions."""


@dataclass(frozen=True)
class Kernel(abc.ABC):
    """One sampler at one step count K: its per-step constants (every tensor field (K,)) and
    the Gaussian of each step. Steps are addressed by index k (0 = first, noisiest step)."""

    timesteps: torch.Tensor
    """The model's time input at step k: long t (ε kernels), or float32 σ·1000 (flow)."""
    noise_levels: torch.Tensor
    """float64 noise level of step k: DDIM's eta, a flow SDE's level; 0 is the ODE step.
    Unused by LCM, whose noise the schedule fixes."""

    guidance_embedding: ClassVar[bool] = False
    """Whether the model takes the guidance scale as an embedding when it has one (LCM's
    distilled w), instead of classifier-free guidance."""

    @abc.abstractmethod
    def step(self, prediction: torch.Tensor, x: torch.Tensor, step_index: torch.Tensor) -> Gaussian:
        """The Gaussian of x_t' given the model's prediction at x_t (N,C,h,w) and the steps
        (N,) long, on the kernel's device."""

    @abc.abstractmethod
    def forward_process(
        self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise clean latents x0 (..., C, h, w) with ε to the noise level of step k (...):
        returns (x_t, timesteps (...), the prediction's target, and the x̂0 error per unit
        of prediction error (...)), float32."""

    def step_size(self, step_index: torch.Tensor) -> torch.Tensor:
        """(N,) float64 size of each step's move along the flow, σ - σ' (= -dt): the factor
        that turns a transition's exact Gaussian KL into Flow-GRPO's (`TrajectorySampler.
        log_prob_and_kl`). Flow kernels only: an ε kernel's steps have no such size."""
        raise ValueError(f"{type(self).__name__} is not a flow kernel: its steps have no size σ - σ'")

    def to(self, device: torch.device) -> "Kernel":
        """The same kernel with its constants on `device`: a host-to-device copy per step
        would make the host wait for the GPU to drain, so it could not queue the next call."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def with_noise_levels(self, noise_levels: torch.Tensor) -> "Kernel":
        """The same kernel with per-step noise levels (K,) replaced (0: the ODE there)."""
        if noise_levels.shape != self.noise_levels.shape:
            raise ValueError(f"noise levels of shape {tuple(noise_levels.shape)} for a {len(self.timesteps)}-step kernel")
        return replace(self, noise_levels=noise_levels.to(self.noise_levels))


@dataclass(frozen=True)
class EpsilonKernel(Kernel):
    """A kernel of an ε-prediction model on its ᾱ schedule: the forward process noises x0
    as q(x_t | x0) and the target is ε."""

    alpha_t: torch.Tensor
    """float64 ᾱ_t of step k."""
    alpha_prev: torch.Tensor
    """float64 ᾱ_t' of step k (ᾱ of timestep 0 past the end)."""

    def forward_process(self, x0, noise, step_index):
        alpha = self.alpha_t[step_index].float()
        timesteps = self.timesteps[step_index]
        return forward_noise(x0, noise, alpha), timesteps, noise.float(), ((1 - alpha) / alpha).sqrt()


@dataclass(frozen=True)
class DDIMKernel(EpsilonKernel):
    def step(self, prediction, x, step_index):
        alpha_t, alpha_prev = self.alpha_t[step_index], self.alpha_prev[step_index]
        return ddim_transition(prediction, x, alpha_t, alpha_prev, self.noise_levels[step_index])


@dataclass(frozen=True)
class LCMKernel(EpsilonKernel):
    c_skip: torch.Tensor
    """float64 boundary-condition scalings of timestep t at step k."""
    c_out: torch.Tensor

    guidance_embedding: ClassVar[bool] = True

    def step(self, prediction, x, step_index):
        mean, std, pred_x0, _ = lcm_transition(
            prediction, x, self.alpha_t[step_index], self.alpha_prev[step_index],
            self.c_skip[step_index], self.c_out[step_index],
        )
        return mean, std, pred_x0


@dataclass(frozen=True)
class FlowKernel(Kernel):
    """A kernel of a velocity-prediction model on its σ schedule: the forward process is
    x_σ = (1-σ)·x0 + σ·ε and the target is the velocity ε - x0."""

    sigma: torch.Tensor
    """float64 σ of step k."""
    sigma_next: torch.Tensor
    """float64 σ' of step k (the terminal σ after the last)."""

    def step_size(self, step_index):
        return self.sigma[step_index] - self.sigma_next[step_index]

    def forward_process(self, x0, noise, step_index):
        sigma = self.sigma[step_index].float()
        timesteps = self.timesteps[step_index]
        return forward_flow(x0, noise, sigma), timesteps, noise.float() - x0.float(), sigma


@dataclass(frozen=True)
class FlowGRPOKernel(FlowKernel):
    def step(self, prediction, x, step_index):
        sigma, sigma_next = self.sigma[step_index], self.sigma_next[step_index]
        # σ = 1 is replaced by the schedule's second σ, σ' of step 0.
        sigma_max = self.sigma_next[0].expand_as(sigma)
        return flow_transition(prediction, x, sigma, sigma_next, sigma_max, self.noise_levels[step_index])


@dataclass(frozen=True)
class DanceGRPOKernel(FlowKernel):
    def step(self, prediction, x, step_index):
        sigma, sigma_next = self.sigma[step_index], self.sigma_next[step_index]
        return dance_flow_transition(prediction, x, sigma, sigma_next, self.noise_levels[step_index])


FLOW_KERNELS: dict[str, type[FlowKernel]] = {"flow-grpo": FlowGRPOKernel, "dance-grpo": DanceGRPOKernel}
"""The flow sampler's kernel of each `SamplerConfig.flow_sde`."""
