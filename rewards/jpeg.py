"""JPEG file size as a reward, DDPO's (in)compressibility tasks."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from rewards.base import Reward


class JpegSize(Reward):
    """Size in kB (1000 bytes) of the image saved as JPEG at quality 95 with PIL.

    As DDPO (Black et al. 2023, https://github.com/kvablack/ddpo-pytorch, `rewards.py`):
    the image is rounded to 8 bits and encoded; `jpeg_incompressibility` is the size,
    `jpeg_compressibility` its negative (sign=-1). A 512 px image is tens of kB; flat
    images are smallest. The prompt is ignored. Encoding runs per image on the CPU.
    """

    def __init__(self, name: str, sign: float, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(device, dtype)
        self.name = name
        self.sign = sign

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        sizes = []
        for pixel_array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(pixel_array)).save(buffer, format="JPEG", quality=95)
            sizes.append(buffer.tell() / 1000)
        return self.sign * torch.tensor(sizes, dtype=torch.float32, device=self.device)
