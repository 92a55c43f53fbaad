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
   (`forward_process_call`), against the old policy it samples with, which moves after
   the epoch by the algorithm's rule and is checkpointed;
4. evaluation when due (on the EMA of the weights with `--ema.decay`, `benchmarks.ema`,
   moved after every optimizer update), then one atomic checkpoint (LoRA, optimizer,
   tracker, counters, records, the EMA), so a kill loses at most the epoch in flight.

Faults: a reward that raises or returns NaN/inf skips that epoch's update (nothing reaches
the stat tracker) with a counted warning, and stops the run at the first such epoch
beyond `max_bad_reward_batches`; a non-finite loss or adapter weight stops the run
before anything is checkpointed. Either way the run ends with `RunStopped`, and the
checkpoint on disk is the last good epoch's. A reward that fails at an evaluation costs
that evaluation's cells (scored as missing, `benchmarks.evaluate`), not the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from benchmarks.ema import Ema, WeightsEma
from benchmarks.evaluate import EvalSettings, evaluate, mixed_seed, save_strip
from rewards.base import Reward
from rewards.executor import RewardExecutor
from zoo.algorithm import Algorithm, ForwardLossInputs, LossInputs, RewardBackpropAlgorithm
from zoo.policy import LoraSettings, Performance, Policy
from zoo.sampling import SamplerConfig, TrajectorySampler
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
    micro_batch: int | None = None
    """Groups per UNet call with gradients when training (a group is one prompt's
    trajectories: one, a pair, G). The algorithm's minibatch (`train_batch_size` groups)
    and accumulation define what one update averages over; this only decides how that
    work reaches the UNet. Larger than the minibatch: the loss calls of one optimizer
    update are joined into calls of up to this many groups (fewer, larger kernels; each
    loss call's loss is still computed on its own). Smaller: a minibatch's loss call is
    cut into pieces of this many groups, after one extra forward pass without gradients
    over the whole call, and each piece's backward gets the whole loss's exact gradient
    (the other groups enter as constants). None: on a CPU, one UNet call per loss call;
    on CUDA, the largest that fits (`fitting_micro_batch`): the first loss call of the
    run is trained alone while its memory is measured, and the choice, logged, holds for
    the rest of the run. Reward
    back-propagation (DRaFT) samples through the UNet in its minibatch: this cuts it (with
    the extra pass) but does not join minibatches."""


def ignore(_: Any) -> None:
    """The default of `JobSettings`' hooks: a module-level function, not a lambda, so that
    settings pickle into a worker process (`benchmarks.jobs`)."""


@dataclass
class JobSettings:
    """Everything one (algorithm, seed) run needs besides the algorithm's own config."""

    model: str
    epochs: int
    trajectories_per_epoch: int
    train_prompts: tuple[str, ...]
    eval_every: int
    eval: EvalSettings
    """The reported evaluation, made after the last epoch and at every `eval_every`."""
    mixed_precision: str
    train_reward: str
    out_dir: Path
    log: Callable[[dict], None] = ignore
    """Called on the main process with each epoch's training metrics."""
    log_evaluations: Callable[[list[dict]], None] = ignore
    """Called on the main process with each evaluation's records as it is made."""
    progress_bars: bool = True
    """Progress bars of the epochs and training passes on the main process; off in the
    worker processes of `--jobs`, whose driver reports each job in one line instead."""
    max_bad_reward_batches: int = 3
    """Epochs whose reward failed that are skipped (no update) before the run stops."""
    performance: Performance = field(default_factory=Performance)
    loop: TrainLoop = field(default_factory=TrainLoop)
    ema: Ema = field(default_factory=Ema)
    groups_per_prompt: int = 1
    """Groups sampled from each prompt drawn per epoch (`draw_prompt_ids`)."""
    resolution: int | None = None
    """Image side of a flow-matching model (`Preset.resolution`)."""
    selection_eval: EvalSettings | None = None
    """A second evaluation made beside `eval` at every point (the validation prompts), on
    which a report chooses the epoch it reports `eval` at (the peak of the curve), so that
    the choice never sees the reported prompts."""
    curve_samples_per_prompt: int | None = None
    """Samples per prompt of the evaluations before the last epoch (the curve's intermediate
    points; both evaluations'); None: as many as the final one."""

    def evaluations(self, epoch: int) -> list[EvalSettings]:
        """The evaluations made after `epoch` (0: the base model's, the full ones)."""
        chosen = [self.eval] if self.selection_eval is None else [self.eval, self.selection_eval]
        if epoch in (0, self.epochs) or self.curve_samples_per_prompt is None:
            return chosen
        return [dataclasses.replace(e, samples_per_prompt=self.curve_samples_per_prompt) for e in chosen]


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


