"""A tiny random FLUX-shaped pipeline (FluxPipeline folder), built offline, for the tests of
`zoo.flow_policy.FlowPolicy`'s FLUX paths: 2x2-packed latents, a CLIP text encoder whose
pooled output conditions the adaptive norms, a T5 encoder whose tokens are the joint
attention's text side, and, for FLUX.1-dev, the guidance scale as an input.

Every component is FLUX.1's class at a small size, saved with `save_pretrained` and read
back by `FluxPipeline.from_pretrained`:
- FluxTransformer2DModel: patch 1 over 2x2-packed latents (in_channels = 4 x the VAE's
  latent channels), double-stream and single-stream blocks, RoPE axes summing to the head
  width as FLUX.1's (16, 56, 56) sum to its 128.
- AutoencoderKL with FLUX.1's 16 latent channels and its scaling and shift factors, so
  that decoding exercises the shift (`Policy.decode_with_grad`).
- CLIPTextModel and the CLIP tokenizer of the tiny world (`zoo.tiny.arch`).
- T5EncoderModel with a word-level Unigram vocabulary of the tiny captions' words plus
  single letters (so any lowercase prompt tokenizes), wrapped as transformers' T5 tokenizer
  (`T5TokenizerFast`, the class FLUX.1's model_index.json names, is transformers 5's
  tokenizers-backed T5Tokenizer); no SentencePiece file, no download.
- FlowMatchEulerDiscreteScheduler as FLUX.1-schnell's (shift 1, no dynamic shifting) or,
  with `guidance_embeds=True`, as FLUX.1-dev's (shift 3, dynamic shifting).
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from zoo.tiny import data
from zoo.tiny.arch import TEST_ARCH, build_tokenizer, make_vae, text_encoder_config

FLUX_LATENT_CHANNELS = 16
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
"""FLUX.1's VAE latent scaling (black-forest-labs/flux src/flux/modules/autoencoder.py,
AutoEncoderParams scale_factor 0.3611, shift_factor 0.1159; the same in FLUX.1-schnell's
vae/config.json, benchmarks/archs/flux-schnell/vae.json)."""

SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                         max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
"""FLUX.1-schnell's scheduler_config.json (benchmarks/archs/flux-schnell/scheduler.json)."""
DEV_SCHEDULER = dict(SCHNELL_SCHEDULER, shift=3.0, use_dynamic_shifting=True)
"""FLUX.1-dev's: the same, shifted by the image's token count (μ) on top of shift 3."""

T5_MAX_LENGTH = 512
"""T5 tokenizer's model_max_length, FLUX.1's tokenizer_2 (FluxPipeline caps
max_sequence_length at 512)."""
T5_SPECIAL = ("<pad>", "</s>", "<unk>")
"""T5's ids 0, 1, 2 (pad, end of sequence, unknown), as transformers' T5Tokenizer lays them out."""


@dataclasses.dataclass(frozen=True)
class FluxArch:
    """Sizes of the tiny FLUX transformer and T5 encoder. Patch 1 over a 16x16 latent
    packed 2x2 is 64 image tokens."""

    double_layers: int = 1
    single_layers: int = 2
    heads: int = 2
    head_dim: int = 16
    rope_axes: tuple[int, int, int] = (4, 6, 6)
    """RoPE widths of the (text/unused, row, column) position axes; they sum to head_dim."""
    t5_width: int = 64
    t5_layers: int = 2
    t5_heads: int = 4


TEST_FLUX_ARCH = FluxArch()


def t5_vocabulary() -> list[tuple[str, float]]:
    """(piece, log-probability) of a Unigram model: T5's three special tokens, every word of
    the tiny captions as a whole piece (preferred), and the word-start marker with single
    letters and digits, so that any other lowercase word splits into characters."""
    words = sorted({word for text in data.all_captions() for word in text.split()})
    pieces = [(token, 0.0) for token in T5_SPECIAL]
    pieces += [(f"▁{word}", -1.0) for word in words]
    pieces += [("▁", -2.0)] + [(char, -4.0) for char in string.ascii_lowercase + string.digits]
    return pieces


def t5_tokenizer() -> T5TokenizerFast:
    """The word-level T5 tokenizer, in memory."""
    return T5TokenizerFast(vocab=t5_vocabulary(), extra_ids=0, model_max_length=T5_MAX_LENGTH)


def build_t5_tokenizer(folder: str | Path) -> T5TokenizerFast:
    """The word-level T5 tokenizer saved in `folder` (tokenizer.json) and loaded back."""
    t5_tokenizer().save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def make_flux_transformer(arch: FluxArch, pooled_dim: int, guidance_embeds: bool) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * FLUX_LATENT_CHANNELS,
        num_layers=arch.double_layers,
        num_single_layers=arch.single_layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.heads,
        joint_attention_dim=arch.t5_width,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=arch.rope_axes,
    )


def build_random_flux_pipeline(
    folder: str | Path, *, seed: int = 0, sample_size: int = 16, guidance_embeds: bool = False,
    arch: FluxArch = TEST_FLUX_ARCH,
) -> Path:
    """Save a randomly initialised FLUX.1-schnell-shaped pipeline (with `guidance_embeds`, a
    FLUX.1-dev-shaped one) to `folder` and return the folder. `sample_size` is the latent
    side; images are twice that (the tiny VAE downsamples once), and FluxPipeline's own
    default size (128 latents) does not apply: load it with resolution=2 * sample_size."""
    folder = Path(folder)
    torch.manual_seed(seed)
    text = dataclasses.replace(TEST_ARCH, latent_channels=FLUX_LATENT_CHANNELS)
    vae = make_vae(text, 2 * sample_size)
    vae.register_to_config(**FLUX_VAE_FACTORS)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_vocabulary()), d_model=arch.t5_width, d_kv=arch.t5_width // arch.t5_heads,
        d_ff=2 * arch.t5_width, num_layers=arch.t5_layers, num_heads=arch.t5_heads,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
    ))
    pipe = FluxPipeline(
        transformer=make_flux_transformer(arch, text.text_hidden, guidance_embeds),
        scheduler=FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance_embeds else SCHNELL_SCHEDULER)),
        vae=vae,
        text_encoder=CLIPTextModel(text_encoder_config(text)),
        tokenizer=build_tokenizer(folder / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=build_t5_tokenizer(folder / "tokenizer_2"),
    )
    pipe.save_pretrained(folder)
    return folder
