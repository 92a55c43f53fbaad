"""The tiny world's gold and proxy rewards, as in reward-overoptimization studies.

Two tasks, each with a *gold* score computed from the pixels by a rule (zoo/tiny/gold.py;
evaluation only: never train on it) and a *proxy*, a learned model that approximates it
(the training reward):

| task | proxy (train on it) | gold (evaluate with it) |
|---|---|---|
| aesthetic, prompt-agnostic | `tiny-aesthetic`: an MLP head on the tiny judge's image features (its vision tower's mean patch token), trained on ~2k noisy gold labels (as the LAION aesthetic predictor is a head on CLIP) | `tiny-aesthetic-gold`: size, centring, saturation, crispness of the shape |
| prompt alignment | `tiny-align`: the judge's probability of the prompt among all 48 captions | `tiny-align-gold`: colour, shape and background measured on the pixels |

A run that raises a proxy while its gold falls is hacking its proxy. Their accuracy
against each other is in results/tiny-world/README.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rewards.base import Reward
from zoo.preprocess import at_least_float32
from zoo.tiny.judge import TinyAestheticHead, judge_image_embeddings, judge_patch_features, load_judge

PAIR_TIE = 1e-9
"""Score differences within a pair smaller than this are ties."""


def pair_sign_agreement(diff: torch.Tensor, reference_diff: torch.Tensor) -> tuple[float, float]:
    """How often a score difference within each pair (P,) has the sign of a reference
    difference (P,): e.g. a proxy's against its gold's, or a step's against the final
    image's. Returns (agreement among the pairs that neither difference ties, fraction of
    pairs whose `diff` ties). A tied reference (a gold counting attributes ties often) has
    no sign to agree with, so those pairs are left out rather than counted as disagreeing."""
    tied = diff.abs() < PAIR_TIE
    kept = ~tied & (reference_diff.abs() >= PAIR_TIE)
    if not bool(kept.any()):
        return math.nan, float(tied.double().mean())
    agree = (torch.sign(diff[kept]) == torch.sign(reference_diff[kept])).double().mean()
    return float(agree), float(tied.double().mean())


def pair_ties(diff: torch.Tensor) -> float:
    """The fraction of pairs whose score difference (P,) is a tie."""
    return float((diff.abs() < PAIR_TIE).double().mean())


class TinyAesthetic(Reward):
    """`tiny-aesthetic`: the PROXY of the aesthetic task, a training reward.

    The learned head `TinyAestheticHead` (zoo/tiny/assets/aesthetic) on the tiny judge's
    mean patch token (zoo/tiny/assets/clip, preprocessed as `CLIPScore` does), regressing `tiny-aesthetic-gold` (0..1) from ~2k images labelled with the gold
    plus Gaussian noise, as the LAION aesthetic predictor regresses human ratings from
    CLIP embeddings. It sees size, saturation and sharpness, less position, and it can
    be hacked: watch `tiny-aesthetic-gold`. The prompt is ignored.
    """

    differentiable = True

    def __init__(self, name: str, head_dir: str | Path, clip_dir: str | Path, *, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.name = name
        self.clip, _, self.transform = load_judge(clip_dir)
        self.head = TinyAestheticHead.from_pretrained(head_dir)
        feature_dim = self.clip.config.vision_config.hidden_size
        if self.head.feature_dim != feature_dim:
            raise ValueError(f"{name}: head {head_dir} expects {self.head.feature_dim}-d features, "
                             f"the judge at {clip_dir} gives {feature_dim}-d")
        self.to(self.device, self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.clip, self.head]

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        features = judge_patch_features(self.clip, self.transform, images, self.dtype)
        return at_least_float32(self.head(features.to(self.dtype)))


class TinyAlign(Reward):
    """`tiny-align`: the PROXY of the alignment task, a training reward.

    The tiny judge's probability of the prompt among the tiny world's 48 captions:
    softmax over captions of logit_scale * cosine(image, caption), taken at the prompt
    (0..1; chance is 1/48). A prompt that is not one of the 48 captions competes with
    the 48 and itself. Judge fidelity (its top caption is the prompt) is this
    probability's argmax; `tiny-align-gold` checks it on the pixels.
    """

    differentiable = True

    def __init__(self, name: str, clip_dir: str | Path, *, device="cpu", dtype=torch.float32):
        from zoo.tiny import data

        super().__init__(device, dtype)
        self.name = name
        self.model, self.tokenizer, self.transform = load_judge(clip_dir)
        self.captions = data.all_captions()
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        self.to(self.device, self.dtype)

    def _modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def _text_embeddings(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = tokens.to(self.device)
        features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return F.normalize(at_least_float32(features.pooler_output), dim=-1)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_embeds = judge_image_embeddings(self.model, self.transform, images, self.dtype)  # (B, D)
        novel = sorted({p for p in prompts if p not in self.captions})
        texts = self.captions + novel
        text_embeds = self._text_embeddings(texts)  # (48 + N, D)
        logits = at_least_float32(self.model.logit_scale).exp() * image_embeds @ text_embeds.T  # (B, 48 + N)
        index = torch.tensor([texts.index(p) for p in prompts], device=self.device)
        # Each image competes its prompt against the 48 captions only (and the prompt itself).
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        allowed[:, : len(self.captions)] = True
        allowed[torch.arange(len(prompts), device=self.device), index] = True
        probabilities = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
        return probabilities.gather(1, index[:, None]).squeeze(1)


class TinyAestheticGold(Reward):
    """`tiny-aesthetic-gold`: the GOLD of the aesthetic task. EVALUATION ONLY: never
    train on it (it is the truth that catches a proxy being hacked).

    A rule on the pixels (zoo.tiny.gold.aesthetic, formula in that module):
    presence * framing * (0.4 size + 0.1 centring + 0.2 saturation + 0.3 crispness) of the segmented shape, in
    [0, 1]. The prompt is ignored.
    """

    def __init__(self, name: str, *, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.name = name

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from zoo.tiny import gold

        return gold.aesthetic(images)


class TinyAlignGold(Reward):
    """`tiny-align-gold`: the GOLD of the alignment task. EVALUATION ONLY: never train
    on it.

    A rule on the pixels (zoo.tiny.gold.alignment): the fraction of the attributes the
    prompt names (colour, shape, background: 1/3 each for a tiny-world caption) that the
    segmented picture shows; 0, 1/3, 2/3 or 1. Raises ValueError for a prompt that names
    none of them.
    """

    def __init__(self, name: str, *, device="cpu", dtype=torch.float32):
        super().__init__(device, dtype)
        self.name = name

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from zoo.tiny import gold

        return gold.alignment(images, prompts)