def _records(algo: str, seed: int, epoch: int, counters: dict, stats: dict, split: str) -> list[dict]:
    return [
        {
            "algo": algo,
            "seed": seed,
            "epoch": epoch,
            "split": split,
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
    records = []
    for evaluation in settings.evaluations(epoch):
        where = f"{algo} seed {seed}, epoch {epoch}"
        if settings.selection_eval is not None:
            where += f", {evaluation.split} prompts"
        stats, strips = evaluate(policy, rewards, evaluation, accelerator, where=where)
        # The strips show the reported evaluation's prompts.
        if save_strips and accelerator.is_main_process and evaluation is settings.eval:
            (settings.out_dir / "samples").mkdir(parents=True, exist_ok=True)
            for step_count, images in strips.items():
                save_strip(images, settings.out_dir / "samples" / f"{algo}_seed{seed}_steps{step_count}.png")
        records += _records(algo, seed, epoch, counters, stats, evaluation.split)
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
        performance=settings.performance, resolution=settings.resolution,
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


def _placed(whole: tuple[torch.Tensor, ...], part: tuple[torch.Tensor, ...], index: tuple) -> tuple[torch.Tensor, ...]:
    """Copies of the tensors of `whole` with those of `part` written at `index`: a piece's
    outputs, which carry the gradient, among the constants of the rest of its loss call."""
    placed = []
    for whole_one, part_one in zip(whole, part):
        whole_one = whole_one.clone()
        whole_one[index] = part_one
        placed.append(whole_one)
    return tuple(placed)


@dataclass
class ReplayCall:
    """One `loss` call that replays stored transitions (p groups, G members, S steps),
    in the form `micro_batched_losses` cuts and joins: the model inputs of any groups and
    steps, the UNet call that scores them, and the loss of the whole call."""

    algorithm: Algorithm
    transitions: Transitions
    advantages: torch.Tensor  # (p, G, S)
    per_member: bool = False
    """One UNet call per group member (the reference codes' way, for benchmarks.perf,
    which trains one loss call at a time: such calls are never joined)."""

    @property
    def groups(self) -> int:
        return self.transitions.steps.shape[0]

    @property
    def steps(self) -> int:
        return self.transitions.steps.shape[2]

    def model_inputs(self, groups: slice, steps: slice) -> tuple[torch.Tensor, ...]:
        """Flat (N, ...) latents, step indices, next latents and embeddings of the
        transitions at `groups` and `steps`; member-major when `per_member`."""
        parts = [t[groups][:, :, steps] for t in (self.transitions.latents, self.transitions.steps,
                                                   self.transitions.next_latents, self.transitions.embeds)]
        if self.per_member:
            parts = [t.transpose(0, 1) for t in parts]
        return tuple(t.flatten(0, 2) for t in parts)

    def run(self, sampler: TrajectorySampler, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Flat log-probs under the current weights (and KL to the base, when the loss
        needs it) of joined `model_inputs`."""
        score = sampler.log_prob_and_kl if self.algorithm.needs.kl_to_reference else sampler.log_prob
        if not self.per_member:
            outputs = score(*inputs)
            return outputs if isinstance(outputs, tuple) else (outputs,)
        members = self.transitions.steps.shape[1]
        parts = [score(*chunks) for chunks in zip(*(t.chunk(members) for t in inputs))]
        parts = [p if isinstance(p, tuple) else (p,) for p in parts]
        return tuple(torch.cat(outputs) for outputs in zip(*parts))

    def unflatten(self, outputs: tuple[torch.Tensor, ...], groups: int, steps: int) -> tuple[torch.Tensor, ...]:
        members = self.transitions.steps.shape[1]
        if self.per_member:
            return tuple(o.view(members, groups, steps).transpose(0, 1) for o in outputs)
        return tuple(o.view(groups, members, steps) for o in outputs)

    def zeros(self, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """(p, G, S) zeros for each output of `like`, a part of this call's outputs."""
        return tuple(like_one.new_zeros(self.transitions.steps.shape) for like_one in like)

    def place(self, whole: tuple[torch.Tensor, ...], part: tuple[torch.Tensor, ...], groups: slice, steps: slice):
        """`whole` (p, G, S) with `part` at `groups` and `steps`, out of place."""
        return _placed(whole, part, (groups, slice(None), steps))

    def loss(self, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = self.transitions
        return self.algorithm.loss(LossInputs(
            log_probs=outputs[0], old_log_probs=t.old_log_probs, advantages=self.advantages, step_index=t.steps,
            ref_log_probs=t.ref_log_probs, kl_to_reference=outputs[1] if len(outputs) > 1 else None,
        ))


@dataclass
class ForwardCall:
    """One `loss` call of a forward-process algorithm (`needs.forward_process_loss`): p
    groups of G trajectories, each one's final clean latent noised to one timestep, with
    the predictions that take no gradient already made; cut and joined like `ReplayCall`."""

    algorithm: Algorithm
    noisy: torch.Tensor  # (p, G, C, h, w) x_t
    timesteps: torch.Tensor  # (p, G)
    embeds: torch.Tensor  # (p, G, L, D)
    inputs: ForwardLossInputs  # everything but `prediction`

    groups = property(lambda self: self.noisy.shape[0])
    steps = property(lambda self: 1)

    def model_inputs(self, groups: slice, steps: slice) -> tuple[torch.Tensor, ...]:
        return self.noisy[groups].flatten(0, 1), self.timesteps[groups].flatten(), self.embeds[groups].flatten(0, 1)

    def run(self, sampler: TrajectorySampler, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Flat predictions (ε̂, or v̂ for flow) under the current weights, without guidance
        (training never uses CFG)."""
        return (sampler.predict(*inputs, 1.0),)

    def unflatten(self, outputs: tuple[torch.Tensor, ...], groups: int, steps: int) -> tuple[torch.Tensor, ...]:
        return tuple(o.view(groups, *self.noisy.shape[1:]) for o in outputs)

    def zeros(self, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(like_one.new_zeros(self.noisy.shape) for like_one in like)

    def place(self, whole: tuple[torch.Tensor, ...], part: tuple[torch.Tensor, ...], groups: slice, steps: slice):
        return _placed(whole, part, (groups,))

    def loss(self, outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.algorithm.loss(dataclasses.replace(self.inputs, prediction=outputs[0]))


LossCall = ReplayCall | ForwardCall

Segment = tuple[int, slice, slice]
"""(index of a loss call, its groups, its steps) inside one UNet call."""


def _parts(count: int, most: int | None) -> list[slice]:
    """Slices of at most `most` of `count` items; [slice(None)] when they fit in one."""
    if most is None or count <= most:
        return [slice(None)]
    return [slice(a, a + most) for a in range(0, count, most)]


def plan_unet_calls(calls: list[LossCall], micro_batch: int | None, steps_per_backward: int | None) -> list[list[Segment]]:
    """The UNet calls with gradients that train `calls` (one optimizer update's loss calls,
    in order), each a list of segments. A call whose steps exceed `steps_per_backward` (None:
    never cut by steps) is cut into chunks of steps; a call of more groups than `micro_batch`
    into pieces of that many groups; consecutive uncut calls are joined while their groups
    fit in `micro_batch`. `micro_batch` None: one UNet call per loss call (or chunk)."""
    plan: list[list[Segment]] = []
    joined = 0  # groups in the last UNet call of `plan`, while it may take more calls
    for index, call in enumerate(calls):
        step_parts = _parts(call.steps, steps_per_backward)
        group_parts = _parts(call.groups, micro_batch)
        whole = (index, slice(None), slice(None))
        if step_parts == group_parts == [slice(None)]:
            if micro_batch is not None and joined and joined + call.groups <= micro_batch:
                plan[-1].append(whole)
                joined += call.groups
            else:
                plan.append([whole])
                joined = call.groups
            continue
        plan += [[(index, groups, steps)] for groups in group_parts for steps in step_parts]
        joined = 0
    return plan


def _outputs(call: LossCall, sampler: TrajectorySampler, groups: slice, steps: slice) -> tuple[torch.Tensor, ...]:
    inputs = call.model_inputs(groups, steps)
    count = len(range(call.groups)[groups])
    return call.unflatten(call.run(sampler, *inputs), count, len(range(call.steps)[steps]))


def micro_batched_losses(
    calls: list[LossCall], sampler: TrajectorySampler, micro_batch: int | None, steps_per_backward: int | None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor] | None, bool]]:
    """(loss, metrics, last) for each UNet call of `plan_unet_calls`: the sum of the losses
    of the loss calls it holds, whose backward passes together give the sum of those loss
    calls' gradients; `last` marks the final one.

    A loss call cut into several UNet calls first gets all of its outputs without
    gradients (one extra forward pass); each piece's loss then takes the piece's outputs
    with gradients and the rest as constants: the whole loss in value, and the sum of the
    pieces' gradients is its gradient, whatever the loss (REBEL's sequence ratio, a
    minibatch normalisation). Metrics: the sum of the metrics of the loss calls whose
    first piece the UNet call holds (each loss call's metrics count once), None if it
    holds none. Lazily: each UNet call's graph can be freed before the next is built."""
    plan = plan_unet_calls(calls, micro_batch, steps_per_backward)
    pieces_of: dict[int, list[Segment]] = {}
    for segments in plan:
        for segment in segments:
            pieces_of.setdefault(segment[0], []).append(segment)
    constants: dict[int, tuple[torch.Tensor, ...]] = {}
    with torch.no_grad():
        for index, segments in pieces_of.items():
            if len(segments) == 1:
                continue
            whole = None
            for _, groups, steps in segments:
                part = _outputs(calls[index], sampler, groups, steps)
                whole = calls[index].place(whole or calls[index].zeros(part), part, groups, steps)
            constants[index] = whole
    for position, segments in enumerate(plan):
        inputs = [calls[index].model_inputs(groups, steps) for index, groups, steps in segments]
        joined = inputs[0] if len(inputs) == 1 else tuple(torch.cat(parts) for parts in zip(*inputs))
        flat = calls[segments[0][0]].run(sampler, *joined)
        sizes = [part[0].shape[0] for part in inputs]
        total, metrics = None, None
        for (index, groups, steps), outputs in zip(segments, zip(*(o.split(sizes) for o in flat))):
            call = calls[index]
            outputs = call.unflatten(outputs, len(range(call.groups)[groups]), len(range(call.steps)[steps]))
            if index in constants:
                outputs = call.place(constants[index], outputs, groups, steps)
            loss, call_metrics = call.loss(outputs)
            total = loss if total is None else total + loss
            if pieces_of[index][0] == (index, groups, steps):
                metrics = metrics or {}
                for name, value in call_metrics.items():
                    metrics[name] = metrics.get(name, 0.0) + value
        yield total, metrics, position == len(plan) - 1


def minibatch_losses(
    algorithm: Algorithm,
    sampler: TrajectorySampler,
    transitions: Transitions,
    advantages: torch.Tensor,
    steps_per_backward: int,
    per_member: bool = False,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor] | None, bool]]:
    """(loss, metrics, last): the losses whose backward passes together give one
    minibatch's gradient (`micro_batched_losses` of its one loss call, one UNet call per
    chunk of steps); `last` marks the final one. A whole-trajectory loss over more than
    `steps_per_backward` steps is cut into chunks of steps; per-step losses never are
    (their calls hold one step). advantages: (p, G, S), aligned with `transitions`."""
    chunk = steps_per_backward if algorithm.needs.whole_trajectory_loss else None
    call = ReplayCall(algorithm, transitions, advantages, per_member)
    return micro_batched_losses([call], sampler, None, chunk)


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


def forward_process_call(
    algorithm: Algorithm,
    sampler: TrajectorySampler,
    traj: Trajectory,
    groups: torch.Tensor,
    steps: torch.Tensor,
    advantages: torch.Tensor,
    old_policy: dict[str, torch.Tensor],
    generator: torch.Generator,
) -> ForwardCall:
    """The loss call of a forward-process algorithm (`needs.forward_process_loss`) on one
    minibatch: the final clean latent x0 of each trajectory of the groups `groups` (p,)
    noised to the timestep of its step `steps` (p, G, 1) with fresh noise from
    `generator` (`TrajectorySampler.forward_process`), and the predictions there without
    guidance (training never uses CFG) under the `old_policy` weights and, when asked, the
    frozen base model, made now without gradients; the current weights' prediction, with
    them, is the call's to make. advantages: (p, G, 1), aligned with `steps`."""
    if steps.shape[2] != 1:
        raise ValueError(f"a forward-process loss call takes one step per trajectory, got {steps.shape[2]}")
    policy = sampler.policy
    device = traj.latents.device
    groups, steps = groups.to(device), steps[:, :, 0].to(device)  # (p,), (p, G)
    x0 = traj.final_latents[groups]  # (p, G, C, h, w)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    noisy, timesteps, target, x0_scale = sampler.forward_process(x0, noise, steps)
    embeds = traj.prompt_embeds[groups][:, None].expand(-1, traj.group_size, -1, -1)  # (p, G, L, D)
    call = ForwardCall(algorithm, noisy, timesteps, embeds, ForwardLossInputs(
        prediction=None, old_prediction=None, target=target, x0_scale=x0_scale, advantages=advantages[:, :, 0],
    ))
    everything = (slice(None), slice(None))
    with torch.no_grad():
        with policy.trainable_weights(old_policy):
            call.inputs.old_prediction = _outputs(call, sampler, *everything)[0]
        if algorithm.needs.reference_prediction:
            with policy.reference():
                call.inputs.ref_prediction = _outputs(call, sampler, *everything)[0]
    return call


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
    ema: WeightsEma | None = None,
) -> tuple[dict[str, float], dict[str, int]]:
    """One epoch of updates on `traj`: (mean metrics per loss call, this process's counts of
    optimizer updates and backward passes). `old_policy`: the adapter weights a
    forward-process algorithm trains against (default: the weights the epoch starts from);
    `ema`: moved after every optimizer update."""
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

    def schedule() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(minibatch groups, chunk of step positions) of every loss call, in order;
        lazily, so that each inner epoch's shuffles are drawn from `generator` between
        the previous inner epoch's loss calls and its own, as they are consumed."""
        for _ in range(config.num_inner_epochs):
            order = torch.randperm(num_prompts, generator=generator)
            step_orders = _step_orders(num_prompts, group_size, num_steps, needs.same_step_order_in_group, generator)
            if trained is not None:  # positions in each trajectory's trained steps -> step indices
                step_orders = trained.gather(2, step_orders)
            minibatches = order.split(batch)
            # DDPO, REBEL and D3PO replay every step of a minibatch before the next minibatch;
            # SDPO's reference replays step j of every minibatch before step j + 1.
            if config.steps_in_outer_loop:
                yield from ((mb, step_orders[mb][:, :, chunk]) for chunk in chunks for mb in minibatches)
            else:
                yield from ((mb, step_orders[mb][:, :, chunk]) for mb in minibatches for chunk in chunks)

    def train(block: list[LossCall], update_now: bool) -> None:
        """Backward passes of one update's loss calls, then its optimizer step if due."""
        nonlocal first_bad, backward_passes, updates
        chunk = loop.steps_per_backward if needs.whole_trajectory_loss else None
        for loss, metrics, last in micro_batched_losses(block, sampler, micro_batch, chunk):
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
            if ema is not None:
                ema.update()
        progress.update(len(block))

    # One update's loss calls see the same weights, so they may share UNet calls
    # (`TrainLoop.micro_batch`); with it unset, each is trained as soon as it is made. On
    # CUDA, unset means: measure the first loss call's memory and choose (`fitting_micro_batch`).
    micro_batch = loop.micro_batch
    sizing = micro_batch is None and device.type == "cuda"
    block: list[LossCall] = []
    for minibatch, steps in schedule():
        mb = minibatch.to(device)[:, None, None]
        calls += 1
        update_now = calls % calls_per_update == 0
        if needs.forward_process_loss:
            block.append(forward_process_call(
                algorithm, sampler, traj, minibatch, steps, advantages[mb, gi, steps.to(device)], old_policy, generator,
            ))
        else:
            transitions = gather_transitions(traj, minibatch, steps)
            block.append(ReplayCall(algorithm, transitions, advantages[mb, gi, transitions.steps]))
        if update_now or micro_batch is None:
            if sizing and micro_batch is None:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            train(block, update_now)
            if sizing and micro_batch is None:
                grown = torch.cuda.max_memory_allocated(device) - before
                free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - before
                chosen = fitting_micro_batch(grown, block[0].groups, free, calls_per_update * batch)
                # Every process takes the smallest choice, so that none runs out of memory.
                micro_batch = int(accelerator.gather(torch.tensor([chosen], device=device)).min())
                if show_progress:
                    tqdm.write(f"--loop.micro-batch {micro_batch} (measured: {grown / 2**30:.2f} GiB for a UNet "
                               f"call of {block[0].groups} groups, {free / 2**30:.1f} GiB free)", file=sys.stderr)
            block = []
    if block:  # loss calls after the epoch's last update: their gradients wait for the next one, as before
        train(block, False)
    progress.close()
    # Every process learns of a non-finite loss on any of them, so that all stop together
    # instead of the others waiting for the diverged one's next collective.
    bad = accelerator.gather(first_bad.reshape(1))
    bad = bad[~torch.isfinite(bad)]
    if bad.numel():
        raise TrainingDiverged(f"the loss became {float(bad[0])} (try a lower learning rate)")
    metrics = {name: float(value) / max(calls, 1) for name, value in totals.items()}
    counts = {"optimizer_updates": updates, "backward_passes": backward_passes}
    return metrics, counts | ({"micro_batch": micro_batch} if sizing else {})


def fitting_micro_batch(grown_bytes: int, groups: int, free_bytes: int, most: int) -> int:
    """Groups per UNet call (`TrainLoop.micro_batch` unset, on CUDA): the most whose memory
    fits in 90% of `free_bytes`, from `grown_bytes` of peak growth measured for a call of
    `groups` (memory taken as linear in groups); at least 1, at most `most` (an update's
    groups, beyond which nothing is left to join)."""
    per_group = max(grown_bytes, 1) / groups
    return max(1, min(most, int(0.9 * free_bytes / per_group)))


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
    micro_batch: int | None = None,
    ema: WeightsEma | None = None,
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

    `micro_batch` (`TrainLoop.micro_batch`) below `train_batch_size` cuts each minibatch's
    sampling with gradients into pieces, after one pass over the whole minibatch without
    them (one backward pass per piece). `ema`: moved after every optimizer update.

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
        part = slice(start, min(start + config.train_batch_size, num_prompts))
        k = algorithm.grad_steps(generator)
        calls += 1
        update_now = calls % calls_per_update == 0

        mb_prompts, mb_initial, mb_steps = prompts[part], initial_noise[part], step_noise[part]

        def rewards_of(piece: slice) -> torch.Tensor:
            """The rewards of the minibatch's trajectories `piece`, with the graph to the
            LoRA through the last k steps unless gradients are off."""
            embeds = policy.encode_prompts(mb_prompts[piece])  # (p, L, D)
            latents = sampler.final_latents(mb_initial[piece], embeds, mb_steps[piece], k)
            return reward.score_with_grad(policy.decode_with_grad(latents), mb_prompts[piece])

        def backward_context(last: bool):
            """DDP all-reduces on every backward unless told not to, and decides so in the
            forward: only the update's last backward pass synchronises."""
            return contextlib.nullcontext() if update_now and last else accelerator.no_sync(policy.denoiser)

        # `TrainLoop.micro_batch` below the minibatch: its rewards first without gradients,
        # then each piece's with them, the others constants (the exact gradient).
        pieces = _parts(len(mb_prompts), micro_batch)
        with backward_context(True) if len(pieces) == 1 else contextlib.nullcontext():
            why = None
            try:
                with torch.no_grad() if len(pieces) > 1 else contextlib.nullcontext():
                    rewards = torch.cat([rewards_of(piece) for piece in pieces])
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
            elif len(pieces) == 1:
                loss, metrics = algorithm.loss(rewards)
                accelerator.backward(loss / calls_per_update)
                backward_passes += 1
        if not failed and len(pieces) > 1:
            for i, piece in enumerate(pieces):
                with backward_context(i == len(pieces) - 1):
                    placed = rewards.clone()
                    placed[piece] = rewards_of(piece)
                    loss, piece_metrics = algorithm.loss(placed)
                    accelerator.backward(loss / calls_per_update)
                backward_passes += 1
                metrics = piece_metrics if i == 0 else metrics
        if not failed:
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
                if ema is not None:
                    ema.update()
            optimizer.zero_grad(set_to_none=True)
            update_failed = False
    metrics = {name: float(value) / len(scores) for name, value in totals.items()}
    if scores:
        metrics["grad_steps"] = sum(grad_steps) / len(grad_steps)
        metrics["train_reward"] = float(accelerator.gather(torch.cat(scores).float().mean().reshape(1)).mean())
    return metrics, {"optimizer_updates": updates, "backward_passes": backward_passes}, failure


def training_sampler_config(config: Any, settings: JobSettings) -> SamplerConfig:
    """The sampler `config` trains with: its kind, K, eta, guidance and flow SDE, with the preset's
    timestep spacing when it samples with the preset's kind (the evaluation's); a config
    that samples with another kind keeps the scheduler config's own spacing."""
    spacing = settings.eval.timestep_spacing if config.sampler == settings.eval.sampler else None
    return SamplerConfig(config.sampler, config.num_steps, config.eta, config.guidance_scale, spacing, config.flow_sde)


def _evaluated_weights(policy: Policy, ema: WeightsEma | None) -> contextlib.AbstractContextManager:
    """Run with the weights that evaluations see and lora/ holds: the EMA, swapped in and
    the trained weights put back after, when `--ema.evaluate` (so training goes on from the
    trained weights); else the trained weights as they are."""
    if ema is not None and ema.settings.evaluate:
        return policy.trainable_weights(ema.weights)
    return contextlib.nullcontext()


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
    checkpoint if one exists) and return its evaluation records. The evaluations and the
    final lora/<algo>_seed<seed>/ are of the trained weights, or of their EMA under
    `settings.ema` with `evaluate` (`benchmarks.ema`)."""
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
        performance=settings.performance, resolution=settings.resolution,
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
    ema = None
    if settings.ema.on:
        ema = WeightsEma(settings.ema, policy.named_trainable_parameters(), None if state is None else state["ema"])
    policy.denoiser, optimizer = accelerator.prepare(policy.model, optimizer)

    loop = settings.loop
    group_size = needs.group_size
    groups = settings.trajectories_per_epoch // group_size
    rank, world = accelerator.process_index, accelerator.num_processes
    show = accelerator.is_main_process
    bars = show and settings.progress_bars
    epochs = tqdm(range(start_epoch, settings.epochs), desc=f"{algo} seed {seed}", disable=not bars,
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
                algorithm, config, sampler, prompts, generator, train_reward, optimizer, accelerator, bars,
                loop.micro_batch, ema,
            )
            counters["optimizer_updates"] += counts["optimizer_updates"]
            counters["backward_passes"] += counts["backward_passes"] * world
        else:
            with policy.trainable_weights(old_policy) if old_policy is not None else contextlib.nullcontext():
                traj, scores, failure = sample_and_score(
                    algorithm, sampler, prompts, generator, train_reward, loop
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
                    algorithm, config, sampler, traj, advantages, optimizer, accelerator, generator, loop, bars,
                    old_policy, ema,
                )
                # Found once per run: later epochs train at the micro-batch the first one chose.
                loop = dataclasses.replace(loop, micro_batch=counts.get("micro_batch", loop.micro_batch))
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
            with _evaluated_weights(policy, ema):
                records += _evaluate_and_record(
                    policy, eval_rewards, settings, accelerator, algo, seed, done, counters,
                    save_strips=done == settings.epochs,
                )
        if bars:
            epochs.set_postfix(reward=f"{metrics.get('train_reward', math.nan):.4f}",
                               loss=f"{metrics.get('loss', math.nan):.2e}")
        if show:
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
            **({} if ema is None else {"ema": ema.state_dict()}),
        })

    if accelerator.is_main_process:
        with _evaluated_weights(policy, ema):
            policy.save_lora(settings.out_dir / "lora" / f"{algo}_seed{seed}")
    return records
