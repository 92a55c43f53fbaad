"""The tiny world's flow-matching model: an SD3-shaped pipeline (StableDiffusion3Pipeline
folder: SD3Transformer2DModel, two CLIP text encoders with projection, no T5, the
FlowMatchEulerDiscreteScheduler) trained by rectified flow on the tiny data.

It shares the UNet world's VAE and text encoder (frozen): the flow model learns the
denoiser only, so the two families see the same latents and the same prompt features, and
the shipped folder adds only the transformer's weights (`assemble_flow_pipeline` links the
rest). `build_random_flow_pipeline` writes a randomly initialised one for the tests.

SD3 conditioning, as StableDiffusion3Pipeline.encode_prompt makes it: both CLIP encoders'
penultimate hidden states concatenated on the feature axis (joint_attention_dim = 2 x the
text width, so no padding), followed by the T5 tokens (none here), and the pooled
projection (both encoders' `text_embeds`, concatenated) for the adaptive norms.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from zoo.tiny import data
from zoo.tiny.optim import ema_update, warmup_lr
from zoo.tiny.arch import (
    TEST_ARCH,
    TinyArch,
    build_tokenizer,
    make_vae,
    mark_float32_compute,
    slim_tokenizer_folder,
    text_encoder_config,
)
from zoo import strict_json

FLOW_SHIFT = 3.0
"""The scheduler's time shift: SD3.5's own (its scheduler_config.json), so the tiny model's
K-step sigmas are placed as the real model's are."""

T5_TOKENS = 0
"""T5 positions in the tiny model's prompt embedding: it has no T5 encoder, and diffusers
pads 256 zero tokens for a missing one by default, which carry nothing and would make
every call several times dearer. Run its diffusers pipeline with max_sequence_length=0."""


@dataclass(frozen=True)
class FlowArch:
    """Sizes of the tiny SD3 transformer; patch 2 over a 16x16 latent is 64 image tokens."""

    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    patch_size: int = 2


TEST_FLOW_ARCH = FlowArch()
TRAINED_FLOW_ARCH = FlowArch(layers=6, heads=6, head_dim=16)


def make_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def make_transformer(arch: FlowArch, text_hidden: int, sample_size: int, latent_channels: int) -> SD3Transformer2DModel:
    """`text_hidden`: the width of each of the two CLIP encoders."""
    inner = arch.heads * arch.head_dim
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=arch.patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=arch.layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.heads,
        joint_attention_dim=2 * text_hidden,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * text_hidden,
        pos_embed_max_size=sample_size // arch.patch_size,
    )


