"""Step generalization, measured: held-out reward of one policy at several step counts.

Every algorithm and checkpoint is evaluated on the same held-out prompts with the same
noise: the generator of each step count is seeded by (evaluation seed, step count,
process), so differences between rows are differences between policies, not noise.
(The noise does depend on the number of processes, which splits the prompts.)

A reward that fails at evaluation (raises, or a server that still fails after its
retries, `rewards.http`) costs the cells of that batch, not the run: its images are
scored as missing, like NaN scores, left out of the mean, counted in `nonfinite` and
reported. Training goes on, since the next evaluation may find the reward back; a
training reward that keeps failing stops the run at training (`benchmarks.train`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from rewards.base import Reward
from zoo.policy import Policy
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

STRIP_IMAGES = 8
"""Images per sample strip (the first evaluation prompts of the main process)."""


@dataclass(frozen=True)
class EvalSettings:
    prompts: tuple[str, ...]
    step_counts: tuple[int, ...]
    samples_per_prompt: int
    batch_size: int
    sampler: str
    guidance_scale: float
    eta: float
    seed: int
    timestep_spacing: str | None = None
    """The preset's timestep spacing (`SamplerConfig.timestep_spacing`); None keeps the
    model's scheduler config."""
    split: str = "test"
    """Which of the preset's prompt sets `prompts` is ("test" or "validation"), written
    into every record so that a run evaluated on both keeps them apart."""

    def sampler_config(self, step_count: int) -> SamplerConfig:
        """The sampler that evaluates at `step_count` steps."""
        return SamplerConfig(self.sampler, step_count, self.eta, self.guidance_scale, self.timestep_spacing)


EVAL_SEED_DOMAIN = 1 << 31
"""Evaluation seeds lie in [2^31, 2^32) and the trainer's epoch seeds in [0, 2^31)
(`benchmarks.rollout.epoch_seed`); torch's CPU generator reads only the low 32 bits of a
seed. The trainer seeds epoch e with the same arithmetic (`mixed_seed`), so without the split the
evaluation at S steps would draw the noise of training epoch S."""


def mixed_seed(seed: int, index: int) -> int:
    """The run seed and an index (training epoch or evaluation step count) mixed into one
    seed below 2^31, the trainer's half (`benchmarks.rollout.epoch_seed`). The same on
    every process: each draws what the whole batch needs and keeps its part."""
    return (1_000_003 * seed + 1_009 * index) % EVAL_SEED_DOMAIN


def evaluation_seed(seed: int, step_count: int) -> int:
    return EVAL_SEED_DOMAIN + mixed_seed(seed, step_count)


def _scores_or_missing(reward: Reward, images: torch.Tensor, prompts: list[str]) -> tuple[list[float], str | None]:
    """The batch's scores, or NaN for each image and what went wrong when the reward
    raised (a plugin's error, a wrong number of scores, a server past its retries)."""
    try:
        return reward.score(images, prompts).float().tolist(), None
    # Rewards are third-party models and servers: a failure costs this batch's scores.
    except Exception as error:
        return [math.nan] * len(prompts), f"raised {type(error).__name__}: {' '.join(str(error).split())}"


