"""The training loop: one algorithm, one seed, a fixed epoch budget.

This is the only place that touches accelerate, checkpoints and loggers; algorithms stay
pure tensor math (zoo.algorithm). One epoch is:

1. every process samples `trajectories_per_epoch` trajectories (groups of the size the
   algorithm asks for, `groups_per_prompt` groups of each prompt drawn, `draw_prompt_ids`)
   from prompts and noise drawn with a generator seeded by (seed, epoch, process), so a
   resumed run draws exactly what an uninterrupted one would, in sampling calls of
   `TrainLoop.sample_batch_size` trajectories;
2. the images the algorithm names are scored, each call's while the next one samples,
   `shape_rewards` runs locally, and prompts and returns are gathered so that advantages
   and stat tracking see the global batch;
3. minibatches of groups are replayed step by step (or whole trajectories for
   whole-trajectory losses, in chunks of steps with the exact gradient; only the steps
   `Algorithm.trained_steps` names, all K by default), log-probs recomputed under the
   current weights (with the KL to the base model when asked), and gradients accumulated over
   `gradient_accumulation_steps` minibatches times the loss calls per minibatch, as the
   DDPO reference multiplies accumulation by K; a forward-process algorithm (NFT) instead
   trains step j's call on each trajectory's final latent noised to step j's timestep
   (`forward_process_losses`), against the old policy it samples with, which moves after
   the epoch by the algorithm's rule and is checkpointed;
4. evaluation when due, then one atomic checkpoint (LoRA, optimizer, tracker, counters,
   records), so a kill loses at most the epoch in flight.

Faults: a reward that raises or returns NaN/inf skips that epoch's update (nothing reaches
the stat tracker) with a counted warning, and stops the run at the first such epoch
beyond `max_bad_reward_batches`; a non-finite loss or adapter weight stops the run
before anything is checkpointed. Either way the run ends with `RunStopped`, and the
checkpoint on disk is the last good epoch's.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from benchmarks.checkpoint import WriteFailed, kill_point, load_state, save_state
from benchmarks.evaluate import EvalSettings, evaluate, mixed_seed, save_strip
from rewards.base import Reward
from rewards.executor import RewardExecutor
from zoo.algorithm import Algorithm, ForwardLossInputs, LossInputs, RewardBackpropAlgorithm
from zoo.policy import LoraSettings, Performance, Policy
from zoo.sampling import SamplerConfig, TrajectorySampler, forward_noise
from zoo.trajectory import Trajectory

BASE = "base"
"""The name of the untrained model's rows."""


class RunStopped(RuntimeError):
    """The run cannot go on; the checkpoint on disk is the last good epoch's."""


class TrainingDiverged(RunStopped):
    """The loss or the adapter weights became NaN or infinite."""


class RewardFailures(RunStopped):
    """The training reward failed (raised, or returned NaN/inf) in more epochs than allowed."""


@dataclass(frozen=True)
class TrainLoop:
    """Speed and memory switches of the training loop. Like `Performance`, none of them
    changes what is computed beyond floating-point rounding, so a resumed run may change
    them: an epoch's noise is drawn before it is split into sampling calls."""

    sample_batch_size: int | None = None
    """Trajectories per sampling call, a multiple of each algorithm's group size (default:
    the preset's). Smaller calls bound the sampler's memory and let rewards overlap."""
    overlap_rewards: bool | None = None
    """Score each sampling call's images in a background thread (on CUDA, its own stream)
    while the next call samples. None: on CUDA only; on a CPU the reward and the sampler
    compete for the same cores."""
    steps_per_backward: int = 8
    """Losses over whole trajectories (REBEL) recompute at most this many steps of a
    minibatch per backward pass, so their memory does not grow with K. With fewer than K,
    one extra forward pass without gradients first gives every step's log-prob, and each
    chunk's backward gets the whole loss's exact gradient (the other steps enter as
    constants)."""


@dataclass
class JobSettings:
    """Everything one (algorithm, seed) run needs besides the algorithm's own config."""

    model: str
    epochs: int
    trajectories_per_epoch: int
    train_prompts: tuple[str, ...]
    eval_every: int
    eval: EvalSettings
    mixed_precision: str
    train_reward: str
    out_dir: Path
    log: Callable[[dict], None] = field(default=lambda row: None)
    log_evaluations: Callable[[list[dict]], None] = field(default=lambda records: None)
    """Called on the main process with each evaluation's records as it is made."""
    max_bad_reward_batches: int = 3
    """Epochs whose reward failed that are skipped (no update) before the run stops."""
    performance: Performance = field(default_factory=Performance)
    loop: TrainLoop = field(default_factory=TrainLoop)
    groups_per_prompt: int = 1
    """Groups sampled from each prompt drawn per epoch (`draw_prompt_ids`)."""


