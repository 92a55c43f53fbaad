"""Rewards from a transformers CLIPModel: PickScore and the tiny world's CLIP judge."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rewards.base import Reward
from zoo.preprocess import at_least_float32, transform_from_clip_image_processor


class CLIPScore(Reward):
    """Cosine similarity of CLIP image and caption embeddings, optionally times the logit scale.

    PickScore (Kirstain et al. 2023, "Pick-a-Pic", https://github.com/yuvalkirstain/PickScore)
    scores `logit_scale.exp() * cosine`, exactly as its authors' inference example does, so
    `logit_scale=True` for it (scores around 20-23 for ordinary images; the trained scale
    is ~100). The SDPO reference code omits the logit scale and optimises the bare cosine;
    both give the same ranking, but advantages and learning rates scale by ~100.

    The tiny world's judge (`tiny-clip`) uses the bare cosine in [-1, 1].

    Images: resized, cropped and normalised on the device as the folder's
    CLIPImageProcessor does. Prompts: the folder's CLIP tokenizer, padded to the batch's
    longest and truncated to the text tower's context length.
    """

    differentiable = True

    def __init__(
        self,
        name: str,
        model_dir: str | Path,
        processor_dir: str | Path,
        *,
        logit_scale: bool,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import AutoProcessor, CLIPModel

        super().__init__(device, dtype)
        self.name = name
        self.logit_scale = logit_scale
        self.model = CLIPModel.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(processor_dir)
        self.tokenizer = processor.tokenizer
        self.transform = transform_from_clip_image_processor(processor.image_processor)
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.to(self.device, self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.transform(images).to(self.dtype)  # (B, 3, crop, crop)
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        text = text.to(self.device)
        image_embeds = self.model.get_image_features(pixel_values=pixels).pooler_output
        image_embeds = F.normalize(at_least_float32(image_embeds), dim=-1)
        text_embeds = self.model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        text_embeds = F.normalize(at_least_float32(text_embeds.pooler_output), dim=-1)
        cosine = (image_embeds * text_embeds).sum(-1)  # (B,)
        if self.logit_scale:
            return at_least_float32(self.model.logit_scale).exp() * cosine
        return cosine
