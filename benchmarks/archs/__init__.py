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
- sd3.5-medium/: stabilityai/stable-diffusion-3.5-medium, flow matching: the MMDiT-X
  transformer (SD3Transformer2DModel, 24 blocks of 24 heads x 64, dual attention in the
  first 13, QK norm; 2.2B parameters and a 0.23B positional table: the model card's 2.5B),
  CLIP-L and OpenCLIP bigG text towers with projections (124M, 695M), T5 v1.1 XXL's
  encoder (4.8B), the SD3 VAE with 16 latent channels (84M), FlowMatchEulerDiscreteScheduler
  with shift 3.
- flux-schnell/: black-forest-labs/FLUX.1-schnell: FluxTransformer2DModel (19 double- and
  38 single-stream blocks of 24 heads x 128, no guidance embedding; 11.9B), CLIP-L (123M)
  whose pooled output conditions it, T5 v1.1 XXL, the FLUX VAE, the scheduler unshifted.
  Each flow folder's README.md cites the source of every value.
- rewards/: the CLIP towers of the model rewards, as CLIPConfig arguments: OpenAI's
  ViT-L/14 (openai/clip-vit-large-patch14, 428M; the aesthetic predictor's) and
  OpenCLIP's ViT-H/14 (986M; PickScore's, yuvalkirstain/PickScore_v1), the widths and
  depths of open_clip's `ViT-L-14.json` and `ViT-H-14.json` (`save_random_reward`).

`reduced=True` keeps every block type, the block layout and the head counts but divides
the widths by 8 and keeps one layer per block (two text layers): the same code paths at a
size two CPU cores can run in seconds. A reduced flow transformer keeps both of its block
kinds: SD3 two blocks (the first with dual attention, the last with the context stream's
final, pre-only block), FLUX one double-stream and two single-stream blocks; T5 keeps its
64 heads at a width of 512 and two layers; FLUX's RoPE axes are re-split over the head's
16 channels as (4, 6, 6), keeping the image axes equal (its (16, 56, 56) / 8 would give odd
rotary widths).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

ARCHS = Path(__file__).resolve().parent
PRESET_ARCHS = {
    "sd-turbo": "sd-turbo", "sd15": "sd15", "lcm": "lcm", "sd3.5-medium": "sd3.5-medium", "flux-schnell": "flux-schnell",
}
FLOW_ARCHS = ("sd3.5-medium", "flux-schnell")
"""The presets whose folders hold a flow-matching pipeline (transformer.json, not unet.json)."""
TOKENIZER_LENGTH = 77
"""Stable Diffusion's text context: 77 CLIP tokens."""
REWARD_ARCHS = {"aesthetic": "clip-vit-large-patch14", "pickscore": "clip-vit-h-14"}
"""The model rewards `save_random_reward` builds, and the CLIP config of each in rewards/."""
WIDTH_DIVISOR = 8
REDUCED_GROUPS = 8
"""Group-norm groups of the reduced models (the real 32 do not divide 320 / 8)."""
REDUCED_FLUX_ROPE = [4, 6, 6]
"""A reduced FLUX head's rotary widths (text, row, column), summing to 128 / 8 = 16."""
TEXT_ENCODERS = {
    "CLIPTextModel": (CLIPTextConfig, CLIPTextModel),
    "CLIPTextModelWithProjection": (CLIPTextConfig, CLIPTextModelWithProjection),
    "T5EncoderModel": (T5Config, T5EncoderModel),
}
"""A text encoder config's `architectures` entry -> its (config, model) classes."""


def load_configs(preset: str, reduced: bool = False) -> dict[str, dict]:
    """Every component config of a preset (file name -> config: unet or transformer, vae,
    text_encoder[_2, _3], scheduler), optionally reduced."""
    folder = ARCHS / PRESET_ARCHS[preset]
    configs = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}
    if reduced:
        (_reduce_flow if "transformer" in configs else _reduce_unet)(configs)
    return configs