def draw_prompt_ids(num_prompts: int, groups: int, groups_per_prompt: int, generator: torch.Generator) -> torch.Tensor:
    """The training prompt (an index below `num_prompts`) of each of an epoch's `groups` groups.

    groups_per_prompt = 1: each group's prompt drawn uniformly and independently, with
    replacement (one `torch.randint`; prompts repeat only by chance). N > 1: groups / N
    prompts drawn uniformly, without replacement (all distinct) when groups / N <=
    num_prompts and with replacement otherwise, each repeated N times in adjacent
    positions; every group keeps its own noise. So a per-prompt stat tracker sees at least
    N x group size rewards of every prompt drawn in the epoch (more when it is drawn twice,
    or by another process). `groups` must be a multiple of N (`benchmarks.run` refuses
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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of everything one process draws in one epoch (prompts, x_T, step noise,
    shuffles), so that a resumed run draws what an uninterrupted one would. Below 2^31:
    evaluation seeds take the upper half of the generator's 32-bit seeds."""
    return mixed_seed(seed, epoch, rank)


def _fresh_counters() -> dict:
    """The budget a row has spent before training, as its records report it."""
    return {"samples_seen": 0, "optimizer_updates": 0, "backward_passes": 0, "reward_calls": 0, "wall_time": 0.0}


def checkpoint_path(out_dir: Path, algo: str, seed: int) -> Path:
    return out_dir / "checkpoints" / f"{algo}_seed{seed}.pt"


def _records(algo: str, seed: int, epoch: int, counters: dict, stats: dict) -> list[dict]:
    return [
        {
            "algo": algo,
            "seed": seed,
            "epoch": epoch,
            "eval_steps": step_count,
            "reward": reward_name,
            **values,
            "samples_seen": counters["samples_seen"],
            "optimizer_updates": counters["optimizer_updates"],
            "backward_passes": counters["backward_passes"],
            "reward_calls": counters["reward_calls"],
            "reward_images": counters["reward_calls"],
            "wall_time": round(counters["wall_time"], 3),
        }
        for (step_count, reward_name), values in stats.items()
    ]


def _evaluate_and_record(
    policy, rewards, settings: JobSettings, accelerator, algo, seed, epoch, counters, save_strips: bool
) -> list[dict]:
    stats, strips = evaluate(policy, rewards, settings.eval, accelerator)
    if save_strips and accelerator.is_main_process:
        (settings.out_dir / "samples").mkdir(parents=True, exist_ok=True)
        for step_count, images in strips.items():
            save_strip(images, settings.out_dir / "samples" / f"{algo}_seed{seed}_steps{step_count}.png")
    records = _records(algo, seed, epoch, counters, stats)
    if accelerator.is_main_process:
        settings.log_evaluations(records)
    return records


def _save_on_main(accelerator: Accelerator, path: Path, state: dict) -> None:
    """The main process writes the checkpoint; if that fails, every process stops (the
    main one with the `WriteFailed` naming the path), instead of the others waiting for
    the main one at the next collective."""
    failure = None
    if accelerator.is_main_process:
        try:
            save_state(path, state)
        except WriteFailed as error:
            failure = error
    failed = accelerator.gather(torch.tensor([int(failure is not None)], device=accelerator.device))
    if failure is not None:
        raise failure
    if bool(failed.any()):
        raise RunStopped(f"the main process could not write {path}")


def evaluate_base(settings: JobSettings, seed: int, rewards: dict[str, Reward], accelerator: Accelerator) -> list[dict]:
    """Rows of the untrained model (epoch 0), computed once per seed and checkpointed."""
    path = checkpoint_path(settings.out_dir, BASE, seed)
    state = load_state(path)
    if state is not None:
        return state["records"]
    policy = Policy.from_pretrained(
        settings.model, device=accelerator.device, mixed_precision=settings.mixed_precision,
        performance=settings.performance,
    )
    counters = _fresh_counters()
    records = _evaluate_and_record(policy, rewards, settings, accelerator, BASE, seed, 0, counters, save_strips=True)
    _save_on_main(accelerator, path, {"records": records, "done": True})
    return records


