"""The published architectures of the presets' base models, as configs in this folder.

Each preset folder holds the configs that the model's hub repository ships, written out
here so that throughput and memory can be measured on the real shapes with random
weights, with no download:

- sd-turbo/: stabilityai/sd-turbo = Stable Diffusion 2.1 (base) shapes: UNet 866M
  parameters (heads 5/10/20/20 of 64 channels, linear projections, cross-attention 1024),
  OpenCLIP ViT-H text tower cut to its 23 first layers as SD 2 uses it (340M), the SD VAE
  (84M). The scheduler is the DDIM that SDPO swaps in, with sd-turbo's "trailing" spacing.
- sd15/: SD 1.5: UNet 860M (8 heads, cross-attention 768), CLIP ViT-L/14 text (123M), the
  same VAE, its PNDM scheduler config (the samplers rebuild DDIM from it).
- lcm/: SimianLuo/LCM_Dreamshaper_v7: the SD 1.5 UNet plus a 256-wide guidance embedding
  (`time_cond_proj_dim`), with its LCMScheduler config.
- rewards/: the CLIP towers of the model rewards, as CLIPConfig arguments: OpenAI's
  ViT-L/14 (openai/clip-vit-large-patch14, 428M; the aesthetic predictor's) and
  OpenCLIP's ViT-H/14 (986M; PickScore's, yuvalkirstain/PickScore_v1), the widths and
  depths of open_clip's `ViT-L-14.json` and `ViT-H-14.json` (`save_random_reward`).

`reduced=True` keeps every block type, the block layout and the head counts but divides
the widths by 8 and keeps one layer per block (two text layers): the same code paths at a
size two CPU cores can run in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ARCHS = Path(__file__).resolve().parent
PRESET_ARCHS = {"sd-turbo": "sd-turbo", "sd15": "sd15", "lcm": "lcm"}
TOKENIZER_LENGTH = 77
"""Stable Diffusion's text context: 77 CLIP tokens."""
REWARD_ARCHS = {"aesthetic": "clip-vit-large-patch14", "pickscore": "clip-vit-h-14"}
"""The model rewards `save_random_reward` builds, and the CLIP config of each in rewards/."""
WIDTH_DIVISOR = 8
REDUCED_GROUPS = 8
"""Group-norm groups of the reduced models (the real 32 do not divide 320 / 8)."""


def load_configs(preset: str, reduced: bool = False) -> dict[str, dict]:
    """The unet, vae, text_encoder and scheduler configs of a preset, optionally reduced."""
    folder = ARCHS / PRESET_ARCHS[preset]
    configs = {name: json.loads((folder / f"{name}.json").read_text()) for name in ("unet", "vae", "text_encoder", "scheduler")}
    if reduced:
        _reduce(configs)
    return configs


def _reduce(configs: dict[str, dict]) -> None:
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    text["hidden_size"] //= WIDTH_DIVISOR
    text["intermediate_size"] //= WIDTH_DIVISOR
    text["num_attention_heads"] = 4
    text["num_hidden_layers"] = 2
    unet["block_out_channels"] = [c // WIDTH_DIVISOR for c in unet["block_out_channels"]]
    unet["layers_per_block"] = 1
    unet["norm_num_groups"] = REDUCED_GROUPS
    unet["cross_attention_dim"] = text["hidden_size"]
    vae["block_out_channels"] = [c // WIDTH_DIVISOR for c in vae["block_out_channels"]]
    vae["layers_per_block"] = 1
    vae["norm_num_groups"] = REDUCED_GROUPS


def build_components(
    configs: dict[str, dict], resolution: int, device: torch.device | str = "cpu"
) -> tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer]:
    """Random-weight UNet, VAE and text encoder (float32) for `resolution`-pixel images,
    initialised directly on `device` (seconds on a GPU, where a CPU takes a minute for
    the 1.3B parameters), and the CLIP tokenizer."""
    downsampling = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    unet_config = dict(configs["unet"], sample_size=resolution // downsampling)
    vae_config = dict(configs["vae"], sample_size=resolution)
    text_config = CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items() if k != "architectures"})
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config)
        text_encoder = CLIPTextModel(text_config)
    return unet, vae, text_encoder, clip_tokenizer()


def clip_tokenizer() -> CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer at Stable Diffusion's 77 tokens: the tiny world ships
    the same vocabulary and merges, only its context is shorter."""
    from zoo.tiny import PIPELINE

    return CLIPTokenizer.from_pretrained(PIPELINE / "tokenizer", model_max_length=TOKENIZER_LENGTH)


def save_random_pipeline(
    folder: Path, preset: str, resolution: int, reduced: bool = False, device: torch.device | str = "cpu", seed: int = 0
) -> Path:
    """A `StableDiffusionPipeline` folder of `preset`'s architecture with random weights
    (float32, no safety checker, the preset's scheduler config), readable by the diffusers
    and transformers of 2023 that the papers' reference codes pin as well as by today's:
    the tokenizer folder also holds `vocab.json` and `merges.txt` (transformers 5 writes
    only `tokenizer.json`, which transformers 4's CLIPTokenizer does not read), and the
    text encoder's weights carry the `text_model.` prefix of transformers 4's CLIPTextModel
    (transformers 5 saves them without it; transformers 4 would then silently leave every
    weight at its fresh initialisation)."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from zoo.tiny import PIPELINE

    configs = load_configs(preset, reduced=reduced)
    torch.manual_seed(seed)
    unet, vae, text_encoder, tokenizer = build_components(configs, resolution, device)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler.from_config(configs["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = Path(folder)
    # Half the bytes to write and read (2.6 GB for sd-turbo); loading casts them to the
    # float32 that the models are built in (diffusers and transformers alike).
    pipeline.to(torch.float16).save_pretrained(str(folder))
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(PIPELINE / "tokenizer" / name, folder / "tokenizer" / name)
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    save_file({key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()},
              str(weights), metadata={"format": "pt"})
    return folder


def save_random_reward(name: str, folder: Path, reduced: bool = False, device: torch.device | str = "cpu") -> dict[str, str]:
    """Reward `name`'s files in their published formats with random weights, at its
    published architecture (`REWARD_ARCHS`), or with `reduced` at the 1-layer, 32-wide one
    of `rewards.tiny_checkpoints`: the `paths` that `rewards.registry.load_reward` takes,
    so that the reward runs through its own code at its real cost with no download."""
    from rewards.tiny_checkpoints import build_aesthetic_head, build_clip_folder
    from zoo.tiny import CLIP

    if name not in REWARD_ARCHS:
        raise ValueError(f"no random-weight architecture of the reward {name!r}; these have one: {', '.join(REWARD_ARCHS)}")
    config = None if reduced else json.loads((ARCHS / "rewards" / f"{REWARD_ARCHS[name]}.json").read_text())
    folder = Path(folder)
    # The tiny world's CLIP tokenizer files are OpenAI CLIP's BPE: no open_clip needed (the
    # GPU machine has none).
    clip = str(build_clip_folder(folder / "clip", config=config, device=device, tokenizer_source=CLIP))
    if name == "aesthetic":
        embed_dim = 32 if config is None else config["projection_dim"]
        head = build_aesthetic_head(folder / "sac+logos+ava1-l14-linearMSE.pth", embed_dim=embed_dim)
        return {"aesthetic": str(head), "aesthetic:clip": clip}
    return {name: clip, f"{name}:processor": clip}
