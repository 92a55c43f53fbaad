"""The ε-prediction family: a Stable-Diffusion-shaped UNet + VAE + CLIP text encoder, whose
kernels are DDIM and LCM on the model's own ᾱ schedule.

Components load one by one from a local folder (the layout that `save_pretrained` writes,
found or downloaded by `zoo.loading`), so any SD-shaped checkpoint works whatever pipeline
class it was saved with, and no safety checker or feature extractor is ever loaded.

Timesteps: `SamplerConfig.timestep_spacing` places them, or None keeps the model's
scheduler config. For DDIM, "trailing" starts every step count at the top of the schedule
(t = 999, and 999, 499 at 2 steps), where Stable Diffusion 1.5's own "leading" config
starts a 1-step sample at t = 1, pure noise that is never denoised. For LCM, "skipping"
is the LCM paper's skipping-step rule as RLCM computes it (`lcm_skipping_timesteps`).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils import convert_unet_state_dict_to_peft
from transformers import CLIPTextModel, CLIPTokenizer

from zoo.kernels import DDIMKernel, EpsilonKernel, LCMKernel, SamplerConfig, SamplerConfigError
from zoo.policy import PRECISION_DTYPES, MixedPrecision, Policy


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


class UNetPolicy(Policy):
    """UNet + VAE + CLIP text encoder + tokenizer: ε-prediction, Stable Diffusion shaped."""

    prediction = "epsilon"
    samplers = ("ddim", "lcm")
    suggested_sampler = "ddim"
    description = "an ε-prediction UNet"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler_config: dict,
        **options,
    ):
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        super().__init__(unet, vae, (text_encoder,), scheduler_config, **options)

    @classmethod
    def load(cls, source: str, *, mixed_precision: MixedPrecision = "no", **options) -> "UNetPolicy":
        """From a local pipeline folder (`resolve_model`'s answer)."""
        kwargs = {"local_files_only": True}
        dtype = PRECISION_DTYPES[mixed_precision]
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs)
        scheduler_config = DDIMScheduler.load_config(source, subfolder="scheduler", **kwargs)
        return cls(unet, vae, text_encoder, tokenizer, scheduler_config, mixed_precision=mixed_precision, **options)

    def scheduler_for(self, kind: str, timestep_spacing: str | None = None) -> DDIMScheduler | LCMScheduler:
        """A fresh scheduler of the sampler's kind built from the model's own config, so
        its beta schedule is the model's; a DDIM `timestep_spacing` ("trailing", ...)
        replaces the config's, None keeps it. LCM's spacing is not a scheduler setting
        (diffusers' LCMScheduler ignores it): `build_kernel` applies it."""
        if kind == "ddim":
            spacing = {"timestep_spacing": timestep_spacing} if timestep_spacing is not None else {}
            return DDIMScheduler.from_config(self.scheduler_config, **spacing)
        return LCMScheduler.from_config(self.scheduler_config)

    def build_kernel(self, config: SamplerConfig) -> EpsilonKernel:
        """Timesteps from the scheduler's own `set_timesteps`, so its config's spacing applies,
        or LCM's skipping-step rule when the spacing is "skipping"; ᾱ_t' is DDIM's previous
        timestep t - N/K, or LCM's next timestep, and ᾱ of timestep 0 past the end."""
        kind, num_steps = config.kind, config.num_steps
        scheduler = self.scheduler_for(kind, config.timestep_spacing)
        if kind == "lcm" and config.timestep_spacing == "skipping":
            settings = scheduler.config
            timesteps = lcm_skipping_timesteps(settings.num_train_timesteps, settings.original_inference_steps, num_steps)
        else:
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
        constants = dict(
            timesteps=timesteps, noise_levels=torch.full((num_steps,), float(config.eta), dtype=torch.float64),
            alpha_t=alphas_cumprod[timesteps], alpha_prev=alpha_prev,
        )
        if kind == "ddim":
            return DDIMKernel(**constants)
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timesteps.to(torch.float64))
        return LCMKernel(**constants, c_skip=c_skip, c_out=c_out)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P, L, D) text-encoder hidden states, padded to the tokenizer's max length."""
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.device))[0]

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        guidance_embedding: bool = False,
    ) -> torch.Tensor:
        """ε̂ (N,C,h,w) in float32 (float64 for a policy whose weights are), guided.

        Classifier-free guidance with the conditional and unconditional halves in one
        batched UNet call; but with `guidance_embedding` (LCM's kernel) and a UNet distilled
        with a guidance embedding (`time_cond_proj_dim`), w = guidance - 1 is embedded and
        passed as `timestep_cond` (one pass).
        """
        n = latents.shape[0]
        guidance_embedding = guidance_embedding and self.unet.config.time_cond_proj_dim is not None
        use_cfg = guidance_scale > 1.0 and not guidance_embedding
        timestep_cond = None
        if guidance_embedding:
            w = torch.full((n,), guidance_scale - 1.0, device=self.device)
            # LCM's guidance embedding is the VDM sinusoid of 1000·w (sin half first).
            timestep_cond = get_timestep_embedding(
                w * 1000.0, self.unet.config.time_cond_proj_dim, flip_sin_to_cos=False, downscale_freq_shift=1
            ).to(self.weight_dtype)
        if use_cfg:
            uncond = self.uncond_embeds().expand(n, -1, -1)
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            prompt_embeds = torch.cat([uncond, prompt_embeds])
        with self._autocast():
            output = self.denoiser(
                latents.to(self.weight_dtype),
                timesteps,
                encoder_hidden_states=prompt_embeds.to(self.weight_dtype),
                timestep_cond=timestep_cond,
            ).sample
        return self._prediction(output, guidance_scale if use_cfg else None)

    # --- LoRA export ------------------------------------------------------------------

    lora_prefix = "unet"

    @property
    def lora_pipeline(self) -> type:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def peft_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_unet_state_dict_to_peft(state)