def _reduce_unet(configs: dict[str, dict]) -> None:
    unet, text = configs["unet"], configs["text_encoder"]
    _reduce_text(text)
    unet["block_out_channels"] = [c // WIDTH_DIVISOR for c in unet["block_out_channels"]]
    unet["layers_per_block"] = 1
    unet["norm_num_groups"] = REDUCED_GROUPS
    unet["cross_attention_dim"] = text["hidden_size"]
    _reduce_vae(configs["vae"])


def _reduce_flow(configs: dict[str, dict]) -> None:
    encoders = [config for name, config in configs.items() if name.startswith("text_encoder")]
    for config in encoders:
        _reduce_text(config)
    clips = [config for config in encoders if config["model_type"] == "clip_text_model"]
    t5 = next(config for config in encoders if config["model_type"] == "t5")
    transformer = configs["transformer"]
    transformer["attention_head_dim"] //= WIDTH_DIVISOR
    transformer["joint_attention_dim"] = t5["d_model"]
    if transformer["_class_name"] == "FluxTransformer2DModel":
        transformer.update(num_layers=1, num_single_layers=2, axes_dims_rope=REDUCED_FLUX_ROPE)
        # FLUX is conditioned on CLIP's pooled output, the width of its hidden states.
        transformer["pooled_projection_dim"] = clips[0]["hidden_size"]
    else:
        transformer.update(num_layers=2, dual_attention_layers=[0])
        transformer["caption_projection_dim"] = transformer["num_attention_heads"] * transformer["attention_head_dim"]
        # SD3 is conditioned on the CLIP towers' projections, concatenated.
        transformer["pooled_projection_dim"] = sum(config["projection_dim"] for config in clips)
    _reduce_vae(configs["vae"])


def _reduce_text(config: dict) -> None:
    """CLIP: widths / 8, 4 heads, 2 layers. T5: widths / 8 at its own head count, 2 layers."""
    if config["model_type"] == "t5":
        config.update(d_model=config["d_model"] // WIDTH_DIVISOR, d_ff=config["d_ff"] // WIDTH_DIVISOR,
                      d_kv=config["d_kv"] // WIDTH_DIVISOR, num_layers=2)
        return
    config["hidden_size"] //= WIDTH_DIVISOR
    config["intermediate_size"] //= WIDTH_DIVISOR
    config["projection_dim"] //= WIDTH_DIVISOR
    config["num_attention_heads"] = 4
    config["num_hidden_layers"] = 2


def _reduce_vae(vae: dict) -> None:
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


def build_flow_pipeline(
    configs: dict[str, dict], resolution: int, device: torch.device | str = "cpu"
) -> StableDiffusion3Pipeline | FluxPipeline:
    """The preset's flow-matching pipeline (SD3 or FLUX, as its transformer config names)
    with random float32 weights for `resolution`-pixel images, initialised on `device`
    (T5-XXL alone is 4.8B parameters: 19 GB in float32), with the tokenizers: OpenAI
    CLIP's BPE at 77 tokens for each CLIP tower, and a small word-level T5 tokenizer
    (`zoo.tiny.flux`; T5's SentencePiece model is a download), as the encoders' cost is
    that of the padded sequence whatever its ids."""
    from zoo.tiny.flux import t5_tokenizer

    flux = configs["transformer"]["_class_name"] == "FluxTransformer2DModel"
    downsampling = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    transformer_config = dict(configs["transformer"])
    if not flux:
        # SD3's patch embedding is sized for its sample_size; FLUX's RoPE takes any size.
        transformer_config["sample_size"] = resolution // downsampling
    with torch.device(device):
        transformer = (FluxTransformer2DModel if flux else SD3Transformer2DModel).from_config(transformer_config)
        vae = AutoencoderKL.from_config(dict(configs["vae"], sample_size=resolution))
        encoders = {name: build_text_encoder(config) for name, config in configs.items() if name.startswith("text_encoder")}
    tokenizers = {
        name.replace("text_encoder", "tokenizer"): t5_tokenizer() if isinstance(encoder, T5EncoderModel) else clip_tokenizer()
        for name, encoder in encoders.items()
    }
    return (FluxPipeline if flux else StableDiffusion3Pipeline)(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]),
        **encoders, **tokenizers,
    )


def build_text_encoder(config: dict) -> torch.nn.Module:
    """The text encoder (CLIP or T5, by the config's `architectures` entry: TEXT_ENCODERS)
    that a saved transformers config dict describes, with random weights."""
    config_cls, model_cls = TEXT_ENCODERS[config["architectures"][0]]
    return model_cls(config_cls(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))


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