def build_random_flow_pipeline(
    folder: str | Path, *, seed: int = 0, sample_size: int = 16, arch: FlowArch = TEST_FLOW_ARCH,
    text: TinyArch = TEST_ARCH,
) -> Path:
    """Save a randomly initialised SD3-shaped pipeline to `folder` (its own two CLIP text
    encoders, VAE with SD3's shift_factor, no T5) and return the folder."""
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder / "tokenizer")
    vae = make_vae(text, 2 * sample_size)
    vae.register_to_config(shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(
        transformer=make_transformer(arch, text.text_hidden, sample_size, text.latent_channels),
        scheduler=make_flow_scheduler(),
        vae=vae,
        text_encoder=CLIPTextModelWithProjection(text_encoder_config(text)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text_encoder_config(text)),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(folder)
    # transformers 5 writes tokenizer.json (3.6 MB) beside vocab.json and merges.txt.
    for name in ("tokenizer", "tokenizer_2"):
        slim_tokenizer_folder(folder / name)
    return folder


def prompt_features(pipe: StableDiffusion3Pipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, 2D) prompt embeddings and (N, 2D) pooled projections, as the pipeline makes them."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, captions, None, do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS
        )
    return embeds, pooled


def logit_normal_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """σ = sigmoid(u), u ~ N(0, 1): SD3's training distribution of noise levels (Esser et al.
    2024, 'logit-normal sampling'), which weights the middle of the path most."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def train_flow_transformer(
    pipe: StableDiffusion3Pipeline, *, steps: int, batch: int, lr: float, empty_caption_rate: float,
    ema_decay: float, generator: torch.Generator, log,
) -> SD3Transformer2DModel:
    """Rectified flow: x_σ = (1-σ)·x0 + σ·ε, target v = ε - x0, timestep σ·1000 (what the
    pipeline passes), captions replaced by "" at `empty_caption_rate` for guidance. The
    text encoders and VAE stay frozen; the EMA of the transformer is returned."""
    transformer, vae = pipe.transformer, pipe.vae
    transformer.train()
    ema = copy.deepcopy(transformer).requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    captions = data.train_captions()
    # The captions are a small fixed set: encode each once.
    embeds, pooled = prompt_features(pipe, captions + [""])
    index = {c: i for i, c in enumerate(captions + [""])}
    started = time.time()
    for step in range(steps):
        warmup_lr(optimizer, step, lr)
        images, batch_captions = data.sample_batch(batch, captions, generator)
        drop = (torch.rand(batch, generator=generator) < empty_caption_rate).tolist()
        rows = torch.tensor([index["" if d else c] for c, d in zip(batch_captions, drop)])
        with torch.no_grad():
            x0 = vae.encode(2 * images - 1).latent_dist.sample(generator)
            x0 = (x0 - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(x0.shape, generator=generator)
        sigma = logit_normal_sigmas(batch, generator).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        prediction = transformer(
            hidden_states=noisy, timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds[rows],
            pooled_projections=pooled[rows],
        ).sample
        loss = (prediction - (noise - x0)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        ema_update(ema, transformer, min(ema_decay, (1 + step) / (10 + step)))
        log("flow", step, steps, loss.item(), started)
    return ema.eval()


def load_base_parts(base: Path) -> dict:
    """The UNet world's VAE (with shift_factor 0, which SD3's pipeline reads), text encoder
    as a CLIPTextModelWithProjection with an identity projection (so its pooled output is
    the EOS token's final state, as the UNet world's CLIP has it), and tokenizer."""
    vae = AutoencoderKL.from_pretrained(base / "vae")
    vae.register_to_config(shift_factor=0.0)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder")
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(text_encoder.config.hidden_size))
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    return dict(vae=vae.requires_grad_(False), text_encoder=text_encoder.requires_grad_(False), tokenizer=tokenizer)


def tiny_flow_pipeline(base: Path) -> StableDiffusion3Pipeline:
    """The SD3 pipeline around `base`'s frozen parts; its transformer is None until set."""
    parts = load_base_parts(base)
    return StableDiffusion3Pipeline(
        transformer=None, scheduler=make_flow_scheduler(), vae=parts["vae"],
        text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
        text_encoder_2=parts["text_encoder"], tokenizer_2=parts["tokenizer"],
        text_encoder_3=None, tokenizer_3=None,
    )


def save_flow_pipeline(pipe: StableDiffusion3Pipeline, folder: Path, base: Path) -> None:
    """Write `pipe` to `folder` with only the transformer, configs and the text projection
    as new files: the VAE's and text encoder's weights are relative symlinks into `base`,
    and text_encoder_2 / tokenizer(_2) link to text_encoder / base's tokenizer.

    The text encoder is a two-shard transformers checkpoint whose index maps the CLIP
    weights to a link to `base`'s file and text_projection.weight to its own small file, so
    a second copy of the 49,408-row token table (~6.6 MB) is never stored."""
    if folder.exists():
        shutil.rmtree(folder)
    pipe.transformer.to(torch.float16)
    pipe.save_pretrained(folder)
    pipe.transformer.to(torch.float32)
    relative_base = Path("..") / ".." / base.name
    # VAE: own config (shift_factor), the base's weights.
    weights = "diffusion_pytorch_model.safetensors"
    (folder / "vae" / weights).unlink()
    os.symlink(relative_base / "vae" / weights, folder / "vae" / weights)
    # Text encoder: CLIP shard linked, projection shard stored (float16).
    encoder = folder / "text_encoder"
    for path in encoder.glob("*.safetensors*"):
        path.unlink()
    base_shard, projection_shard = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    os.symlink(relative_base / "text_encoder" / "model.safetensors", encoder / base_shard)
    projection = pipe.text_encoder.text_projection.weight.detach().to(torch.float16).contiguous()
    save_file({"text_projection.weight": projection}, encoder / projection_shard, metadata={"format": "pt"})
    base_keys = load_file(base / "text_encoder" / "model.safetensors").keys()
    weight_map = {key: base_shard for key in base_keys} | {"text_projection.weight": projection_shard}
    (encoder / "model.safetensors.index.json").write_text(strict_json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    mark_float32_compute(encoder)
    for name, target in (("text_encoder_2", Path("text_encoder")), ("tokenizer", relative_base.relative_to("..") / "tokenizer"),
                         ("tokenizer_2", relative_base.relative_to("..") / "tokenizer")):
        shutil.rmtree(folder / name)
        os.symlink(target, folder / name)

