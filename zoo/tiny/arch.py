"""Architectures of the tiny world: the offline CLIP tokenizer and a Stable-Diffusion-shaped
pipeline small enough to sample on two CPU cores.

Everything here is built from configs (no download) and saved in the diffusers /
transformers folder formats, so the rest of the project loads the tiny model with the same
`from_pretrained` calls it uses for sd-turbo or LCM-Dreamshaper.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from zoo import strict_json

# The tokenizer is the same BPE as OpenAI CLIP / open_clip, so its vocabulary is fixed.
CLIP_VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Captions are at most ~8 BPE tokens; 16 positions keep cross-attention cheap. The UNet
# learns exactly this many keys, so the length is saved with the tokenizer.
TOKENIZER_MAX_LENGTH = 16
# The open_clip BPE file holds more merges than CLIP uses; CLIP keeps the first
# 49408 - 2 * 256 - 2 of them (after the version header line).
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2

# Stable Diffusion's noise schedule, so that schedulers, samplers and log-probs behave as
# on the real models.
_SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


@dataclass(frozen=True)
class TinyArch:
    """Sizes of the tiny pipeline. Images are `2 * sample_size` pixels square: the VAE
    downsamples once."""

    unet_channels: tuple[int, ...] = (32, 64)
    """Output channels per UNet resolution. Every level but the first (full latent
    resolution) has cross-attention: self-attention over 16x16 latents costs 3x the rest of
    the UNet on this CPU, and 8x8 is fine enough to bind a colour to a shape."""
    unet_layers_per_block: int = 1
    unet_head_dim: int = 8
    unet_groups: int = 8
    """Group-norm groups in the UNet; must divide every entry of unet_channels."""
    vae_channels: tuple[int, int] = (16, 32)
    """Two VAE levels = one 2x downsampling."""
    vae_groups: int = 8
    latent_channels: int = 4
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 2
    lcm_embedding_dim: int = 64
    """Width of the guidance-scale embedding an LCM UNet adds to its time embedding."""


# Milliseconds per forward at batch 8: what the sampler and algorithm tests build.
TEST_ARCH = TinyArch()
# The shipped model: big enough to learn colour x shape x background binding.
TRAINED_ARCH = TinyArch(
    unet_channels=(32, 64, 128),
    unet_head_dim=16,
    text_hidden=64,
    text_layers=3,
    text_heads=4,
    lcm_embedding_dim=128,
)


def build_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write a CLIP tokenizer built from open_clip's BPE file into `folder` and load it.

    The vocabulary follows CLIP's construction (256 byte symbols, the same with `</w>`,
    one entry per merge, then the two special tokens), so ids equal open_clip's.
    Loading goes through `from_pretrained`: in transformers 5 the constructor's
    `vocab_file=` argument is silently ignored.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_bpe_files(folder)
    staged = CLIPTokenizer.from_pretrained(
        folder,
        model_max_length=TOKENIZER_MAX_LENGTH,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )
    staged.save_pretrained(folder)
    slim_tokenizer_folder(folder)
    return CLIPTokenizer.from_pretrained(folder)


def _write_bpe_files(folder: Path) -> None:
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    (folder / "vocab.json").write_text(strict_json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def slim_tokenizer_folder(folder: Path) -> None:
    """Replace a saved tokenizer.json (3.6 MB) by vocab.json + merges.txt (1.5 MB), from
    which `from_pretrained` rebuilds the same tokenizer. transformers 5 saves only
    tokenizer.json, and every shipped model folder carries a tokenizer."""
    _write_bpe_files(folder)
    (folder / "tokenizer.json").unlink()


def mark_float32_compute(folder: Path) -> None:
    """Make a transformers model folder load as float32 while its weights stay float16.

    transformers 5 loads with the dtype named in config.json; float16 text towers beside a
    float32 UNet break the pipeline on the CPU ("mat1 and mat2 must have the same dtype").
    """
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(strict_json.dumps(config, indent=2) + "\n")


def save_pipeline(pipe: StableDiffusionPipeline, folder: str | Path, half: bool) -> Path:
    """`save_pretrained`, minus the redundant tokenizer.json; with `half`, weights are
    stored in float16 (half the bytes) but every component still loads as float32."""
    folder = Path(folder)
    if half:
        pipe.to(dtype=torch.float16)
    pipe.save_pretrained(folder)
    if half:
        pipe.to(dtype=torch.float32)
        mark_float32_compute(folder / "text_encoder")
    slim_tokenizer_folder(folder / "tokenizer")
    return folder


def text_encoder_config(arch: TinyArch) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=arch.text_hidden,
        intermediate_size=4 * arch.text_hidden,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=arch.text_hidden,
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
    )


def make_unet(arch: TinyArch, sample_size: int, lcm: bool) -> UNet2DConditionModel:
    levels = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        layers_per_block=arch.unet_layers_per_block,
        attention_head_dim=arch.unet_head_dim,
        norm_num_groups=arch.unet_groups,
        cross_attention_dim=arch.text_hidden,
        time_cond_proj_dim=arch.lcm_embedding_dim if lcm else None,
    )


def make_vae(arch: TinyArch, image_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(arch.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(arch.vae_channels),
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=arch.vae_groups,
    )


# "trailing" spacing makes a 1-step sample start at t=999; the default "leading" with
# steps_offset=1 would start it at t=1, from pure noise.
_SCHEDULER_SETTINGS = dict(
    **_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing"
)


def make_ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**_SCHEDULER_SETTINGS)


def make_lcm_scheduler() -> LCMScheduler:
    return LCMScheduler(**_SCHEDULER_SETTINGS)


def assemble_pipeline(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    lcm: bool,
) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_lcm_scheduler() if lcm else make_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_random_pipeline(
    folder: str | Path,
    *,
    seed: int = 0,
    lcm: bool = False,
    sample_size: int = 16,
    arch: TinyArch = TEST_ARCH,
) -> Path:
    """Save a randomly initialised tiny pipeline to `folder` and return the folder.

    `sample_size` is the latent side; images are twice that. With `lcm=True` the UNet takes
    a guidance-scale embedding (`time_cond_proj_dim`) and the scheduler is an LCMScheduler,
    as in LCM-distilled Stable Diffusion checkpoints.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder / "tokenizer")
    pipe = assemble_pipeline(
        unet=make_unet(arch, sample_size, lcm),
        vae=make_vae(arch, 2 * sample_size),
        text_encoder=CLIPTextModel(text_encoder_config(arch)),
        tokenizer=tokenizer,
        lcm=lcm,
    )
    return save_pipeline(pipe, folder, half=False)
