"""HPS v2 / v2.1: open_clip ViT-H-14 fine-tuned on human preference pairs."""

from __future__ import annotations

from pathlib import Path

import torch

from rewards.base import Reward
from zoo.preprocess import ImageTransform, at_least_float32


class HPSv2Score(Reward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023, https://github.com/tgxs002/HPSv2).

    The score is the cosine of open_clip's normalised image and text features, as
    `hpsv2.img_score.score` computes it (no logit scale): ~0.2-0.3 for ordinary images.

    Loading differs from the `hpsv2` package on purpose: it always builds ViT-H-14 with
    the `laion2B-s32B-b79K` pretrained tag (a 4 GB hub download whose weights the HPS
    checkpoint then overwrites). Here open_clip builds the architecture with
    `pretrained=None` and the checkpoint is loaded strictly. Images: 224 px bicubic,
    centre crop, OpenAI mean/std (open_clip's val transform for ViT-H-14), on the device.
    """

    differentiable = True

    def __init__(
        self,
        name: str,
        checkpoint: str | Path,
        *,
        arch: str = "ViT-H-14",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        import open_clip

        super().__init__(device, dtype)
        self.name = name
        self.model = open_clip.create_model(arch, pretrained=None, output_dict=True).eval()
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        # The published files hold {"state_dict": ...}; a bare state dict is accepted too.
        self.model.load_state_dict(state.get("state_dict", state))
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"{name}: open_clip resize_mode {cfg['resize_mode']!r} is not reproduced on tensors")
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.transform = ImageTransform(
            size=size, crop=size, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), interpolation=cfg["interpolation"]
        )
        self.to(self.device, self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.transform(images).to(self.dtype)  # (B, 3, 224, 224)
        text = self.tokenizer(prompts).to(self.device)  # (B, 77)
        out = self.model(pixels, text)
        return (at_least_float32(out["image_features"]) * at_least_float32(out["text_features"])).sum(-1)
