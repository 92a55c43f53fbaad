"""The trajectory sampler: K transitions of a kernel, each a Gaussian with a known
log-density, recorded for replay.

The model family's adapter builds the kernel (`Policy.kernel`: DDIM and LCM on a UNet's ᾱ
schedule, the Flow-GRPO and DanceGRPO SDEs on a flow transformer's σ; zoo/kernels.py has
their formulas), and predicts at each step (`Policy.predict`); this module only runs them.
`zoo.kernels.SamplerConfig` names the kernel and its settings, as the CLI and the
algorithms' configs do.

DDIM with eta = 0 and the flow ODE are deterministic and have no density (their recorded
log-probs are NaN); they sample data for losses that read no log-probs (NFT trains on the
final latents, noised again by `TrajectorySampler.forward_process`) and the evaluations.

Flow sigmas are the model's own FlowMatchEulerDiscreteScheduler's at K steps (its time
shift, and its dynamic shift from the latent size when the config asks for one); the
model's timestep input is σ·1000, as the diffusers pipelines pass it. Transitions are
addressed by step index k (0 = first, noisiest step), which is all a re-scoring call needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

from zoo.kernels import KLForm, SamplerConfig, gaussian_kl, gaussian_log_prob
from zoo.trajectory import Trajectory

if TYPE_CHECKING:
    from zoo.kernels import Kernel
    from zoo.policy import Policy

class TrajectorySampler:
    """Samples trajectories with per-step log-probs and re-scores stored transitions.

    Sampling and re-scoring run the same `transition` code, so re-scoring a stored
    transition under unchanged weights reproduces its log-prob exactly.
    """

    def __init__(self, policy: "Policy", config: SamplerConfig, kernel: "Kernel | None" = None):
        """`kernel` replaces the one the policy builds for `config` (`with_noise_levels`)."""
        config.validate(for_training=False)
        self.policy = policy
        self.config = config
        self.kernel = policy.kernel(config) if kernel is None else kernel

    def with_noise_levels(self, noise_levels: torch.Tensor) -> "TrajectorySampler":
        """This sampler with per-step noise levels (K,) in place of `config.eta` at every
        step: 0 runs the ODE at a step (deterministic, no log-prob), as an epoch that trains
        a window of SDE steps samples (`zoo.algorithm.EpochPlan.noise_levels`)."""
        return TrajectorySampler(self.policy, self.config, self.kernel.with_noise_levels(noise_levels))

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """The model's prediction at (x_t, t) as the kernel reads it (ε̂ or the velocity v̂), guided."""
        return self.policy.predict(latents, timesteps, prompt_embeds, guidance_scale, self.kernel.guidance_embedding)

    def forward_process(
        self, x0: torch.Tensor, noise: torch.Tensor, step_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise clean latents x0 (..., C, h, w) with ε to the noise level of step k (...):
        returns (x_t, timesteps (...), the prediction's target (ε; ε - x0 for flow), and
        the x̂0 error per unit of prediction error (...): sqrt((1-ᾱ_t)/ᾱ_t), or σ), float32."""
        return self.kernel.forward_process(x0, noise, step_index)

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

        latents (N,C,h,w), step_index (N,) long, prompt_embeds (N,L,D). Gradients flow
        through the denoiser when enabled by the caller.
        """
        step_index = step_index.to(self.policy.device)
        prediction = self.predict(latents, self.kernel.timesteps[step_index], prompt_embeds, self.config.guidance_scale)
        return self.kernel.step(prediction, latents, step_index)

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
        kl_form: KLForm = "exact",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) log-density of x_t -> x_t' under the current weights (with grad) and (N,)
        KL of the current transition Gaussian to the frozen base model's (`gaussian_kl`;
        the base's mean without grad, adapter disabled): two UNet calls. `kl_form`
        "flow-grpo" multiplies each KL by its flow step's size σ - σ' (`Kernel.step_size`):
        Flow-GRPO's term, which divides the squared mean difference by the SDE's noise level
        before its sqrt(σ - σ') (yifan123/flow_grpo ac4c86e, scripts/train_sd3.py:895;
        flow_grpo/diffusers_patch/sd3_sde_with_logprob.py:47, :59)."""
        # The reference first: in full fine-tuning it copies the base weights into the
        # parameters, which must not change under a graph still to be back-propagated.
        with torch.no_grad(), self.policy.reference():
            ref_mean, _, _ = self.transition(latents, step_index, prompt_embeds)
        mean, std, _ = self.transition(latents, step_index, prompt_embeds)
        kl = gaussian_kl(mean, ref_mean, std)
        if kl_form == "flow-grpo":
            kl = kl * self.kernel.step_size(step_index.to(self.policy.device)).to(kl.dtype)
        return gaussian_log_prob(next_latents, mean, std), kl

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

    def draw_noise(self, num_prompts: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """What `sample` draws from `generator` for `num_prompts` prompts of one trajectory
        each, in its order, without sampling: x_T (P, 1, C, h, w) and every step's noise
        (P, 1, K, C, h, w), so that a caller can hand a sample its part of a larger draw."""
        initial = self.initial_noise(num_prompts, 1, False, generator)
        shape = (num_prompts, *self.policy.latent_shape)
        steps = torch.stack([torch.randn(shape, generator=generator) for _ in range(self.config.num_steps)], dim=1)
        return initial, steps[:, None]

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
        timesteps = self.kernel.timesteps.expand(num_prompts, group_size, num_steps)
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
