"""The flow-matching policy: an SD3- or FLUX-shaped diffusers pipeline whose transformer
predicts the velocity v = ε - x0, with a LoRA adapter on its attention.

The pipeline loads whole (`StableDiffusion3Pipeline` or `FluxPipeline`, as its
model_index.json names it), components marked absent there (SD3 without T5) left out, and
stepzoo calls the pipeline's own `encode_prompt`, latent packing and timestep rule, so that
a sample here is the pipeline's sample: `tests/test_flow.py` checks the deterministic ODE
against the pipeline's output. Only the transformer's adapter trains.

Prompt embeddings are one tensor per prompt, as the samplers and losses store and batch
them: the sequence embeddings (L, D) with the pooled projection (D_pooled <= D, zero-padded
to D) appended as one more row; `predict_velocity` splits them again.

The T5 sequence length is the pipeline's default (`max_sequence_length`: SD3 256, FLUX 512),
except FLUX without a guidance embedding (FLUX.1-schnell): 256, the length its reference
encodes with (black-forest-labs/flux 802fb47, src/flux/cli.py:183) and diffusers' FLUX docs
cap it at ("max_sequence_length cannot be more than 256"); or none at all for a pipeline
without a T5 encoder: diffusers' SD3 pipeline pads 256 zero tokens for a missing one, which
carry nothing and cost attention. To reproduce such a model's samples in plain diffusers,
call its pipeline with max_sequence_length=0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict

from zoo.kernels import FLOW_KERNELS, FlowKernel, SamplerConfig, SamplerConfigError
from zoo.policy import PRECISION_DTYPES, MixedPrecision, Policy

PIPELINES = {"StableDiffusion3Pipeline": StableDiffusion3Pipeline, "FluxPipeline": FluxPipeline}
"""The flow-matching pipeline classes stepzoo loads, by model_index.json's `_class_name`."""

FLOW_LORA_TARGETS = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)
"""The joint attention's image and text projections: Flow-GRPO's SD3 LoRA targets
(yifan123/flow_grpo ac4c86e, scripts/train_sd3.py:419-428)."""


def pipeline_class(folder: str | Path, index: dict) -> type:
    """The pipeline class that `folder`'s model_index.json (`index`) names."""
    name = index["_class_name"]
    if name not in PIPELINES:
        raise ValueError(
            f"{folder}: a {name} is not a flow-matching pipeline stepzoo loads; "
            f"it loads {', '.join(PIPELINES)} folders"
        )
    return PIPELINES[name]


