"""Named settings of the benchmark: the model, prompts, reward, sampler and budget.

A preset fixes everything that must be equal across algorithms for a fair comparison:
the base model, the training, validation and test prompts, the training sampler (kind,
K, guidance, eta), the epoch budget, the trajectories sampled per epoch and the tuning
grid that every algorithm gets alike. Algorithm hyperparameters keep each method's
published defaults, except where a preset follows a paper's own settings or a tuning run
selected them (`algo_overrides`). Presets are plain functions, listed in PRESETS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import zoo.tiny
from zoo.sdpo import PAPER_REWARD_SETTINGS

TINY_ASSETS = Path(zoo.tiny.__file__).parent / "assets"

# 45 common animals, the kind of single-word prompts DDPO and SDPO train on; the last ten
# are held out: five to tune on (validation), five to report (test).
ANIMALS = (
    "cat", "dog", "horse", "cow", "sheep", "goat", "pig", "rabbit", "deer", "fox",
    "wolf", "bear", "lion", "tiger", "leopard", "cheetah", "elephant", "giraffe", "zebra",
    "hippopotamus", "rhinoceros", "camel", "kangaroo", "koala", "panda", "monkey", "gorilla",
    "squirrel", "hedgehog", "otter", "beaver", "raccoon", "owl", "eagle", "parrot",
    "penguin", "flamingo", "swan", "duck", "chicken", "frog", "turtle", "crocodile",
    "dolphin", "octopus",
)


@dataclass(frozen=True)
class Preset:
    name: str
    model: str
    """Hub id or local diffusers folder of the base model."""
    reward: str
    """Default training reward (a registry name or a weighted sum)."""
    eval_rewards: tuple[str, ...]
    """Rewards scored at evaluation only, by default (to catch reward hacking)."""
    train_prompts: tuple[str, ...]
    val_prompts: tuple[str, ...]
    """Validation prompts: `benchmarks.tune` selects hyperparameters on them; disjoint from
    the test prompts, so the reported table is never scored where it was tuned."""
    eval_prompts: tuple[str, ...]
    """Test prompts: the held-out prompts of the reported tables."""
    sampler: str
    """Training and evaluation sampler: "ddim" or "lcm"."""
    num_steps: int
    """Sampling steps K during training."""
    guidance_scale: float
    eta: float
    epochs: int
    trajectories_per_epoch: int
    """Trajectories sampled per epoch on each process (groups x group size)."""
    sample_batch_size: int
    """Trajectories per sampling call (their rewards overlap the next call's sampling)."""
    eval_every: int
    eval_samples_per_prompt: int
    eval_batch_size: int
    mixed_precision: str
    algo_overrides: dict[str, dict] = field(default_factory=dict)
    """Per-algorithm config fields that this preset's paper set or its tuning run selected
    (name -> {field: value})."""
    tuning_grid: dict[str, tuple] = field(default_factory=dict)
    """Config field -> candidate values: `benchmarks.tune` trains every algorithm at every
    combination (the same number of configurations for each) and keeps the best by
    `TUNING_RULE`."""


def tiny() -> Preset:
    """The embedded tiny world: runs the whole benchmark in minutes on 2 CPU cores."""
    from zoo.tiny import data

    return Preset(
        name="tiny",
        model=str(TINY_ASSETS / "pipeline"),
        # DDPO's compressibility task, watched by tiny-clip (prompt alignment) for reward
        # hacking: all four algorithms raise it within the budget. Trained on tiny-clip
        # itself they do not (the base's K=4 samples score 0.883 against 0.906 for real
        # renders of the captions, and 640 trajectories move nothing beyond noise).
        reward="jpeg_compressibility",
        eval_rewards=("tiny-clip",),
        train_prompts=tuple(data.train_captions()),
        val_prompts=tuple(data.validation_captions()),
        eval_prompts=tuple(data.test_captions()),
        sampler="ddim",
        num_steps=4,
        guidance_scale=_tiny_guidance(),
        eta=1.0,
        epochs=10,
        trajectories_per_epoch=64,
        sample_batch_size=16,
        eval_every=2,
        # 4 test prompts x 16: 64 images per cell, as with the 8 held-out prompts x 8 before
        # they were split into validation and test halves.
        eval_samples_per_prompt=16,
        eval_batch_size=64,
        mixed_precision="no",
        # Trained at K=4: the base model's 4-step samples are already good (fidelity 0.91),
        # while 1 and 2 steps are not (0.20, 0.55): the step-generalization gap.
        # Equal updates: every algorithm takes 8 optimizer steps per epoch, each over 32
        # transitions (DDPO: 8 trajectories x 4 steps; D3PO, REBEL: 4 pairs x 4 steps;
        # SDPO, whose reference steps the optimizer per denoising step: 16 pairs x 1 step).
        # The learning rate is selected per algorithm by `benchmarks.tune` from
        # `tuning_grid` (the published 1e-4 to 3e-4 move nothing in 640 trajectories).
        algo_overrides={
            "ddpo": {"learning_rate": 1e-2, "train_batch_size": 8, "gradient_accumulation_steps": 1},
            "d3po": {"learning_rate": 1e-2, "train_batch_size": 4, "gradient_accumulation_steps": 1},
            "rebel": {"learning_rate": 1e-2, "train_batch_size": 4, "gradient_accumulation_steps": 1},
            "sdpo": {"learning_rate": 1e-2, "train_batch_size": 4, "gradient_accumulation_steps": 4},
        },
        tuning_grid={"learning_rate": (1e-3, 3e-3, 1e-2, 3e-2)},
    )


def _tiny_guidance() -> float:
    from zoo.tiny import DEFAULT_GUIDANCE

    return DEFAULT_GUIDANCE


def _published(name: str, model: str, sampler: str, num_steps: int, guidance_scale: float, **overrides) -> Preset:
    """The settings the GPU presets share: animal prompts (five held out), fp16, 4 sampling
    calls of 8 trajectories per process per epoch as in the DDPO and SDPO configs."""
    settings = dict(
        name=name,
        model=model,
        reward="aesthetic",
        eval_rewards=(),
        train_prompts=ANIMALS[:35],
        val_prompts=ANIMALS[35:40],
        eval_prompts=ANIMALS[40:],
        sampler=sampler,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        eta=1.0,
        epochs=100,
        trajectories_per_epoch=32,
        sample_batch_size=8,
        eval_every=10,
        eval_samples_per_prompt=16,
        eval_batch_size=16,
        mixed_precision="fp16",
    )
    return Preset(**{**settings, **overrides})


def sd_turbo() -> Preset:
    """The SDPO paper: sd-turbo with DDIM (trailing), eta 1, K=50, no CFG, fp16, LoRA r4;
    lr/batch/accumulation/epochs per reward are in `SD_TURBO_REWARD_SETTINGS`."""
    return _published("sd-turbo", "stabilityai/sd-turbo", "ddim", 50, 1.0)


# (learning_rate, train_batch_size, gradient_accumulation_steps, epochs) per reward: the
# SDPO paper's configs, with HPS v2.1 on its HPSv2 settings.
SD_TURBO_REWARD_SETTINGS = {**PAPER_REWARD_SETTINGS, "hpsv2.1": PAPER_REWARD_SETTINGS["hpsv2"]}


def lcm() -> Preset:
    """RLCM's setting: LCM_Dreamshaper_v7, LCM sampling with 8 steps, guidance embedding 8,
    LoRA r8/alpha 8, lr 1e-4, no gradient clipping."""
    rlcm = {"lora_rank": 8, "lora_alpha": 8.0, "learning_rate": 1e-4, "max_grad_norm": None}
    return _published(
        "lcm", "SimianLuo/LCM_Dreamshaper_v7", "lcm", 8, 8.0,
        algo_overrides={name: dict(rlcm) for name in ("ddpo", "rebel", "d3po", "sdpo")},
    )


def sd15() -> Preset:
    """DDPO's setting: Stable Diffusion 1.5, DDIM eta 1, K=50, CFG 5, LoRA r4, lr 3e-4."""
    return _published("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "ddim", 50, 5.0)


PRESETS: dict[str, Callable[[], Preset]] = {"tiny": tiny, "sd-turbo": sd_turbo, "lcm": lcm, "sd15": sd15}
