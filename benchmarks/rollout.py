"""An epoch's rollout: the prompts drawn, the trajectories sampled in calls of
`TrainLoop.sample_batch_size`, the images the algorithm names scored (each call's while the
next one samples, when `overlap_rewards`), and the advantages computed on the batch gathered
from every process.

Every draw comes from the epoch's generator, seeded by (seed, epoch), so a resumed run draws
exactly what an uninterrupted one would; all of an epoch's noise is drawn, for the global
batch on every process, before its first sampling call, so the trajectories do not depend
on how the epoch is split into calls or over processes (each samples its `Shard`).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from benchmarks.epochs import Shard
from benchmarks.evaluate import mixed_seed
from benchmarks.loop import TrainLoop
from rewards.base import Reward
from rewards.executor import RewardExecutor
from zoo.algorithm import Algorithm
from zoo.policy import Policy
from zoo.sampling import TrajectorySampler
from zoo.trajectory import Trajectory


def draw_prompt_ids(num_prompts: int, groups: int, groups_per_prompt: int, generator: torch.Generator) -> torch.Tensor:
    """The training prompt (an index below `num_prompts`) of each of an epoch's `groups` groups.

    groups_per_prompt = 1: each group's prompt drawn uniformly and independently, with
    replacement (one `torch.randint`; prompts repeat only by chance). N > 1: groups / N
    prompts drawn uniformly, without replacement (all distinct) when groups / N <=
    num_prompts and with replacement otherwise, each repeated N times in adjacent
    positions; every group keeps its own noise. So a per-prompt stat tracker sees at least
    N x group size rewards of every prompt drawn in the epoch (more when it is drawn twice,
    or by another process). `groups` must be a multiple of N (`benchmarks.plan` refuses
    others).
    """
    if groups_per_prompt == 1:
        return torch.randint(num_prompts, (groups,), generator=generator)
    blocks = groups // groups_per_prompt
    if blocks <= num_prompts:
        drawn = torch.randperm(num_prompts, generator=generator)[:blocks]
    else:
        drawn = torch.randint(num_prompts, (blocks,), generator=generator)
    return drawn.repeat_interleave(groups_per_prompt)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything drawn in one epoch (prompts, x_T, step noise, shuffles), the
    same on every process (each draws the global batch's and keeps its shard), so that a
    resumed run draws what an uninterrupted one would, and a run on N processes what it
    would on one. Below 2^31: evaluation seeds take the upper half of the generator's
    32-bit seeds."""
    return mixed_seed(seed, epoch)


def reward_inputs(
    algorithm: Algorithm, traj: Trajectory, policy: Policy
) -> tuple[torch.Tensor, list[str], tuple[int, ...]]:
    """The images to score (N, 3, H, W), their N prompts, and the shape of the scores:
    (P, G) for the final images, or (P, G, M) for the decoded x̂0 at `reward_steps`."""
    steps = algorithm.reward_steps(traj)
    num_prompts, group_size = traj.num_prompts, traj.group_size
    if steps is None:
        prompts = [p for p in traj.prompts for _ in range(group_size)]
        return traj.images.flatten(0, 1), prompts, (num_prompts, group_size)
    if traj.pred_x0 is None:
        raise ValueError("the algorithm scores x̂0 at chosen steps but did not ask the sampler to record x̂0")
    per_trajectory = steps.shape[-1]
    pi = torch.arange(num_prompts)[:, None, None]
    gi = torch.arange(group_size)[None, :, None]
    latents = traj.pred_x0[pi, gi, steps.cpu()]  # (P, G, M, C, h, w)
    prompts = [p for p in traj.prompts for _ in range(group_size * per_trajectory)]
    return policy.decode(latents.flatten(0, 2)), prompts, (num_prompts, group_size, per_trajectory)


def _run_now(score: Callable[..., torch.Tensor], *args) -> Future:
    """The finished future of `score(*args)`: the serial path's stand-in for the executor."""
    future: Future = Future()
    try:
        future.set_result(score(*args))
    except Exception as error:  # handed to the caller as the executor would hand it
        future.set_exception(error)
    return future


def sample_and_score(
    algorithm: Algorithm,
    sampler: TrajectorySampler,
    prompts: list[str],
    generator: torch.Generator,
    reward: Reward,
    loop: TrainLoop,
    shard: Shard | None = None,
) -> tuple[Trajectory, torch.Tensor | None, str | None]:
    """Sample `needs.group_size` trajectories per prompt of this process's `shard` of the
    global batch's `prompts` (default: all of them) in calls of `loop.sample_batch_size`
    trajectories, scoring each call's images (in the background when `overlap_rewards`).

    Returns (trajectories, scores, None), or (trajectories, None, what went wrong) when
    the reward raised or returned NaN or inf. Scores: (P, G) of the final images, or
    (P, G, M) of x̂0 at `reward_steps`, P the shard's prompts. Every noise draw is made,
    for the global batch, before the first call, so the trajectories depend neither on
    `sample_batch_size` nor on the number of processes.
    """
    needs = algorithm.needs
    policy = sampler.policy
    num_prompts, group_size = len(prompts), needs.group_size
    initial_noise = sampler.initial_noise(num_prompts, group_size, needs.shared_noise, generator)
    step_noise = torch.randn(
        (num_prompts, group_size, sampler.config.num_steps, *policy.latent_shape), generator=generator
    )
    shard = shard or Shard(0, num_prompts)
    end = shard.start + shard.size
    groups_per_call = max(1, (loop.sample_batch_size or shard.size * group_size) // group_size)

    parts, pending, shapes = [], [], []
    overlap = loop.overlap_rewards if loop.overlap_rewards is not None else policy.device.type == "cuda"
    executor = RewardExecutor(reward) if overlap else None
    try:
        for start in range(shard.start, end, groups_per_call):
            call = slice(start, min(start + groups_per_call, end))
            part = sampler.sample(
                prompts[call], group_size=group_size, initial_noise=initial_noise[call],
                step_noise=step_noise[call], record_pred_x0=needs.record_pred_x0,
                reference_log_probs=needs.reference_log_probs, final_images=needs.final_images,
            )
            images, image_prompts, shape = reward_inputs(algorithm, part, policy)
            pending.append(executor.submit(images, image_prompts) if executor else _run_now(reward.score, images, image_prompts))
            parts.append(part)
            shapes.append(shape)
        scores = []
        for future, shape in zip(pending, shapes):
            try:
                scores.append(future.result().view(shape))
            # Rewards are third-party models: any failure of one costs one update, not
            # the run, up to the limit the caller enforces.
            except Exception as error:
                return Trajectory.cat(parts), None, f"raised {type(error).__name__}: {' '.join(str(error).split())}"
    finally:
        if executor is not None:
            executor.shutdown()
    traj, scores = Trajectory.cat(parts), torch.cat(scores)
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        return traj, None, f"returned NaN or inf for {bad} of {scores.numel()} scores"
    return traj, scores, None


def global_advantages(
    algorithm: Algorithm, prompts: list[str], returns: torch.Tensor, tracker: Any, accelerator: Accelerator
) -> torch.Tensor:
    """This process's slice of the advantages computed on the batch gathered from every
    process, so that stat tracking sees the global batch and every process's tracker
    holds the same state. prompts: P local captions; returns (P, G) or (P, G, K)."""
    all_prompts = gather_object(list(prompts))
    all_returns = accelerator.gather(returns.contiguous())
    start = accelerator.process_index * len(prompts)
    return algorithm.advantages(all_prompts, all_returns, tracker)[start : start + len(prompts)]
