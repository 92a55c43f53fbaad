"""The LAION aesthetic predictor v2 on CLIP ViT-L/14 image embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rewards.base import Reward
from zoo.preprocess import transform_from_clip_image_processor


class AestheticHead(nn.Sequential):
    """The predictor's MLP: embed_dim -> 1024 -> 128 -> 64 -> 16 -> 1, no activations.

    The dropout layers are kept so that the parameter names (`0`, `2`, `4`, `6`, `7`)
    match the published state dict; they do nothing in eval mode.
    """

    def __init__(self, embed_dim: int = 768):
        super().__init__(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )


class AestheticScore(Reward):
    """LAION aesthetic predictor v2 (Schuhmann, https://github.com/christophschuhmann/improved-aesthetic-predictor).

    The head `sac+logos+ava1-l14-linearMSE.pth` regresses the mean AVA rating (1-10;
    ordinary images score 4-7) from the L2-normalised CLIP ViT-L/14 image embedding
    (`openai/clip-vit-large-patch14`, 224 px, OpenAI mean/std), as DDPO and SDPO use it.
    The prompt is ignored.
    """

    differentiable = True

    def __init__(
        self,
        name: str,
        head_path: str | Path,
        clip_dir: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoImageProcessor, CLIPModel

        super().__init__(device, dtype)
        self.name = name
        self.clip = CLIPModel.from_pretrained(clip_dir).eval()
        self.transform = transform_from_clip_image_processor(AutoImageProcessor.from_pretrained(clip_dir))
        state = torch.load(head_path, map_location="cpu", weights_only=True)
        state = {key.removeprefix("layers."): value for key, value in state.items()}
        embed_dim = self.clip.config.projection_dim
        if state["0.weight"].shape[1] != embed_dim:
            raise ValueError(
                f"{name}: head {head_path} expects {state['0.weight'].shape[1]}-d embeddings, "
                f"the CLIP at {clip_dir} gives {embed_dim}-d"
            )
        self.head = AestheticHead(embed_dim).eval()
        self.head.load_state_dict(state)
        self.to(self.device, self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.clip, self.head]

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.transform(images).to(self.dtype)  # (B, 3, 224, 224)
        embeds = F.normalize(self.clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)  # (B, 768)
        return self.head(embeds).squeeze(-1)
