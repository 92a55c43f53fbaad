"""Batched tensor preprocessing that reproduces the PIL pipelines of the reward models and
of the tiny world's CLIP judge, and the float32-or-wider dtype their outputs are kept in
(`at_least_float32`).

CLIP-family processors (transformers' CLIPImageProcessor, open_clip's val transform,
ImageReward's torchvision transform) all do: 8-bit image -> resize the shorter side to
`size` (bicubic, PIL) -> centre crop `crop` -> scale to [0, 1] -> normalise. Here the
same runs on the device for the whole batch. Measured against the real processors on
the same images (tests/test_rewards_models.py), a pixel differs by at most
PREPROCESS_MAX_LEVELS 8-bit levels and by PREPROCESS_MEAN_LEVELS on average: PIL
resamples in fixed point, torch in floating point, and the two round differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESS_MAX_LEVELS = 4
"""Largest difference from the model's own processor on one pixel, in 8-bit levels
(measured: 3 on noise and on smooth images, 512->224 and 32->224)."""
PREPROCESS_MEAN_LEVELS = 0.5
"""Largest mean absolute difference over an image, in 8-bit levels (measured: ~0.2)."""


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in float32 if it is in a narrower type, kept in float64 otherwise: scores
    are computed in float32, and in float64 for gradient checks
    (`rewards.base.Reward.score_with_grad`)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shorter side to `size`, centre-crop to `crop`, normalise by mean/std."""

    size: int
    crop: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1] -> (B, 3, crop, crop) normalised, same device.

        Images that require grad keep their graph: they are not rounded to 8 bits."""
        # The models were trained on 8-bit images; rounding first makes a score equal the
        # score of the saved PNG. Rounding's gradient is zero almost everywhere, so images
        # that carry a graph (reward back-propagation, `Reward.score_with_grad`) are scored
        # unrounded, as AlignProp scores the decoder's output (mihirp1998/AlignProp at
        # b22918a, alignprop_trainer.py:121-123: clamp, resize, normalise).
        quantize = not images.requires_grad
        images = images.clamp(0, 1)
        if quantize:
            images = (images * 255).round() / 255
        height, width = images.shape[-2:]
        short, long = min(height, width), max(height, width)
        # Same arithmetic as torchvision's and transformers' shortest-edge resize.
        long_resized = int(self.size * long / short)
        target = (self.size, long_resized) if height <= width else (long_resized, self.size)
        if target != (height, width):
            # antialias=True selects PIL's kernels (bicubic a=-0.5, support scaled when
            # downsampling); PIL stores the result in 8 bits, so clamp and round too.
            images = F.interpolate(images, size=target, mode=self.interpolation, antialias=True, align_corners=False)
            images = images.clamp(0, 1)
            if quantize:
                images = (images * 255).round() / 255
        top = int(round((target[0] - self.crop) / 2.0))
        left = int(round((target[1] - self.crop) / 2.0))
        images = images[..., top : top + self.crop, left : left + self.crop]
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std


def transform_from_clip_image_processor(processor) -> ImageTransform:
    """The ImageTransform equal to a transformers CLIPImageProcessor's configuration.

    Raises ValueError for settings this module does not reproduce, rather than scoring
    differently from the model's own processor.
    """
    resample_names = {2: "bilinear", 3: "bicubic"}
    size = processor.size
    crop = processor.crop_size
    supported = (
        processor.do_resize
        and processor.do_center_crop
        and processor.do_rescale
        and abs(processor.rescale_factor - 1 / 255) < 1e-9
        and processor.do_normalize
        and "shortest_edge" in size
        and crop["height"] == crop["width"]
        and int(processor.resample) in resample_names
    )
    if not supported:
        raise ValueError(f"unsupported image processor settings for tensor preprocessing: {processor.to_dict()}")
    return ImageTransform(
        size=size["shortest_edge"],
        crop=crop["height"],
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        interpolation=resample_names[int(processor.resample)],
    )