def _reward_inputs(
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
) -> tuple[Trajectory, torch.Tensor | None, str | None]:
    """Sample `needs.group_size` trajectories per prompt in calls of `loop.sample_batch_size`
    trajectories, scoring each call's images (in the background when `overlap_rewards`).

    Returns (trajectories, scores, None), or (trajectories, None, what went wrong) when
    the reward raised or returned NaN or inf. Scores: (P, G) of the final images, or
    (P, G, M) of x̂0 at `reward_steps`. Every noise draw is made before the first call,
    so the trajectories do not depend on `sample_batch_size`.
    """
    needs = algorithm.needs
    policy = sampler.policy
    num_prompts, group_size = len(prompts), needs.group_size
    initial_noise = sampler.initial_noise(num_prompts, group_size, needs.shared_noise, generator)
    step_noise = torch.randn(
        (num_prompts, group_size, sampler.config.num_steps, *policy.latent_shape), generator=generator
    )
    groups_per_call = max(1, (loop.sample_batch_size or num_prompts * group_size) // group_size)

    parts, pending, shapes = [], [], []
    overlap = loop.overlap_rewards if loop.overlap_rewards is not None else policy.device.type == "cuda"
    executor = RewardExecutor(reward) if overlap else None
    try:
        for start in range(0, num_prompts, groups_per_call):
            call = slice(start, start + groups_per_call)
            part = sampler.sample(
                prompts[call], group_size=group_size, initial_noise=initial_noise[call],
                step_noise=step_noise[call], record_pred_x0=needs.record_pred_x0,
                reference_log_probs=needs.reference_log_probs, final_images=needs.final_images,
            )
            images, image_prompts, shape = _reward_inputs(algorithm, part, policy)
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


@dataclass
class Transitions:
    """The transitions one loss call trains on: p groups, G members, S steps each."""

    latents: torch.Tensor  # (p, G, S, C, h, w) x_t
    next_latents: torch.Tensor  # (p, G, S, C, h, w) x_t'
    steps: torch.Tensor  # (p, G, S) long step indices
    embeds: torch.Tensor  # (p, G, S, L, D) prompt embeddings
    old_log_probs: torch.Tensor  # (p, G, S)
    ref_log_probs: torch.Tensor | None  # (p, G, S)

    def log_probs(self, sampler: TrajectorySampler, per_member: bool = False) -> torch.Tensor:
        """(p, G, S) log-probs under the sampler's current weights, in one UNet call, or
        in one call per group member (`per_member`: the reference codes' way, for
        benchmarks.perf)."""
        if per_member:
            return torch.cat([self.select(steps=slice(None), members=slice(g, g + 1)).log_probs(sampler)
                              for g in range(self.steps.shape[1])], dim=1)
        flat = sampler.log_prob(
            self.latents.flatten(0, 2), self.steps.flatten(), self.next_latents.flatten(0, 2), self.embeds.flatten(0, 2)
        )
        return flat.view(self.steps.shape)

    def log_probs_and_kl(
        self, sampler: TrajectorySampler, per_member: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(p, G, S) log-probs under the current weights and (p, G, S) KL of each
        transition to the frozen base model (`TrajectorySampler.log_prob_and_kl`), for the
        losses whose `needs.kl_to_reference`; per member as `log_probs` is."""
        if per_member:
            parts = [self.select(steps=slice(None), members=slice(g, g + 1)).log_probs_and_kl(sampler)
                     for g in range(self.steps.shape[1])]
            return torch.cat([log_probs for log_probs, _ in parts], dim=1), torch.cat([kl for _, kl in parts], dim=1)
        log_probs, kl = sampler.log_prob_and_kl(
            self.latents.flatten(0, 2), self.steps.flatten(), self.next_latents.flatten(0, 2), self.embeds.flatten(0, 2)
        )
        return log_probs.view(self.steps.shape), kl.view(self.steps.shape)

    def select(self, steps: slice | torch.Tensor, members: slice = slice(None)) -> "Transitions":
        """The transitions at positions `steps` of dim 2 (and `members` of dim 1)."""
        return Transitions(*(None if t is None else t[:, members][:, :, steps] for t in (
            self.latents, self.next_latents, self.steps, self.embeds, self.old_log_probs, self.ref_log_probs)))


def minibatch_losses(
    algorithm: Algorithm,
    sampler: TrajectorySampler,
    transitions: Transitions,
    advantages: torch.Tensor,
    steps_per_backward: int,
    per_member: bool = False,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor] | None, bool]]:
    """(loss, metrics, last): the losses whose backward passes together give one
    minibatch's gradient; `last` marks the final one.

    A per-step loss (or a trajectory of at most `steps_per_backward` steps) is one loss.
    A whole-trajectory loss over more steps is computed once per chunk of steps: every
    step's log-prob is first computed without gradients, and each chunk's loss takes the
    chunk's log-probs with gradients and the rest as constants. Each is the full loss in
    value, and the sum of their gradients is the full loss's gradient. Metrics come with
    the first loss only. Lazily: each loss's graph can be freed before the next is built.
    advantages: (p, G, S), aligned with `transitions`.
    """

    def loss(log_probs: torch.Tensor, kl_to_reference: torch.Tensor | None = None):
        return algorithm.loss(LossInputs(
            log_probs=log_probs, old_log_probs=transitions.old_log_probs, advantages=advantages,
            step_index=transitions.steps, ref_log_probs=transitions.ref_log_probs, kl_to_reference=kl_to_reference,
        ))

    num_steps = transitions.steps.shape[2]
    if algorithm.needs.kl_to_reference:  # per-step losses only (`SamplingNeeds`)
        yield *loss(*transitions.log_probs_and_kl(sampler, per_member)), True
        return
    if not algorithm.needs.whole_trajectory_loss or num_steps <= steps_per_backward:
        yield *loss(transitions.log_probs(sampler, per_member)), True
        return
    chunks = torch.arange(num_steps, device=transitions.steps.device).split(steps_per_backward)
    with torch.no_grad():
        constants = torch.cat([transitions.select(chunk).log_probs(sampler, per_member) for chunk in chunks], dim=2)
    for i, chunk in enumerate(chunks):
        with_grad = transitions.select(chunk).log_probs(sampler, per_member)
        value, metrics = loss(constants.index_copy(2, chunk, with_grad))
        yield value, metrics if i == 0 else None, i == len(chunks) - 1


def gather_transitions(traj: Trajectory, groups: torch.Tensor, steps: torch.Tensor) -> Transitions:
    """The transitions at `steps` (p, G, S) of the groups `groups` (p,). Indexes only those:
    copying the groups' whole trajectories (all K steps, x̂0, images) for each of a
    minibatch's K loss calls would be K times the work."""
    device = traj.latents.device
    mb = groups.to(device)[:, None, None]  # (p, 1, 1)
    gi = torch.arange(traj.group_size, device=device)[None, :, None]  # (1, G, 1)
    steps = steps.to(device)
    return Transitions(
        latents=traj.latents[mb, gi, steps],
        next_latents=traj.next_latents[mb, gi, steps],
        steps=steps,
        embeds=traj.prompt_embeds[mb[:, 0, 0]][:, None, None].expand(-1, traj.group_size, steps.shape[-1], -1, -1),
        old_log_probs=traj.log_probs[mb, gi, steps],
        ref_log_probs=None if traj.ref_log_probs is None else traj.ref_log_probs[mb, gi, steps],
    )


def forward_process_losses(
    algorithm: Algorithm,
    sampler: TrajectorySampler,
    traj: Trajectory,
    groups: torch.Tensor,
    steps: torch.Tensor,
    advantages: torch.Tensor,
    old_policy: dict[str, torch.Tensor],
    generator: torch.Generator,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor], bool]]:
    """The loss of a forward-process algorithm (`needs.forward_process_loss`) on one
    minibatch, as one (loss, metrics, last) like `minibatch_losses`: the final clean latent
    x0 of each trajectory of the groups `groups` (p,) noised to the timestep of its step
    `steps` (p, G, 1) with fresh noise from `generator`, x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε,
    and the ε-predictions there without guidance (training never uses CFG): under the
    `old_policy` weights and, when asked, the frozen base model, without gradients; under
    the current weights with them. advantages: (p, G, 1), aligned with `steps`."""
    if steps.shape[2] != 1:
        raise ValueError(f"a forward-process loss call takes one step per trajectory, got {steps.shape[2]}")
    policy = sampler.policy
    device = traj.latents.device
    groups, steps = groups.to(device), steps[:, :, 0].to(device)  # (p,), (p, G)
    x0 = traj.final_latents[groups]  # (p, G, C, h, w)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    alpha = sampler.schedule.alpha_t[steps].float()  # (p, G)
    x_t = forward_noise(x0, noise, alpha).flatten(0, 1)
    timesteps = sampler.schedule.timesteps[steps].flatten()
    embeds = traj.prompt_embeds[groups].repeat_interleave(traj.group_size, dim=0)  # (p*G, L, D)

    def predict() -> torch.Tensor:
        return policy.predict_noise(x_t, timesteps, embeds, 1.0, sampler.config.kind).view(x0.shape)

    with torch.no_grad():
        with policy.trainable_weights(old_policy):
            old_prediction = predict()
        ref_prediction = None
        if algorithm.needs.reference_prediction:
            with policy.reference():
                ref_prediction = predict()
    yield *algorithm.loss(ForwardLossInputs(
        prediction=predict(), old_prediction=old_prediction, noise=noise, alpha_cumprod=alpha,
        advantages=advantages[:, :, 0], ref_prediction=ref_prediction,
    )), True