@torch.no_grad()
def evaluate(
    policy: Policy, rewards: dict[str, Reward], settings: EvalSettings, accelerator: Accelerator,
    where: str = "evaluation",
) -> tuple[dict[tuple[int, str], dict], dict[int, torch.Tensor]]:
    """Score the policy at each step count with each reward.

    Returns ({(step_count, reward): {"mean", "std", "count", "nonfinite"}}, {step_count:
    strip images (n, 3, H, W)}) where strips are filled on the main process only; mean,
    std and count are over the finite scores, nonfinite counts the others: NaN or inf
    scores, and the images of batches the reward failed on. `where` opens the warnings.
    """
    everything = [p for p in settings.prompts for _ in range(settings.samples_per_prompt)]
    per_process = math.ceil(len(everything) / accelerator.num_processes)
    first = accelerator.process_index * per_process
    mine = everything[first : first + per_process]
    stats: dict[tuple[int, str], dict] = {}
    strips: dict[int, torch.Tensor] = {}
    for step_count in settings.step_counts:
        sampler = TrajectorySampler(policy, settings.sampler_config(step_count))
        generator = torch.Generator().manual_seed(evaluation_seed(settings.seed, step_count))
        # Every sample's noise, drawn on every process as one process samples it (in
        # batches of `batch_size`), so that the scores do not depend on the processes.
        drawn = [sampler.draw_noise(len(everything[start : start + settings.batch_size]), generator)
                 for start in range(0, len(everything), settings.batch_size)]
        initial_noise, step_noise = (torch.cat(parts) for parts in zip(*drawn)) if drawn else (None, None)
        scores: dict[str, list[float]] = {name: [] for name in rewards}
        failed: dict[str, list[tuple[int, str]]] = {name: [] for name in rewards}
        images_kept: list[torch.Tensor] = []
        for start in range(0, len(mine), settings.batch_size):
            prompts = mine[start : start + settings.batch_size]
            rows = slice(first + start, first + start + len(prompts))
            # Only the images are read: no per-step latents or log-probs are kept.
            images = sampler.sample(prompts, initial_noise=initial_noise[rows], step_noise=step_noise[rows],
                                    record_transitions=False).images[:, 0]  # (B, 3, H, W)
            for name, reward in rewards.items():
                batch_scores, why = _scores_or_missing(reward, images, prompts)
                scores[name] += batch_scores
                if why:
                    failed[name].append((len(prompts), why))
            if sum(len(x) for x in images_kept) < STRIP_IMAGES:
                images_kept.append(images.cpu())
        if policy.collective_forward:
            # A sharded denoiser's every call gathers weights from every process: a process
            # with fewer batches than the first samples its missing ones on the first
            # sample's noise, and throws them away.
            for _ in range(math.ceil(per_process / settings.batch_size) - math.ceil(len(mine) / settings.batch_size)):
                sampler.sample(everything[:1], initial_noise=initial_noise[:1], step_noise=step_noise[:1],
                               record_transitions=False)
        for name in rewards:
            # Processes may hold unequal shares, which tensor gathers do not allow.
            gathered = torch.tensor(gather_object(scores[name]), dtype=torch.float64)
            failures = gather_object(failed[name])
            # A reward model's NaN or inf on some images, or its failure on a batch, must
            # not wipe out the cell: those images are left out of the mean, counted in
            # the record and reported.
            finite = gathered[torch.isfinite(gathered)]
            nonfinite = len(gathered) - len(finite)
            missing = sum(count for count, _ in failures)
            if accelerator.is_main_process:
                cell = f"warning: {where} at {step_count} steps: the reward {name}"
                # tqdm.write: on a line of its own, not after the training loop's progress bar.
                if missing:
                    tqdm.write(f"{cell} {failures[0][1]} ({missing} of {len(gathered)} images); they are scored as "
                               "missing and left out of the mean", file=sys.stderr)
                if nonfinite > missing:
                    tqdm.write(f"{cell} returned NaN or inf for {nonfinite - missing} of {len(gathered)} images; they "
                               "are left out of the mean", file=sys.stderr)
            stats[(step_count, name)] = {
                "mean": float(finite.mean()) if len(finite) else math.nan,
                "std": float(finite.std(unbiased=False)) if len(finite) > 1 else 0.0,
                "count": int(len(finite)),
                "nonfinite": nonfinite,
            }
        if accelerator.is_main_process and images_kept:
            strips[step_count] = torch.cat(images_kept)[:STRIP_IMAGES]
    return stats, strips


def save_strip(images: torch.Tensor, path) -> None:
    """Save (n, 3, H, W) images in [0, 1] side by side as one PNG."""
    row = torch.cat(list(images), dim=2)  # (3, H, n*W)
    array = (row.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(path)