def calculate_shift(image_seq_len: int, config, max_shift_default: float) -> float:
    """diffusers' dynamic-shift μ: linear in the image token count between the config's
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift_default)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + base_shift - slope * base_len


class FlowPolicy(Policy):
    """A flow-matching transformer (SD3 or FLUX shaped) + VAE + text encoders."""

    prediction = "velocity"
    samplers = ("flow",)
    suggested_sampler = "flow"
    description = "a flow-matching transformer"

    def __init__(
        self,
        pipeline: StableDiffusion3Pipeline | FluxPipeline,
        *,
        resolution: int | None = None,
        max_sequence_length: int | None = None,
        **options,
    ):
        self.pipeline = pipeline
        self.flux = isinstance(pipeline, FluxPipeline)
        self.transformer = pipeline.transformer
        text_encoders = tuple(
            encoder for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if (encoder := getattr(pipeline, name, None)) is not None
        )
        self.vae_scale = pipeline.vae_scale_factor
        if resolution is None:
            resolution = pipeline.default_sample_size * self.vae_scale
        if resolution % (2 * self.vae_scale):
            raise ValueError(
                f"resolution {resolution}: must be a multiple of {2 * self.vae_scale} "
                "(the VAE's downsampling times the transformer's 2x2 patches)"
            )
        self.resolution = resolution
        has_t5 = getattr(pipeline, "text_encoder_3" if not self.flux else "text_encoder_2", None) is not None
        if max_sequence_length is None:
            long_t5 = self.flux and self.transformer.config.guidance_embeds
            max_sequence_length = (512 if long_t5 else 256) if has_t5 else 0
        self.max_sequence_length = max_sequence_length
        super().__init__(pipeline.transformer, pipeline.vae, text_encoders, dict(pipeline.scheduler.config), **options)

    @classmethod
    def load(cls, source: str, *, mixed_precision: MixedPrecision = "no", **options) -> "FlowPolicy":
        """From a local pipeline folder (`zoo.loading.resolve_model`'s answer)."""
        index = json.loads((Path(source) / "model_index.json").read_text())
        pipeline_type = pipeline_class(source, index)
        absent = {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}
        pipeline = pipeline_type.from_pretrained(
            source, dtype=PRECISION_DTYPES[mixed_precision], local_files_only=True, **absent
        )
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, mixed_precision=mixed_precision, **options)

    # --- sampling support -------------------------------------------------------------

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        channels = self.transformer.config.in_channels // (4 if self.flux else 1)
        side = self.resolution // self.vae_scale
        return (channels, side, side)

    def flow_scheduler(self, num_steps: int) -> FlowMatchEulerDiscreteScheduler:
        """The model's scheduler with its timesteps set for `num_steps` as its pipeline sets
        them: SD3 the scheduler's own spacing (μ from the image token count when the config
        shifts dynamically), FLUX sigmas linspace(1, 1/K, K) and always that μ."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        _, side, _ = self.latent_shape
        tokens = (side // 2) ** 2
        if self.flux:
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
            scheduler.set_timesteps(sigmas=sigmas, mu=calculate_shift(tokens, scheduler.config, 1.15), device="cpu")
        elif scheduler.config.get("use_dynamic_shifting"):
            scheduler.set_timesteps(num_steps, mu=calculate_shift(tokens, scheduler.config, 1.16), device="cpu")
        else:
            scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler

    def build_kernel(self, config: SamplerConfig) -> FlowKernel:
        """The SDE of `config.flow_sde` on the σ of `flow_scheduler`; the model's timestep
        input is σ·1000, as the diffusers pipelines pass it."""
        scheduler = self.flow_scheduler(config.num_steps)
        if len(scheduler.timesteps) != config.num_steps:
            raise SamplerConfigError(
                f"the {type(scheduler).__name__} gave {len(scheduler.timesteps)} timesteps for --steps {config.num_steps}"
            )
        sigmas = scheduler.sigmas.to(torch.float64)  # (K + 1,), the last the terminal σ
        return FLOW_KERNELS[config.flow_sde](
            timesteps=scheduler.timesteps.to(torch.float32).clone(),
            noise_levels=torch.full((config.num_steps,), float(config.eta), dtype=torch.float64),
            sigma=sigmas[:-1].clone(), sigma_next=sigmas[1:].clone(),
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(P, L + 1, D): the pipeline's prompt embeddings with the pooled projection as the
        last row (zero-padded to D)."""
        if self.flux:
            embeds, pooled, _ = self.pipeline.encode_prompt(
                prompts, prompts, device=self.device, max_sequence_length=self.max_sequence_length
            )
        else:
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                prompts, prompts, prompts, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        pooled = F.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1]))
        return torch.cat([embeds, pooled[:, None]], dim=1)

    def _split(self, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled_dim = self.transformer.config.pooled_projection_dim
        return prompt_embeds[:, :-1], prompt_embeds[:, -1, :pooled_dim]

    def predict(
        self, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor, guidance_scale: float,
        guidance_embedding: bool = False,
    ) -> torch.Tensor:
        """v̂ (N,C,h,w) in float32 (float64 for a policy whose weights are). timesteps (N,)
        are σ·1000. Classifier-free guidance (conditional and unconditional halves in one
        call) when guidance_scale > 1, except for a FLUX transformer with a guidance
        embedding (FLUX.1-dev), which takes the scale as an input in one pass whatever the
        kernel asks (`guidance_embedding` is the model's here)."""
        n = latents.shape[0]
        embedded = self.flux and self.transformer.config.guidance_embeds
        use_cfg = guidance_scale > 1.0 and not embedded
        if use_cfg:
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            prompt_embeds = torch.cat([self.uncond_embeds().expand(n, -1, -1), prompt_embeds])
        embeds, pooled = self._split(prompt_embeds.to(self.weight_dtype))
        hidden = latents.to(self.weight_dtype)
        with self._autocast():
            if self.flux:
                output = self._flux_forward(hidden, timesteps, embeds, pooled, guidance_scale if embedded else None)
            else:
                output = self.denoiser(
                    hidden_states=hidden, timestep=timesteps, encoder_hidden_states=embeds, pooled_projections=pooled
                ).sample
        return self._prediction(output, guidance_scale if use_cfg else None)

    def _flux_forward(
        self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor,
        guidance: float | None,
    ) -> torch.Tensor:
        """FluxPipeline's call: 2x2-packed latents with their position ids, zero text ids,
        timestep σ (the pipeline's t / 1000), unpacked back to (N, C, h, w)."""
        n, channels, height, width = latents.shape
        packed = FluxPipeline._pack_latents(latents, n, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance_input = None if guidance is None else torch.full((n,), guidance, device=latents.device)
        output = self.denoiser(
            hidden_states=packed, timestep=timesteps / 1000, guidance=guidance_input, pooled_projections=pooled,
            encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=image_ids,
        ).sample
        return FluxPipeline._unpack_latents(output, height * self.vae_scale, width * self.vae_scale, self.vae_scale)

    # --- LoRA export ------------------------------------------------------------------

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter in peft's key format, which diffusers' transformer LoRA loaders read
        (its SD3 and FLUX training scripts save it so)."""
        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}

    lora_prefix = "transformer"

    @property
    def lora_pipeline(self) -> type:
        return type(self.pipeline)

    def peft_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers writes a transformer's adapter in peft's keys already."""
        return state
