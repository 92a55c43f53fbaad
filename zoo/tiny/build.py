"""Train and save the tiny world's models: `python -m zoo.tiny.build --out zoo/tiny/assets --seed 0`.

Stages, each deterministic given the seed (one torch generator per stage, derived from it):
1. the CLIP judge (transformers CLIPModel + CLIPProcessor) -> <out>/clip, used by the
   `tiny-clip` reward like PickScore;
2. the VAE, with the latent scaling factor measured on data and written to its config;
3. the UNet and the CLIP text encoder, trained jointly from scratch on the train captions
   (10% empty captions for classifier-free guidance, EMA weights shipped)
   -> <out>/pipeline (DDIM, trailing spacing);
4. an LCM-style consistency distillation of that UNet (guidance-embedding input,
   LCMScheduler) -> <out>/pipeline-lcm, sharing the VAE, text encoder and tokenizer with
   <out>/pipeline through relative symlinks;
5. the flow-matching model: an SD3-shaped transformer trained by rectified flow on the
   frozen VAE latents and text encoder of <out>/pipeline -> <out>/pipeline-flow
   (StableDiffusion3Pipeline folder, FlowMatchEulerDiscreteScheduler; zoo/tiny/flow.py),
   storing only the transformer and configs (the rest links to <out>/pipeline);
6. the `tiny-aesthetic` proxy: an MLP head on the judge's mean patch token, trained on
   renders and base-model samples labelled with the `tiny-aesthetic-gold` rule
   (zoo/tiny/gold.py) plus Gaussian noise -> <out>/aesthetic (config.json +
   model.safetensors);
7. the few-step ("turbo") students, sampled without guidance (zoo/tiny/turbo.py): the base
   UNet distilled -> <out>/pipeline-turbo (StableDiffusionPipeline, DDIM, trailing spacing;
   VAE, text encoder and tokenizer linked to <out>/pipeline), and the flow model distilled
   -> <out>/pipeline-flow-turbo (StableDiffusion3Pipeline; only its transformer stored).

`--only flow`, `--only aesthetic`, `--only turbo` and `--only flow-turbo` run that stage alone
on the models already in <out>, keeping everything else there.

`--smoke` runs a few steps of every stage at tiny batch sizes (seconds), for the tests.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextModel

from zoo.tiny import DEFAULT_GUIDANCE, data, flow, gold, turbo
from zoo.tiny.judge import TinyAestheticHead, judge_patch_features, load_judge
from zoo.tiny.optim import ema_update, warmup_lr
from zoo.tiny.arch import (
    TEST_ARCH,
    TOKENIZER_MAX_LENGTH,
    TRAINED_ARCH,
    TinyArch,
    assemble_pipeline,
    build_tokenizer,
    make_ddim_scheduler,
    make_unet,
    make_vae,
    mark_float32_compute,
    save_pipeline,
    slim_tokenizer_folder,
    text_encoder_config,
)
from zoo import strict_json

# OpenAI CLIP's pixel statistics, so the judge's processor is configured like a real CLIP.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BuildConfig:
    """Hyperparameters of the whole build; the defaults are what ships."""

    out: Path = Path("zoo/tiny/assets")
    """Folder that receives clip/, pipeline/, pipeline-lcm/ and aesthetic/ (replaced if
    present; with --only, only that stage's folder is replaced)."""
    only: Literal["aesthetic", "flow", "turbo", "flow-turbo"] | None = None
    """Run this one stage on the assets already in --out instead of the whole build:
    `aesthetic` trains the tiny-aesthetic head from <out>/clip and <out>/pipeline, `flow`
    the flow-matching model from <out>/pipeline, `turbo` and `flow-turbo` the few-step
    students of <out>/pipeline and <out>/pipeline-flow."""
    seed: int = 0
    """Seeds every stage; the same seed rebuilds the same weights on the same torch build."""
    smoke: bool = False
    """A seconds-long run of every stage (tiny sizes, few steps) to test the build itself."""
    threads: int = 1
    """torch intra-op threads. One, although the machine has 2 cores: when another torch job
    shares the CPU, a 2-thread build slowed down 40x here (threads spin waiting for each
    other), while a 1-thread build only loses its share of the CPU."""

    clip_steps: int = 1000
    clip_batch: int = 96
    clip_lr: float = 1e-3
    clip_patch: int = 4
    """Vision patch side. With 8x8 patches (17 tokens, 10x cheaper) the judge mistook
    squares for circles: 79% accuracy after 600 steps."""
    clip_width: int = 64
    clip_layers: int = 3

    vae_steps: int = 800
    vae_batch: int = 48
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    """Small, as in Stable Diffusion's VAE: latents stay detailed, the KL keeps them bounded."""

    unet_steps: int = 2000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    empty_caption_rate: float = 0.1
    """Fraction of captions replaced by "" so the model also learns the unconditional score
    that classifier-free guidance needs."""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weighting (Hang et al. 2023): stops the easy low-noise timesteps from
    dominating the epsilon loss, which speeds up convergence of small models."""
    ema_decay: float = 0.999

    lcm_steps: int = 400
    lcm_batch: int = 32
    lcm_lr: float = 2e-4
    lcm_skip: int = 20
    """Teacher DDIM step in training timesteps: 1000 / 20 = 50, LCMScheduler's
    `original_inference_steps`, so the distilled timesteps are the ones it samples at."""
    lcm_guidance_range: tuple[float, float] = (2.0, 6.0)
    """Guidance scales (pipeline convention, 1 = none) the student learns to imitate."""
    lcm_target_decay: float = 0.95

    flow_steps: int = 3000
    flow_batch: int = 64
    flow_lr: float = 5e-4
    """Rectified-flow training of the tiny transformer (zoo/tiny/flow.py), captions dropped
    at `empty_caption_rate`, EMA at `ema_decay`."""

    aesthetic_renders: int = 384
    """Renders of the train captions (random size, position, shades) in the head's data."""
    aesthetic_large_renders: int = 256
    """Renders of the train captions drawn large and centred (radius in the top
    `aesthetic_large_radius` pixels of the range, centre within `aesthetic_large_offset`
    pixels of the middle), so the labelled data reaches the gold's optimum: without them
    the head scored the best renders 0.74 against a gold of 0.91."""
    aesthetic_large_radius: float = 2.0
    aesthetic_large_offset: float = 2.0
    aesthetic_samples_per_step: int = 352
    """Base-model samples of the train captions per step count (DDIM, eta 1, guidance
    zoo.tiny.DEFAULT_GUIDANCE) in the head's data."""
    aesthetic_steps: tuple[int, ...] = (1, 2, 4, 8)
    aesthetic_label_noise: float = 0.05
    """Std of the Gaussian noise added to the gold labels (the gold's std over the data is
    ~0.14): the proxy learns from limited, noisy labels, like a preference model."""
    aesthetic_hidden: int = 32
    aesthetic_train_steps: int = 3000
    aesthetic_batch: int = 128
    aesthetic_lr: float = 3e-3
    aesthetic_weight_decay: float = 1e-2

    turbo_method: Literal["endpoint", "consistency"] = "endpoint"
    """How the UNet student is distilled (zoo/tiny/turbo.py; chosen by `python -m
    zoo.tiny.compare_turbo`, results/tiny-world/README.md)."""
    turbo_guidance: float = 4.0
    """The teacher's guidance in its ODE solves (`zoo.tiny.DEFAULT_GUIDANCE`, where its 4-step
    DDIM ODE samples reach fidelity 0.95): the student learns the guided model in one pass."""
    turbo_teacher_steps: int = 8
    """Teacher DDIM (eta 0) steps over the whole path; a solve from a lower timestep takes
    its share, at least one."""
    turbo_levels: int = 8
    """The student is trained at the trailing timesteps of this step count (999, 874, ...,
    124), which hold those of 1, 2 and 4 steps: every timestep a few-step sampler calls it at."""
    turbo_pairs_per_level: int = 1024
    turbo_top_factor: int = 3
    """Times as many examples at the top level (pure noise), where every sample starts."""
    turbo_steps: int = 1500
    turbo_batch: int = 64
    turbo_lr: float = 2e-4
    turbo_ema_decay: float = 0.99
    turbo_consistency_skip: int = 20
    """`consistency` only: the teacher's DDIM step in timesteps (LCM's 50-step grid)."""
    turbo_consistency_target_decay: float = 0.95

    flow_turbo_method: Literal["endpoint", "reflow"] = "endpoint"
    flow_turbo_guidance: float = 6.0
    """The flow teacher's guidance in its ODE solves: at 8 Euler steps, fidelity 0.94 at 6
    against 0.84 at its sampling default 4 (measured on the held-out prompts when choosing)."""
    flow_turbo_teacher_steps: int = 8
    """Teacher Euler steps over the whole path (evenly spaced before the shift)."""
    flow_turbo_pairs_top: int = 4096
    """Examples from pure noise (σ = 1): the whole data of `reflow`."""
    flow_turbo_pairs_per_level: int = 512
    """`endpoint` only: examples at each σ below 1 that the Euler sampler visits at 2, 4 and
    8 steps (`zoo.tiny.turbo.flow_sampler_sigmas`)."""
    flow_turbo_steps: int = 2500
    """Training steps; 1500 before session 14's rebuild, whose student missed the 1-step
    target (results/tiny-world/notes.md: 2500 steps and 1.5x the top-level examples measured
    against it)."""
    flow_turbo_batch: int = 64
    flow_turbo_lr: float = 2e-4

    @property
    def arch(self) -> TinyArch:
        return TEST_ARCH if self.smoke else TRAINED_ARCH

    @property
    def flow_arch(self) -> flow.FlowArch:
        return flow.TEST_FLOW_ARCH if self.smoke else flow.TRAINED_FLOW_ARCH


SMOKE_OVERRIDES = dict(
    clip_steps=3, clip_batch=16, clip_width=32, clip_layers=2,
    vae_steps=3, vae_batch=8,
    unet_steps=3, unet_batch=8,
    lcm_steps=2, lcm_batch=4,
    flow_steps=2, flow_batch=4,
    aesthetic_renders=8, aesthetic_large_renders=4, aesthetic_samples_per_step=2, aesthetic_steps=(1, 2), aesthetic_train_steps=3,
    aesthetic_batch=8,
    turbo_teacher_steps=2, turbo_levels=2, turbo_pairs_per_level=4, turbo_steps=2, turbo_batch=4,
    flow_turbo_teacher_steps=2, flow_turbo_pairs_top=4, flow_turbo_pairs_per_level=2, flow_turbo_steps=2,
    flow_turbo_batch=4,
)


def _generator(seed: int, stage: int) -> torch.Generator:
    """The random stream of one stage, `stage` its id: the stage's number, except that the
    flow model (stage 5) draws from stream 6 and the aesthetic head (stage 6) from stream 5,
    the ids they were built with (a rebuild writes the same weights), and stage 7's flow
    student from stream 8."""
    return torch.Generator().manual_seed(1000 * seed + stage)


def _log(stage: str, step: int, total: int, loss: float, started: float) -> None:
    if step % max(1, total // 10) == 0 or step == total - 1:
        print(f"[{stage}] step {step + 1}/{total} loss {loss:.4f} {time.time() - started:.0f}s", flush=True)


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur half the batch and add a little noise: generated samples are softer and noisier
    than renders, and the judge must score them, not only clean drawings."""
    n = images.shape[0]
    kernel = torch.tensor([0.25, 0.5, 0.25])
    kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur = (torch.rand(n, 1, 1, 1, generator=generator) < 0.5).float()
    noise_level = 0.04 * torch.rand(n, 1, 1, 1, generator=generator)
    noisy = blur * blurred + (1 - blur) * images + noise_level * torch.randn(images.shape, generator=generator)
    return noisy.clamp(0, 1)


# ---------------------------------------------------------------- 1. CLIP judge


def judge_config(cfg: BuildConfig) -> CLIPConfig:
    text = text_encoder_config(cfg.arch).to_dict()
    vision = dict(
        image_size=data.IMAGE_SIZE,
        patch_size=cfg.clip_patch,
        hidden_size=cfg.clip_width,
        intermediate_size=4 * cfg.clip_width,
        num_hidden_layers=cfg.clip_layers,
        num_attention_heads=4,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.arch.text_hidden)


def judge_processor(tokenizer) -> CLIPProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": data.IMAGE_SIZE},
        crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def normalize_for_judge(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (B, 3, 32, 32) -> the judge's pixel_values, as its processor makes them."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def contrastive_loss(model: CLIPModel, images: torch.Tensor, captions: list[str], tokenizer) -> torch.Tensor:
    """Symmetric CLIP loss with the batch's unique captions as the text side.

    With 48 captions, a batch of 128 repeats each caption ~3 times: treating repeats as
    negatives would push matching pairs apart. Images -> captions: one correct class each.
    Captions -> images: a soft target spread evenly over all images of that caption.
    """
    unique = sorted(set(captions))
    labels = torch.tensor([unique.index(c) for c in captions])  # (B,)
    image_features = F.normalize(model.get_image_features(pixel_values=normalize_for_judge(images)).pooler_output, dim=-1)
    text_features = F.normalize(model.get_text_features(input_ids=_tokenize(tokenizer, unique)).pooler_output, dim=-1)
    logits = model.logit_scale.exp() * image_features @ text_features.T  # (B, U)
    image_to_text = F.cross_entropy(logits, labels)
    match = F.one_hot(labels, len(unique)).float()  # (B, U)
    text_targets = (match / match.sum(0, keepdim=True)).T  # (U, B), rows sum to 1
    text_to_image = -(text_targets * logits.T.log_softmax(-1)).sum(-1).mean()
    return (image_to_text + text_to_image) / 2


def train_judge(cfg: BuildConfig, tokenizer, out: Path) -> CLIPModel:
    torch.manual_seed(cfg.seed)
    generator = _generator(cfg.seed, 1)
    model = CLIPModel(judge_config(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.0)
    # The judge scores every caption, held-out ones included: it is the reward model of this
    # world, so it is trained on all of them (on fresh renders, never on generated samples).
    captions = data.all_captions()
    started = time.time()
    for step in range(cfg.clip_steps):
        warmup_lr(optimizer, step, cfg.clip_lr)
        images, batch_captions = data.sample_batch(cfg.clip_batch, captions, generator)
        loss = contrastive_loss(model, _augment(images, generator), batch_captions, tokenizer)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        _log("clip", step, cfg.clip_steps, loss.item(), started)
    model.eval()
    model.half().save_pretrained(out)
    model.float()
    mark_float32_compute(out)
    judge_processor(tokenizer).save_pretrained(out)
    slim_tokenizer_folder(out)
    return model


# ---------------------------------------------------------------- 2. VAE


def train_vae(cfg: BuildConfig):
    torch.manual_seed(cfg.seed)
    generator = _generator(cfg.seed, 2)
    vae = make_vae(cfg.arch, data.IMAGE_SIZE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    captions = data.train_captions()
    started = time.time()
    for step in range(cfg.vae_steps):
        warmup_lr(optimizer, step, cfg.vae_lr)
        images, _ = data.sample_batch(cfg.vae_batch, captions, generator)
        pixels = 2 * images - 1
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, pixels) + cfg.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _log("vae", step, cfg.vae_steps, loss.item(), started)
    vae.eval().requires_grad_(False)
    # Stable Diffusion scales latents to unit variance before diffusion; a small VAE's
    # latents are far from that (std ~1.6 in the prototype), so measure it.
    images, _ = data.sample_batch(512 if not cfg.smoke else 16, captions, generator)
    latents = vae.encode(2 * images - 1).latent_dist.sample(generator)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    reconstruction = (vae.decode(vae.encode(2 * images - 1).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2
    psnr = -10 * math.log10(F.mse_loss(reconstruction, images).item())
    print(f"[vae] scaling_factor {vae.config.scaling_factor:.4f} latent mean {latents.mean():.3f} psnr {psnr:.1f} dB", flush=True)
    return vae


# ---------------------------------------------------------------- 3. UNet + text encoder


def _encode_latents(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(2 * images - 1).latent_dist.sample(generator) * vae.config.scaling_factor


def train_unet(cfg: BuildConfig, vae, tokenizer) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    torch.manual_seed(cfg.seed)
    generator = _generator(cfg.seed, 3)
    unet = make_unet(cfg.arch, data.IMAGE_SIZE // 2, lcm=False)
    text_encoder = CLIPTextModel(text_encoder_config(cfg.arch))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    scheduler = make_ddim_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod  # (1000,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = snr.clamp(max=cfg.min_snr_gamma) / snr  # (1000,) min-SNR-gamma for epsilon targets
    captions = data.train_captions()
    started = time.time()
    for step in range(cfg.unet_steps):
        warmup_lr(optimizer, step, cfg.unet_lr)
        images, batch_captions = data.sample_batch(cfg.unet_batch, captions, generator)
        drop = torch.rand(len(batch_captions), generator=generator) < cfg.empty_caption_rate
        batch_captions = ["" if d else c for c, d in zip(batch_captions, drop.tolist())]
        latents = _encode_latents(vae, images, generator)  # (B, 4, 16, 16)
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(_tokenize(tokenizer, batch_captions)).last_hidden_state  # (B, 16, D)
        prediction = unet(noisy, t, hidden).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (loss_weight[t] * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        # Warm-up of the EMA decay (as in diffusers' EMAModel) so the random init does not
        # linger in the shipped weights of a short run.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        _log("unet", step, cfg.unet_steps, loss.item(), started)
    return ema_unet.eval(), ema_text.eval()


# ---------------------------------------------------------------- 4. LCM distillation


def _consistency_output(unet, x_t, t, hidden, w_embedding, alphas_cumprod):
    """f(x_t, t) = c_skip x_t + c_out x̂0, x̂0 from the epsilon prediction."""
    eps = unet(x_t, t, hidden, timestep_cond=w_embedding).sample
    x0 = turbo.x0_from_eps(x_t, eps, alphas_cumprod[t].view(-1, 1, 1, 1))
    c_skip, c_out = turbo.boundary_scalings(t)
    return c_skip * x_t + c_out * x0


def distill_lcm(cfg: BuildConfig, teacher: UNet2DConditionModel, text_encoder, vae, tokenizer) -> UNet2DConditionModel:
    """Latent consistency distillation (Luo et al. 2023, arXiv:2310.04378).

    The student starts as the teacher plus a zero-initialised guidance-embedding input.
    Each step: noise a latent to t on the 50-step grid; the teacher, with classifier-free
    guidance w, takes one DDIM step to t - 20; the student's consistency output at
    (x_t, t) is pulled towards the target network's output at (x_{t-20}, t - 20).
    """
    torch.manual_seed(cfg.seed)
    generator = _generator(cfg.seed, 4)
    student = make_unet(cfg.arch, data.IMAGE_SIZE // 2, lcm=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in name for name in missing), (missing, unexpected)
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    target = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lcm_lr, weight_decay=0.0)
    noise_schedule = make_ddim_scheduler()
    alphas_cumprod = noise_schedule.alphas_cumprod
    grid = torch.arange(cfg.lcm_skip - 1, 1000, cfg.lcm_skip)  # (50,) 19, 39, ..., 999
    captions = data.train_captions()
    with torch.no_grad():
        empty_hidden = text_encoder(_tokenize(tokenizer, [""])).last_hidden_state
    low, high = cfg.lcm_guidance_range
    started = time.time()
    for step in range(cfg.lcm_steps):
        warmup_lr(optimizer, step, cfg.lcm_lr)
        images, batch_captions = data.sample_batch(cfg.lcm_batch, captions, generator)
        n = len(batch_captions)
        latents = _encode_latents(vae, images, generator)
        t = grid[torch.randint(len(grid), (n,), generator=generator)]  # (B,)
        t_prev = (t - cfg.lcm_skip).clamp(min=0)
        x_t = noise_schedule.add_noise(latents, torch.randn(latents.shape, generator=generator), t)
        guidance = low + (high - low) * torch.rand(n, generator=generator)  # (B,)
        # The very embedding the pipeline computes at sampling time (it ignores `self`).
        w_embedding = StableDiffusionPipeline.get_guidance_scale_embedding(
            None, guidance - 1, embedding_dim=student.config.time_cond_proj_dim
        )
        with torch.no_grad():
            hidden = text_encoder(_tokenize(tokenizer, batch_captions)).last_hidden_state
            eps_both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([hidden, empty_hidden.expand_as(hidden)])).sample
            eps_cond, eps_uncond = eps_both.chunk(2)
            g = guidance.view(-1, 1, 1, 1)
            eps = eps_uncond + g * (eps_cond - eps_uncond)
            alpha, alpha_prev = alphas_cumprod[t].view(-1, 1, 1, 1), alphas_cumprod[t_prev].view(-1, 1, 1, 1)
            x0 = (x_t - (1 - alpha).sqrt() * eps) / alpha.sqrt()
            x_prev = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
            goal = _consistency_output(target, x_prev, t_prev, hidden, w_embedding, alphas_cumprod)
        prediction = _consistency_output(student, x_t, t, hidden, w_embedding, alphas_cumprod)
        # Pseudo-Huber distance as in the LCM paper: robust to the rare huge x̂0 error at
        # the noisiest timesteps, where x̂0 divides by sqrt(alpha) ~ 0.07.
        loss = ((prediction - goal).pow(2) + 1e-6).sqrt().mean() - 1e-3
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        ema_update(target, student, cfg.lcm_target_decay)
        _log("lcm", step, cfg.lcm_steps, loss.item(), started)
    return target.eval()


# ---------------------------------------------------------------- 5. flow-matching model


def train_flow(cfg: BuildConfig, out: Path) -> None:
    """<out>/pipeline-flow from <out>/pipeline's frozen VAE and text encoder."""
    torch.manual_seed(cfg.seed)
    generator = _generator(cfg.seed, 6)
    base = out / "pipeline"
    pipe = flow.tiny_flow_pipeline(base)
    pipe.register_modules(transformer=flow.make_transformer(
        cfg.flow_arch, pipe.text_encoder.config.hidden_size, data.IMAGE_SIZE // 2, pipe.vae.config.latent_channels
    ))
    trained = flow.train_flow_transformer(
        pipe, steps=cfg.flow_steps, batch=cfg.flow_batch, lr=cfg.flow_lr, empty_caption_rate=cfg.empty_caption_rate,
        ema_decay=cfg.ema_decay, generator=generator, log=_log,
    )
    pipe.register_modules(transformer=trained)
    flow.save_flow_pipeline(pipe, out / "pipeline-flow", base)


# ---------------------------------------------------------------- 6. aesthetic proxy head


def aesthetic_training_images(cfg: BuildConfig, pipe: StableDiffusionPipeline, generator: torch.Generator):
    """(images (N, 3, 32, 32), source of each: "render", "large render" or "<k> steps"):
    renders and base samples of the train captions, all drawn from `generator`."""
    captions = data.train_captions()
    renders, _ = data.sample_batch(cfg.aesthetic_renders, captions, generator)
    count = cfg.aesthetic_large_renders
    large_captions = [captions[i] for i in torch.randint(len(captions), (count,), generator=generator).tolist()]
    radius = data.MAX_RADIUS - cfg.aesthetic_large_radius * torch.rand(count, generator=generator)
    centre = data.IMAGE_SIZE / 2 + cfg.aesthetic_large_offset * (2 * torch.rand(count, 2, generator=generator) - 1)
    large = data.render(large_captions, generator, radius=radius, centre=centre)
    batches = [renders, large]
    sources = ["render"] * len(renders) + ["large render"] * count
    pipe.set_progress_bar_config(disable=True)
    chunk = 128
    for steps in cfg.aesthetic_steps:
        for start in range(0, cfg.aesthetic_samples_per_step, chunk):
            count = min(chunk, cfg.aesthetic_samples_per_step - start)
            prompts = [captions[i] for i in torch.randint(len(captions), (count,), generator=generator).tolist()]
            with torch.no_grad():
                images = pipe(
                    prompts, num_inference_steps=steps, guidance_scale=DEFAULT_GUIDANCE, eta=1.0,
                    generator=generator, output_type="pt",
                ).images
            batches.append(images.float().clamp(0, 1))
            sources += [f"{steps} steps"] * count
    return torch.cat(batches), sources


def train_aesthetic_head(cfg: BuildConfig, pipe: StableDiffusionPipeline, clip_dir: Path, out: Path) -> dict:
    """Trains the tiny-aesthetic head and saves it to `out`; returns its training record.

    Data: `aesthetic_renders` renders, `aesthetic_large_renders` large centred renders and
    `aesthetic_samples_per_step` base samples at each of `aesthetic_steps` (train
    captions), labelled with zoo.tiny.gold.aesthetic plus
    N(0, aesthetic_label_noise^2). Inputs: the judge's mean patch tokens (`judge_patch_features`),
    computed as the reward computes them. Loss: MSE on standardised labels; the label
    mean and std are folded into the last layer, so the head outputs gold units.
    """
    torch.manual_seed(cfg.seed)
    generator = _generator(cfg.seed, 5)
    started = time.time()
    images, sources = aesthetic_training_images(cfg, pipe, generator)
    sampled = time.time() - started
    judge, _, transform = load_judge(clip_dir)
    with torch.no_grad():
        features = judge_patch_features(judge, transform, images)  # (N, D)
    gold_labels = gold.aesthetic(images)  # (N,)
    labels = gold_labels + cfg.aesthetic_label_noise * torch.randn(gold_labels.shape, generator=generator)
    mean, std = labels.mean(), labels.std().clamp(min=1e-6)
    head = TinyAestheticHead(features.shape[1], cfg.aesthetic_hidden)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.aesthetic_lr, weight_decay=cfg.aesthetic_weight_decay)
    for step in range(cfg.aesthetic_train_steps):
        batch = torch.randint(len(labels), (cfg.aesthetic_batch,), generator=generator)
        loss = F.mse_loss(head(features[batch]), (labels[batch] - mean) / std)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _log("aesthetic", step, cfg.aesthetic_train_steps, loss.item(), started)
    last = head.layers[2]
    with torch.no_grad():
        last.weight.mul_(std)
        last.bias.mul_(std).add_(mean)
        predicted = head(features)
    fit = torch.corrcoef(torch.stack([predicted, gold_labels]))[0, 1].item()
    record = dict(
        images=len(labels),
        sources={source: sources.count(source) for source in dict.fromkeys(sources)},
        captions="zoo.tiny.data.train_captions()",
        sampler=f"base pipeline, DDIM eta 1, guidance {DEFAULT_GUIDANCE}",
        label="zoo.tiny.gold.aesthetic + N(0, sigma^2)",
        label_noise=cfg.aesthetic_label_noise,
        label_mean=round(mean.item(), 4),
        label_std=round(std.item(), 4),
        train_steps=cfg.aesthetic_train_steps,
        batch=cfg.aesthetic_batch,
        lr=cfg.aesthetic_lr,
        weight_decay=cfg.aesthetic_weight_decay,
        seed=cfg.seed,
        train_pearson_vs_gold=round(fit, 4),
        sampling_seconds=round(sampled, 1),
    )
    print(f"[aesthetic] {len(labels)} images, train Pearson vs gold {fit:.3f}", flush=True)
    if out.exists():
        shutil.rmtree(out)
    head.save_pretrained(
        out,
        extra=dict(
            input="the tiny judge's (zoo/tiny/assets/clip) vision tower's last hidden state, mean over the patch "
            "tokens, images preprocessed by its processor",
            output="predicted tiny-aesthetic-gold (zoo.tiny.gold.aesthetic), 0..1",
            training=record,
        ),
    )
    return record


# ---------------------------------------------------------------- 7. few-step students


def _encoder(vae, shift: float = 0.0):
    """images (B, 3, 32, 32) in [0, 1], generator -> scaled latents, as each model was trained."""

    def encode(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return (vae.encode(2 * images - 1).latent_dist.sample(generator) - shift) * vae.config.scaling_factor

    return encode


def train_turbo(cfg: BuildConfig, out: Path) -> dict:
    """<out>/pipeline-turbo from <out>/pipeline (loaded from disk, as `--only turbo` does);
    returns the stage's record (method, examples, seconds of pair drawing and training)."""
    torch.manual_seed(cfg.seed)
    generator = _generator(cfg.seed, 7)
    pipe = _load_base(out)
    unet, alphas_cumprod = pipe.unet.requires_grad_(False), pipe.scheduler.alphas_cumprod
    captions = data.train_captions()
    with torch.no_grad():
        hidden = pipe.text_encoder(_tokenize(pipe.tokenizer, captions + [""])).last_hidden_state  # (41, L, D)
    empty_row = len(captions)
    encode = _encoder(pipe.vae)
    started = time.time()
    record: dict = dict(method=cfg.turbo_method)
    if cfg.turbo_method == "consistency":
        student = turbo.distill_unet_consistency(
            unet, hidden, empty_row, alphas_cumprod, encode, steps=cfg.turbo_steps, batch=cfg.turbo_batch,
            lr=cfg.turbo_lr, skip=cfg.turbo_consistency_skip, guidance=cfg.turbo_guidance,
            target_decay=cfg.turbo_consistency_target_decay, generator=generator, log=_log,
        )
    else:
        def predict(x, t, rows):
            return unet(x, t, hidden[rows]).sample

        def noised(latents, noise, level):
            alpha = alphas_cumprod[int(level)]
            return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise

        def solve(start, level, rows):
            steps = turbo.teacher_steps_for((level + 1) / turbo.NUM_TRAIN_TIMESTEPS, cfg.turbo_teacher_steps)
            return turbo.unet_teacher_solve(predict, start, int(level), rows, empty_row, alphas_cumprod,
                                            cfg.turbo_guidance, steps)

        levels = turbo.trailing_timesteps(cfg.turbo_levels).tolist()
        pairs = turbo.make_pairs(
            turbo.endpoint_plan(levels, levels[0], cfg.turbo_pairs_per_level, cfg.turbo_top_factor),
            is_top=lambda level: level == levels[0], noised=noised, solve=solve, encode=encode,
            batch=cfg.turbo_batch, generator=generator,
        )
        record.update(examples=int(pairs.level.shape[0]), pair_seconds=round(time.time() - started, 1))
        student = turbo.regress(
            copy.deepcopy(unet), pairs, turbo.unet_endpoint_loss(alphas_cumprod, hidden), steps=cfg.turbo_steps,
            batch=cfg.turbo_batch, lr=cfg.turbo_lr, ema_decay=cfg.turbo_ema_decay, generator=generator,
            stage="turbo", log=_log,
        )
    record["train_seconds"] = round(time.time() - started - record.get("pair_seconds", 0.0), 1)
    pipe.register_modules(unet=student)
    # A previous student's folder links into the base pipeline: saving over it would write
    # through those links.
    shutil.rmtree(out / "pipeline-turbo", ignore_errors=True)
    save_pipeline(pipe, out / "pipeline-turbo", half=True)
    _link_shared(out / "pipeline-turbo", out / "pipeline")
    return record


def train_flow_turbo(cfg: BuildConfig, out: Path) -> dict:
    """<out>/pipeline-flow-turbo from <out>/pipeline-flow; returns the stage's record."""
    torch.manual_seed(cfg.seed)
    generator = _generator(cfg.seed, 8)
    pipe = StableDiffusion3Pipeline.from_pretrained(out / "pipeline-flow", text_encoder_3=None, tokenizer_3=None)
    teacher, shift = pipe.transformer.requires_grad_(False), pipe.scheduler.config.shift
    captions = data.train_captions()
    embeds, pooled = flow.prompt_features(pipe, captions + [""])
    empty_row = len(captions)

    def predict(model, x, sigma, rows):
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=embeds[rows],
                     pooled_projections=pooled[rows]).sample

    def solve(start, sigma, rows):
        steps = turbo.teacher_steps_for(turbo.unshift_sigma(torch.tensor(sigma), shift).item(), cfg.flow_turbo_teacher_steps)
        return turbo.flow_teacher_solve(lambda x, s, r: predict(teacher, x, s, r), start, sigma, rows, empty_row,
                                        cfg.flow_turbo_guidance, steps, shift)

    levels = [1.0] + (turbo.flow_sampler_sigmas(pipe.scheduler, (2, 4, 8)) if cfg.flow_turbo_method == "endpoint" else [])
    plan = [(1.0, cfg.flow_turbo_pairs_top)] + [(sigma, cfg.flow_turbo_pairs_per_level) for sigma in levels[1:]]
    started = time.time()
    pairs = turbo.make_pairs(
        plan, is_top=lambda level: level == 1.0, noised=lambda latents, noise, sigma: (1 - sigma) * latents + sigma * noise,
        solve=solve, encode=_encoder(pipe.vae, pipe.vae.config.shift_factor), batch=cfg.flow_turbo_batch,
        generator=generator,
    )
    record = dict(method=cfg.flow_turbo_method, examples=int(pairs.level.shape[0]),
                  pair_seconds=round(time.time() - started, 1))
    loss = turbo.reflow_loss(predict, shift) if cfg.flow_turbo_method == "reflow" else turbo.flow_endpoint_loss(predict)
    student = turbo.regress(
        copy.deepcopy(teacher), pairs, loss, steps=cfg.flow_turbo_steps, batch=cfg.flow_turbo_batch,
        lr=cfg.flow_turbo_lr, ema_decay=cfg.turbo_ema_decay, generator=generator, stage="flow-turbo", log=_log,
    )
    record["train_seconds"] = round(time.time() - started - record["pair_seconds"], 1)
    pipe.register_modules(transformer=student)
    flow.save_flow_pipeline(pipe, out / "pipeline-flow-turbo", out / "pipeline")
    return record


def _link_shared(student_folder: Path, base_folder: Path) -> None:
    """Point a distilled pipeline's VAE, text encoder and tokenizer at the base pipeline's
    (relative symlinks): they are the same weights, and a second copy of the 49,408-row
    token table would cost the size budget ~8 MB."""
    for component in ("vae", "text_encoder", "tokenizer"):
        shutil.rmtree(student_folder / component)
        os.symlink(Path("..") / base_folder.name / component, student_folder / component)


def _link_judge_vocabulary(out: Path) -> None:
    """The judge's vocab.json and merges.txt are the pipeline tokenizer's (one CLIP BPE):
    relative links instead of a second copy (1.5 MB of the tree's size budget)."""
    for name in ("vocab.json", "merges.txt"):
        (out / "clip" / name).unlink()
        os.symlink(Path("..") / "pipeline" / "tokenizer" / name, out / "clip" / name)


def _command(cfg: BuildConfig) -> str:
    return (
        f"python -m zoo.tiny.build --out {cfg.out} --seed {cfg.seed}"
        + (f" --only {cfg.only}" if cfg.only else "")
        + (" --smoke" if cfg.smoke else "")
        + "".join(f" --{name.replace('_', '-')} {getattr(cfg, name)}" for name in ("turbo_method", "flow_turbo_method")
                  if getattr(cfg, name) != getattr(BuildConfig, name))
    )


def _load_base(out: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stamp_aesthetic(cfg: BuildConfig, seconds: float) -> None:
    """Adds the command, stage wall time, torch version and threads to the head's config."""
    config_path = cfg.out / "aesthetic" / "config.json"
    config = json.loads(config_path.read_text())
    config["training"].update(command=_command(cfg), seconds=seconds, torch=torch.__version__, threads=cfg.threads)
    config_path.write_text(strict_json.dumps(config, indent=2) + "\n")


def build_aesthetic_only(cfg: BuildConfig) -> None:
    """Stage 6 alone: <out>/aesthetic from <out>/clip and <out>/pipeline. Its time is
    recorded in <out>/aesthetic/config.json and in <out>/build_info.json's stage_seconds."""
    missing = [name for name in ("clip", "pipeline") if not (cfg.out / name).is_dir()]
    if missing:
        raise SystemExit(f"--only aesthetic needs {', '.join(missing)} in {cfg.out}: run the whole build first")
    torch.set_num_threads(cfg.threads)
    started = time.time()
    train_aesthetic_head(cfg, _load_base(cfg.out), cfg.out / "clip", cfg.out / "aesthetic")
    seconds = round(time.time() - started, 1)
    _stamp_aesthetic(cfg, seconds)
    _record_stage(cfg, "aesthetic", seconds)


def build_flow_only(cfg: BuildConfig) -> None:
    """Stage 5 alone: <out>/pipeline-flow from <out>/pipeline; its time and command are
    recorded in <out>/build_info.json."""
    if not (cfg.out / "pipeline").is_dir():
        raise SystemExit(f"--only flow needs pipeline/ in {cfg.out}: run the whole build first")
    torch.set_num_threads(cfg.threads)
    started = time.time()
    train_flow(cfg, cfg.out)
    _record_stage(cfg, "flow", round(time.time() - started, 1))


TURBO_STAGES = {"turbo": ("pipeline", train_turbo), "flow-turbo": ("pipeline-flow", train_flow_turbo)}
"""Stage name -> (the teacher's folder in <out>, the stage)."""


def build_turbo_only(cfg: BuildConfig) -> None:
    """Stage 7 alone for one family; its time, command and record land in build_info.json."""
    teacher, stage = TURBO_STAGES[cfg.only]
    if not (cfg.out / teacher).is_dir():
        raise SystemExit(f"--only {cfg.only} needs {teacher}/ in {cfg.out}: run the whole build first")
    torch.set_num_threads(cfg.threads)
    started, cpu_started = time.time(), time.process_time()
    record = stage(cfg, cfg.out)
    # CPU seconds do not grow when other jobs share the machine, as wall seconds do.
    record["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    _record_stage(cfg, cfg.only, round(time.time() - started, 1), record)


def _record_stage(cfg: BuildConfig, stage: str, seconds: float, record: dict | None = None) -> None:
    info_path = cfg.out / "build_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.setdefault("stage_seconds", {})[stage] = seconds
    info.setdefault("stage_commands", {})[stage] = _command(cfg)
    if record is not None:
        info.setdefault("stage_records", {})[stage] = record
    info_path.write_text(strict_json.dumps(info, indent=2) + "\n")
    print(f"{stage} stage done in {seconds}s", flush=True)


def build(cfg: BuildConfig) -> None:
    torch.set_num_threads(cfg.threads)
    started = time.time()
    stage_seconds: dict[str, float] = {}

    def finished(stage: str) -> None:
        stage_seconds[stage] = round(time.time() - started - sum(stage_seconds.values()), 1)
        print(f"{stage} done at {time.time() - started:.0f}s", flush=True)

    out = cfg.out
    if cfg.only == "aesthetic":
        build_aesthetic_only(cfg)
        return
    if cfg.only == "flow":
        build_flow_only(cfg)
        return
    if cfg.only in TURBO_STAGES:
        build_turbo_only(cfg)
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer_folder = out / "_tokenizer"
    tokenizer = build_tokenizer(tokenizer_folder)

    train_judge(cfg, tokenizer, out / "clip")
    finished("judge")
    vae = train_vae(cfg)
    finished("vae")
    unet, text_encoder = train_unet(cfg, vae, tokenizer)
    base = assemble_pipeline(unet, vae, text_encoder, tokenizer, lcm=False)
    save_pipeline(base, out / "pipeline", half=True)
    _link_judge_vocabulary(out)
    finished("unet")
    student = distill_lcm(cfg, unet, text_encoder, vae, tokenizer)
    save_pipeline(assemble_pipeline(student, vae, text_encoder, tokenizer, lcm=True), out / "pipeline-lcm", half=True)
    _link_shared(out / "pipeline-lcm", out / "pipeline")
    finished("lcm")
    train_flow(cfg, out)
    finished("flow")
    # From the saved (float16-stored) pipeline, exactly as `--only aesthetic` loads it.
    train_aesthetic_head(cfg, _load_base(out), out / "clip", out / "aesthetic")
    finished("aesthetic")
    _stamp_aesthetic(cfg, stage_seconds["aesthetic"])
    stage_records = {"turbo": train_turbo(cfg, out)}
    finished("turbo")
    stage_records["flow-turbo"] = train_flow_turbo(cfg, out)
    finished("flow-turbo")
    shutil.rmtree(tokenizer_folder)
    info = dict(
        command=_command(cfg),
        wall_seconds=round(time.time() - started, 1),
        stage_seconds=stage_seconds,
        stage_records=stage_records,
        torch=torch.__version__,
        threads=cfg.threads,
    )
    (out / "build_info.json").write_text(strict_json.dumps(info, indent=2) + "\n")
    print(f"build done in {info['wall_seconds']}s", flush=True)


def main() -> None:
    cfg = tyro.cli(BuildConfig)
    if cfg.smoke:
        cfg = replace(cfg, **SMOKE_OVERRIDES)
    build(cfg)


if __name__ == "__main__":
    main()
