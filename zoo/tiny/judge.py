"""The tiny CLIP judge as the tiny rewards read it, and the aesthetic head trained on it.

`load_judge` loads the judge's folder (zoo/tiny/assets/clip, written by `zoo.tiny.build`)
with the tensor transform equal to its processor (zoo/preprocess.py); `judge_patch_features`
and `judge_image_embeddings` are what the rewards compute from its pixels. The
`tiny-aesthetic` proxy's head, `TinyAestheticHead`, is trained on those patch features by
`zoo.tiny.build` and scored by `rewards.tiny_gold.TinyAesthetic`: both sides use this
module, so the head reads at scoring time exactly what it was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from zoo import strict_json
from zoo.preprocess import at_least_float32, transform_from_clip_image_processor

HEAD_CONFIG = "config.json"
HEAD_WEIGHTS = "model.safetensors"
PATCH_FEATURES = "vision last_hidden_state, mean over patch tokens"
"""What the aesthetic head reads. Not the projected image embedding, which the LAION
predictor reads on CLIP: the tiny judge was trained contrastively on 48 captions that name
colour, shape and background only, so its embedding discards size and crispness, the
gold's heaviest terms. Measured on 1,792 held-out same-prompt base pairs (clean labels or
noise 0.05, 2k-7k training images): a head on the embedding ranks K = 4 pairs as the gold
does in 0.59-0.63 of them, a head on the mean patch token in 0.74-0.79."""


class TinyAestheticHead(nn.Module):
    """The `tiny-aesthetic` proxy head: feature_dim -> hidden -> 1, GELU, on the tiny
    judge's patch features (`judge_patch_features`). Saved as `config.json` (architecture,
    what it was trained on) + `model.safetensors` (float32 weights, `layers.0.*`, `layers.2.*`)."""

    def __init__(self, feature_dim: int = 64, hidden: int = 32):
        super().__init__()
        self.feature_dim, self.hidden = feature_dim, hidden
        self.layers = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) judge patch features -> (B,) predicted gold."""
        return self.layers(features).squeeze(-1)

    def save_pretrained(self, folder: str | Path, extra: dict | None = None) -> Path:
        """Writes config.json (feature_dim, hidden, plus `extra`) and model.safetensors."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = dict(architecture="TinyAestheticHead", feature_dim=self.feature_dim, hidden=self.hidden,
                      activation="gelu", features=PATCH_FEATURES)
        config.update(extra or {})
        (folder / HEAD_CONFIG).write_text(strict_json.dumps(config, indent=2) + "\n")
        state = {key: value.detach().float().contiguous() for key, value in self.state_dict().items()}
        save_file(state, folder / HEAD_WEIGHTS, metadata={"format": "pt"})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "TinyAestheticHead":
        from safetensors.torch import load_file

        folder = Path(folder)
        config = json.loads((folder / HEAD_CONFIG).read_text())
        if config.get("architecture") != "TinyAestheticHead":
            raise ValueError(f"{folder / HEAD_CONFIG} describes {config.get('architecture')!r}, not TinyAestheticHead")
        if config.get("features") != PATCH_FEATURES:
            raise ValueError(f"{folder / HEAD_CONFIG} was trained on {config.get('features')!r} features, this code "
                             f"computes {PATCH_FEATURES!r}: rebuild it with `python -m zoo.tiny.build --out "
                             f"zoo/tiny/assets --only aesthetic`")
        head = cls(config["feature_dim"], config["hidden"])
        head.load_state_dict(load_file(folder / HEAD_WEIGHTS))
        return head.eval()


def load_judge(clip_dir: str | Path):
    """(CLIPModel, its CLIP tokenizer, the tensor image transform of its processor)."""
    from transformers import AutoProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = AutoProcessor.from_pretrained(clip_dir)
    return model, processor.tokenizer, transform_from_clip_image_processor(processor.image_processor)


def judge_image_embeddings(model, transform, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, D) L2-normalised float32 image embeddings, the way
    `CLIPScore` computes them (the image side of `tiny-align`)."""
    pixels = transform(images).to(dtype)
    return F.normalize(at_least_float32(model.get_image_features(pixel_values=pixels).pooler_output), dim=-1)


def judge_patch_features(model, transform, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, hidden) float32: the judge's vision tower's last
    hidden state averaged over the patch tokens (`PATCH_FEATURES`; the class token left
    out), what the aesthetic head is trained on and scores."""
    pixels = transform(images).to(dtype)
    tokens = model.vision_model(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, hidden)
    return at_least_float32(tokens[:, 1:].mean(dim=1))