def _step_orders(num_prompts: int, group_size: int, num_steps: int, same_in_group: bool, generator) -> torch.Tensor:
    """(P, G, K) independent permutations of the K steps per trajectory (shared inside a
    group when the algorithm pairs its members step by step)."""
    members = 1 if same_in_group else group_size
    orders = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(num_prompts * members)])
    return orders.view(num_prompts, members, num_steps).expand(num_prompts, group_size, num_steps)


def _train_epoch(
    algorithm: Algorithm,
    config: Any,
    sampler: TrajectorySampler,
    traj: Trajectory,
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    generator: torch.Generator,
    loop: TrainLoop,
    show_progress: bool,
    old_policy: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, int]]:
    """One epoch of updates on `traj`: (mean metrics per loss call, this process's counts of
    optimizer updates and backward passes). `old_policy`: the adapter weights a
    forward-process algorithm trains against (default: the weights the epoch starts from)."""
    policy = sampler.policy
    needs = algorithm.needs
    if needs.forward_process_loss and old_policy is None:
        old_policy = policy.trainable_state()
    num_prompts, group_size, num_steps = traj.log_probs.shape
    # Drawn once per epoch, so that every inner epoch trains the same steps: the window
    # whose transitions a Flow-GRPO-Fast sampler would have recorded. None: all K steps.
    trained = algorithm.trained_steps(num_prompts, group_size, generator)  # (P, G, S)
    num_steps = num_steps if trained is None else trained.shape[2]  # from here: the steps trained per trajectory
    batch = config.train_batch_size
    chunks = [torch.arange(num_steps)] if needs.whole_trajectory_loss else [torch.tensor([j]) for j in range(num_steps)]
    calls_per_update = config.loss_calls_per_update
    params = policy.trainable_parameters()
    totals: dict[str, torch.Tensor] = {}
    calls = updates = backward_passes = 0
    device = traj.latents.device
    first_bad = torch.zeros((), device=device)  # the latest loss, until one is not finite: then that one
    advantages = advantages.to(device)
    gi = torch.arange(group_size, device=device)[None, :, None]
    progress = tqdm(
        total=config.num_inner_epochs * (num_prompts // batch) * len(chunks),
        desc="train", leave=False, disable=not show_progress,
    )
    for _ in range(config.num_inner_epochs):
        order = torch.randperm(num_prompts, generator=generator)
        step_orders = _step_orders(num_prompts, group_size, num_steps, needs.same_step_order_in_group, generator)
        if trained is not None:  # positions in each trajectory's trained steps -> step indices
            step_orders = trained.gather(2, step_orders)
        minibatches = order.split(batch)
        # DDPO, REBEL and D3PO replay every step of a minibatch before the next minibatch;
        # SDPO's reference replays step j of every minibatch before step j + 1.
        if config.steps_in_outer_loop:
            schedule = [(mb, chunk) for chunk in chunks for mb in minibatches]
        else:
            schedule = [(mb, chunk) for mb in minibatches for chunk in chunks]
        for minibatch, chunk in schedule:
            steps = step_orders[minibatch][:, :, chunk]
            mb = minibatch.to(device)[:, None, None]
            calls += 1
            update_now = calls % calls_per_update == 0
            if needs.forward_process_loss:
                losses = forward_process_losses(
                    algorithm, sampler, traj, minibatch, steps, advantages[mb, gi, steps.to(device)], old_policy,
                    generator,
                )
            else:
                transitions = gather_transitions(traj, minibatch, steps)
                losses = minibatch_losses(
                    algorithm, sampler, transitions, advantages[mb, gi, transitions.steps], loop.steps_per_backward
                )
            for loss, metrics, last in losses:
                # Recorded on the device and checked once per epoch: a check per call
                # would make the host wait for the GPU every call.
                first_bad = torch.where(torch.isfinite(first_bad), loss.detach(), first_bad)
                # DDP all-reduces on every backward unless told not to: only the last
                # backward before an optimizer step needs synchronised gradients.
                sync = update_now and last
                with contextlib.nullcontext() if sync else accelerator.no_sync(policy.denoiser):
                    accelerator.backward(loss / calls_per_update)
                backward_passes += 1
                # Summed on the device: a float() per call would wait for the GPU every call.
                for name, value in (metrics or {}).items():
                    totals[name] = totals.get(name, 0.0) + value.detach()
            if update_now:
                if config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                updates += 1
            progress.update(1)
    progress.close()
    # Every process learns of a non-finite loss on any of them, so that all stop together
    # instead of the others waiting for the diverged one's next collective.
    bad = accelerator.gather(first_bad.reshape(1))
    bad = bad[~torch.isfinite(bad)]
    if bad.numel():
        raise TrainingDiverged(f"the loss became {float(bad[0])} (try a lower learning rate)")
    metrics = {name: float(value) / max(calls, 1) for name, value in totals.items()}
    return metrics, {"optimizer_updates": updates, "backward_passes": backward_passes}


def reward_backprop_epoch(
    algorithm: RewardBackpropAlgorithm,
    config: Any,
    sampler: TrajectorySampler,
    prompts: list[str],
    generator: torch.Generator,
    reward: Reward,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    show_progress: bool,
) -> tuple[dict[str, float], dict[str, int], str | None]:
    """One epoch of reward back-propagation (zoo/draft.py): one trajectory per prompt, in
    minibatches of `train_batch_size`. Each minibatch is sampled with the weights the last
    update left (its K_total - K first steps without gradients, its last K = `grad_steps`
    with them, each of those UNet calls checkpointed), decoded and scored with the graph
    kept, and its loss back-propagated into the LoRA: one backward pass per minibatch, an
    optimizer step every `gradient_accumulation_steps` of them. So sampling is training
    here, and the trajectory budget is the other algorithms': an epoch of 64 trajectories
    in minibatches of 8 takes 8 updates, as they do.

    All of the epoch's noise is drawn first, as `sample_and_score` draws it. A reward that
    raises or returns NaN or inf on a minibatch (on any process) costs that minibatch's
    update: no backward pass, and its accumulated gradient is dropped.

    Returns (mean metrics per trained minibatch, this process's optimizer updates and
    backward passes, the first reward failure or None).
    """
    policy = sampler.policy
    num_prompts = len(prompts)
    initial_noise = sampler.initial_noise(num_prompts, 1, False, generator)[:, 0]  # (P, C, h, w)
    step_noise = torch.randn((num_prompts, sampler.config.num_steps, *policy.latent_shape), generator=generator)
    calls_per_update = config.loss_calls_per_update
    params = policy.trainable_parameters()
    totals: dict[str, torch.Tensor] = {}
    scores, grad_steps = [], []
    failure = None
    calls = updates = backward_passes = 0
    update_failed = False
    minibatches = list(range(0, num_prompts, config.train_batch_size))
    for start in tqdm(minibatches, desc="train", leave=False, disable=not show_progress):
        part = slice(start, start + config.train_batch_size)
        k = algorithm.grad_steps(generator)
        calls += 1
        update_now = calls % calls_per_update == 0
        # DDP all-reduces on every backward unless told not to, and decides so in the forward.
        with contextlib.nullcontext() if update_now else accelerator.no_sync(policy.denoiser):
            embeds = policy.encode_prompts(prompts[part])  # (p, L, D)
            images = policy.decode_with_grad(sampler.final_latents(initial_noise[part], embeds, step_noise[part], k))
            why = None
            try:
                rewards = reward.score_with_grad(images, prompts[part])
                bad = int((~torch.isfinite(rewards.detach())).sum())
                if bad:
                    why = f"returned NaN or inf for {bad} of {rewards.numel()} scores"
            # Rewards are third-party models: a failure costs an update, not the run
            # (the caller counts it against --max-bad-reward-batches).
            except Exception as error:
                why = f"raised {type(error).__name__}: {' '.join(str(error).split())}"
            # Every process skips a minibatch that failed anywhere, so that the DDP
            # all-reduces stay in step.
            failed = gather_object([why] if why else [])
            if failed:
                failure = failure or f"{failed[0]} (minibatch {calls} of {len(minibatches)}, its update skipped)"
                update_failed = True
            else:
                loss, metrics = algorithm.loss(rewards)
                accelerator.backward(loss / calls_per_update)
                backward_passes += 1
                scores.append(rewards.detach())
                grad_steps.append(k)
                for name, value in metrics.items():
                    totals[name] = totals.get(name, 0.0) + value.detach()
        if update_now:
            if not update_failed:
                if config.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                updates += 1
            optimizer.zero_grad(set_to_none=True)
            update_failed = False
    metrics = {name: float(value) / len(scores) for name, value in totals.items()}
    if scores:
        metrics["grad_steps"] = sum(grad_steps) / len(grad_steps)
        metrics["train_reward"] = float(accelerator.gather(torch.cat(scores).float().mean().reshape(1)).mean())
    return metrics, {"optimizer_updates": updates, "backward_passes": backward_passes}, failure


def training_sampler_config(config: Any, settings: JobSettings) -> SamplerConfig:
    """The sampler `config` trains with: its kind, K, eta and guidance, with the preset's
    timestep spacing when it samples with the preset's kind (the evaluation's); a config
    that samples with another kind keeps the scheduler config's own spacing."""
    spacing = settings.eval.timestep_spacing if config.sampler == settings.eval.sampler else None
    return SamplerConfig(config.sampler, config.num_steps, config.eta, config.guidance_scale, spacing)


def run_algorithm(
    algo: str,
    config: Any,
    seed: int,
    settings: JobSettings,
    train_reward: Reward,
    eval_rewards: dict[str, Reward],
    accelerator: Accelerator,
) -> list[dict]:
    """Train `algo` from the base for `settings.epochs` epochs (resuming from its
    checkpoint if one exists) and return its evaluation records."""
    path = checkpoint_path(settings.out_dir, algo, seed)
    state = load_state(path)
    if state is not None and state.get("done"):
        return state["records"]

    algorithm = config.build()
    needs = algorithm.needs
    torch.manual_seed(seed)  # the LoRA initialisation, identical for every algorithm of a seed
    lora = LoraSettings(config.lora_rank, config.lora_alpha, tuple(config.lora_target_modules))
    policy = Policy.from_pretrained(
        settings.model, device=accelerator.device, mixed_precision=settings.mixed_precision, lora=lora,
        performance=settings.performance,
    )
    sampler = TrajectorySampler(policy, training_sampler_config(config, settings))
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.weight_decay,
    )
    tracker = algorithm.new_tracker()
    counters = {**_fresh_counters(), "bad_reward_batches": 0}
    records: list[dict] = []
    start_epoch = 0
    if state is not None:
        policy.load_adapter_state(state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        tracker.load_state_dict(state["tracker"])
        counters.update(state["counters"])
        records = list(state["records"])
        start_epoch = state["epoch"]
    # A forward-process algorithm's old policy: the adapter weights it samples with and
    # trains against, the current ones at the start, checkpointed as they are.
    old_policy = None
    if needs.forward_process_loss:
        old_policy = policy.trainable_state() if state is None else {
            name: weights.to(policy.device) for name, weights in state["old_policy"].items()
        }
    policy.denoiser, optimizer = accelerator.prepare(policy.unet, optimizer)

    group_size = needs.group_size
    groups = settings.trajectories_per_epoch // group_size
    rank, world = accelerator.process_index, accelerator.num_processes
    show = accelerator.is_main_process
    epochs = tqdm(range(start_epoch, settings.epochs), desc=f"{algo} seed {seed}", disable=not show,
                  initial=start_epoch, total=settings.epochs)
    for epoch in epochs:
        done = epoch + 1
        where = f"{algo} seed {seed}, epoch {done}"
        last_good = f"{path} holds epoch {epoch}, the last good one" if epoch else f"no {algo} epoch was checkpointed"
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
        prompt_ids = draw_prompt_ids(len(settings.train_prompts), groups, settings.groups_per_prompt, generator)
        prompts = [settings.train_prompts[i] for i in prompt_ids.tolist()]
        images_before = train_reward.images_scored
        if isinstance(algorithm, RewardBackpropAlgorithm):
            kill_point(f"train:{algo}:{done}")
            metrics, counts, failure = reward_backprop_epoch(
                algorithm, config, sampler, prompts, generator, train_reward, optimizer, accelerator, show
            )
            counters["optimizer_updates"] += counts["optimizer_updates"]
            counters["backward_passes"] += counts["backward_passes"] * world
        else:
            with policy.trainable_weights(old_policy) if old_policy is not None else contextlib.nullcontext():
                traj, scores, failure = sample_and_score(
                    algorithm, sampler, prompts, generator, train_reward, settings.loop
                )
        # Every process skips an epoch that failed anywhere, so that the stat trackers and
        # the DDP all-reduces stay in step; nothing of it reaches the tracker.
        failures = gather_object([failure] if failure else [])
        if failures:
            counters["bad_reward_batches"] += 1
            count, limit = counters["bad_reward_batches"], settings.max_bad_reward_batches
            what = f"{where}: the reward {settings.train_reward} {failures[0]}"
            if count > limit:
                raise RewardFailures(
                    f"{what}; that is {count} failed reward batches, more than --max-bad-reward-batches {limit} "
                    f"allows; {last_good}"
                )
            if show:
                tqdm.write(f"warning: {what}; skipping this epoch's update ({count} of at most {limit})",
                           file=sys.stderr)
            metrics = {"bad_reward_batches": float(count)}
        elif not isinstance(algorithm, RewardBackpropAlgorithm):
            returns = algorithm.shape_rewards(traj, scores)
            advantages = global_advantages(algorithm, prompts, returns, tracker, accelerator)
            kill_point(f"train:{algo}:{done}")
            try:
                metrics, counts = _train_epoch(
                    algorithm, config, sampler, traj, advantages, optimizer, accelerator, generator, settings.loop, show,
                    old_policy,
                )
            except TrainingDiverged as error:
                raise TrainingDiverged(f"{where}: {error}; {last_good}") from None
            metrics["train_reward"] = float(accelerator.gather(scores.float().mean().reshape(1)).mean())
            # Every process takes the same updates (DDP); backward passes are counted on all.
            counters["optimizer_updates"] += counts["optimizer_updates"]
            counters["backward_passes"] += counts["backward_passes"] * world
            if old_policy is not None:
                old_policy = algorithm.next_old_policy(
                    old_policy, policy.trainable_state(), counters["optimizer_updates"]
                )

        local_calls = torch.tensor([train_reward.images_scored - images_before], device=accelerator.device)
        counters["reward_calls"] += int(accelerator.gather(local_calls).sum())
        counters["samples_seen"] += settings.trajectories_per_epoch * world
        counters["wall_time"] += time.perf_counter() - started
        lora_state = policy.adapter_state()
        if not all(torch.isfinite(weights).all() for weights in lora_state.values()):
            raise TrainingDiverged(
                f"{where}: the LoRA weights became NaN or inf (try a lower learning rate); {last_good}"
            )
        if done % settings.eval_every == 0 or done == settings.epochs:
            kill_point(f"evaluate:{algo}:{done}")
            records += _evaluate_and_record(
                policy, eval_rewards, settings, accelerator, algo, seed, done, counters,
                save_strips=done == settings.epochs,
            )
        if show:
            epochs.set_postfix(reward=f"{metrics.get('train_reward', math.nan):.4f}",
                               loss=f"{metrics.get('loss', math.nan):.2e}")
            settings.log({"algo": algo, "seed": seed, "epoch": done, **metrics})
        _save_on_main(accelerator, path, {
            "epoch": done,
            "done": done == settings.epochs,
            "lora": lora_state,
            "optimizer": optimizer.state_dict(),
            "tracker": tracker.state_dict(),
            "counters": counters,
            "records": records,
            **({} if old_policy is None else {"old_policy": {k: v.cpu() for k, v in old_policy.items()}}),
        })

    if accelerator.is_main_process:
        policy.save_lora(settings.out_dir / "lora" / f"{algo}_seed{seed}")
    return records
