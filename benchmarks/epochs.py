"""The training epochs of the three algorithm kinds, and the schedule they share with the
budget (`epoch_schedule`).

`train_on_batch` trains a replay or forward-process algorithm on its epoch's sampled batch:
minibatches of groups replayed step by step (or whole trajectories for whole-trajectory
losses, in chunks of steps with the exact gradient; only the steps
`Algorithm.trained_steps` names, all K by default), log-probs recomputed under the current
weights (with the KL to the base model when asked), and gradients accumulated over
`gradient_accumulation_steps` minibatches times the loss calls per minibatch, as the DDPO
reference multiplies accumulation by K; a forward-process algorithm (NFT) instead trains
step j's call on each trajectory's final latent noised to step j's timestep
(`benchmarks.loss_calls.forward_process_call`), against the old policy it samples with.
`reward_backprop_epoch` samples and trains at once (DRaFT).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from benchmarks.ema import WeightsEma
from benchmarks.loop import TrainingDiverged, TrainLoop
from benchmarks.loss_calls import (
    LossCall, ReplayCall, fitting_micro_batch, forward_process_call, gather_transitions, micro_batched_losses,
    slices_of,
)
from rewards.base import Reward
from zoo.algorithm import (
    Algorithm, EpochContext, ForwardProcessAlgorithm, RewardBackpropAlgorithm, SamplingNeeds, TrainingConfig,
)
from zoo.sampling import TrajectorySampler
from zoo.trajectory import Trajectory


@dataclass(frozen=True)
class EpochSchedule:
    """How a run's epoch of an algorithm is cut into loss calls and optimizer updates:
    what the training loop makes and what the run's budget counts."""

    minibatches: int
    """Minibatches of `train_batch_size` groups per pass over the epoch's batch (the last
    one smaller when it does not divide the groups)."""
    inner_epochs: int
    """Passes over the batch (`num_inner_epochs`)."""
    steps_per_trajectory: int
    """Steps of each trajectory trained (`trained_steps_per_trajectory`)."""
    steps_per_call: int
    """Steps of each trajectory in one loss call: 1, or all of them for a whole-trajectory loss."""
    calls_per_update: int
    """Loss calls between optimizer steps (`loss_calls_per_update`)."""

    @property
    def loss_calls(self) -> int:
        return self.inner_epochs * self.minibatches * (self.steps_per_trajectory // self.steps_per_call)

    @property
    def optimizer_updates(self) -> int:
        return self.loss_calls // self.calls_per_update


@dataclass(frozen=True)
class Shard:
    """The part of an epoch's global batch of `total` groups that one of `world` processes
    samples and holds: groups [start, start + total / world), the same slice of the epoch's
    prompts, noise and advantages. The budget (`--trajectories-per-epoch`, the minibatches,
    the updates) is the run's, not the process's: a global minibatch's groups are trained
    by the processes that hold them, each weighting its loss by its share (`weight`), so
    that DDP's mean of the processes' gradients is the minibatch's gradient: exactly for a
    loss that is a mean over groups; a loss normalised by a count inside its call (D3PO's
    decided pairs) matches only when every process's part counts alike (no tied pairs)."""

    rank: int
    total: int
    world: int = 1

    @classmethod
    def of(cls, total: int, accelerator: Accelerator) -> "Shard":
        world = accelerator.num_processes
        if total % world:
            raise ValueError(f"{total} groups do not split evenly over {world} processes")
        return cls(accelerator.process_index, total, world)

    @property
    def size(self) -> int:
        return self.total // self.world

    @property
    def start(self) -> int:
        return self.rank * self.size

    def held(self, groups: torch.Tensor) -> torch.Tensor:
        """Which of the global groups `groups` (p,) this process holds: a (p,) mask."""
        return (groups >= self.start) & (groups < self.start + self.size)

    def weight(self, held: int, minibatch: int) -> float:
        """The factor on the loss of `held` of a global minibatch's `minibatch` groups:
        DDP divides the sum of the processes' gradients by `world`."""
        return self.world * held / minibatch


@dataclass(frozen=True)
class MinibatchShard(Shard):
    """A process that holds the whole global batch (gathered after sampling,
    `benchmarks.sharding.gathered_batch`) and trains the `rank`-th of `world` equal parts of
    every global minibatch: every process makes the same UNet calls, as a sharded denoiser
    (`--fsdp`), whose every call is a collective, needs. Each part's loss is weighted by its
    share, as `Shard`'s are, so the gradient is the same minibatch's."""

    @property
    def size(self) -> int:
        return self.total

    @property
    def start(self) -> int:
        return 0

    def held(self, groups: torch.Tensor) -> torch.Tensor:
        """The `rank`-th of `world` equal parts of the minibatch `groups` (p,), by position."""
        part = len(groups) // self.world
        positions = torch.arange(len(groups))
        return (positions >= self.rank * part) & (positions < (self.rank + 1) * part)


def epoch_schedule(config: TrainingConfig, needs: SamplingNeeds, groups: int) -> EpochSchedule:
    """The schedule of an epoch of `groups` groups (the run's, whatever its processes) under `config`."""
    steps = config.trained_steps_per_trajectory
    return EpochSchedule(
        minibatches=math.ceil(groups / config.train_batch_size),
        inner_epochs=config.num_inner_epochs,
        steps_per_trajectory=steps,
        steps_per_call=steps if needs.whole_trajectory_loss else 1,
        calls_per_update=config.loss_calls_per_update,
    )


def step_orders(num_prompts: int, group_size: int, num_steps: int, same_in_group: bool, generator) -> torch.Tensor:
    """(P, G, K) independent permutations of the K steps per trajectory (shared inside a
    group when the algorithm pairs its members step by step)."""
    members = 1 if same_in_group else group_size
    orders = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(num_prompts * members)])
    return orders.view(num_prompts, members, num_steps).expand(num_prompts, group_size, num_steps)


def train_on_batch(
    algorithm: Algorithm,
    config: Any,
    sampler: TrajectorySampler,
    traj: Trajectory,
    advantages: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    context: EpochContext,
    loop: TrainLoop,
    show_progress: bool,
    old_policy: dict[str, torch.Tensor] | None = None,
    ema: WeightsEma | None = None,
    shard: Shard | None = None,
) -> tuple[dict[str, float], dict[str, int]]:
    """One epoch of updates on the epoch's sampled batch, of which this process holds
    `traj` (`shard`; default: all of it) and `advantages`: (mean metrics per loss call over
    every process, the counts of optimizer updates and of backward passes on every process
    together). `sampler` must be the one that sampled `traj` (its noise levels decide the
    log-probs replayed). Every draw (the steps trained, the shuffles, a forward process's
    noise) comes from `context.generator`, for the whole global batch, so that every
    process draws the same. `old_policy`: the adapter weights a forward-process algorithm
    trains against (default: the weights the epoch starts from, when it keeps one);
    `ema`: moved after every optimizer update."""
    policy = sampler.policy
    needs = algorithm.needs
    forward = isinstance(algorithm, ForwardProcessAlgorithm)
    if forward and algorithm.needs_old_policy and old_policy is None:
        old_policy = policy.trainable_state()
    generator = context.generator
    _, group_size, num_steps = traj.log_probs.shape
    shard = shard or Shard(0, traj.num_prompts)
    num_prompts = shard.total  # from here: the global batch's groups
    # Drawn once per epoch, so that every inner epoch trains the same steps: the window
    # whose transitions a Flow-GRPO-Fast sampler would have recorded. None: all K steps.
    trained = algorithm.trained_steps(context, num_prompts, group_size)  # (P, G, S)
    num_steps = num_steps if trained is None else trained.shape[2]  # from here: the steps trained per trajectory
    plan = epoch_schedule(config, needs, num_prompts)
    if plan.steps_per_trajectory != num_steps:
        raise ValueError(
            f"{type(algorithm).__name__} trains {num_steps} steps per trajectory, and its config says "
            f"{plan.steps_per_trajectory} (trained_steps_per_trajectory)"
        )
    batch = config.train_batch_size
    width = plan.steps_per_call
    chunks = [torch.arange(start, start + width) for start in range(0, num_steps, width)]
    calls_per_update = plan.calls_per_update
    params = policy.trainable_parameters()
    totals: dict[str, torch.Tensor] = {}
    calls = updates = backward_passes = 0
    device = traj.latents.device
    first_bad = torch.zeros((), device=device)  # the latest loss, until one is not finite: then that one
    advantages = advantages.to(device)
    gi = torch.arange(group_size, device=device)[None, :, None]
    progress = tqdm(total=plan.loss_calls, desc="train", leave=False, disable=not show_progress)

    def loss_calls_in_order() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(minibatch groups, chunk of step positions) of every loss call, in order;
        lazily, so that each inner epoch's shuffles are drawn from `generator` between
        the previous inner epoch's loss calls and its own, as they are consumed."""
        for _ in range(config.num_inner_epochs):
            order = torch.randperm(num_prompts, generator=generator)
            orders = step_orders(num_prompts, group_size, num_steps, needs.same_step_order_in_group, generator)
            if trained is not None:  # positions in each trajectory's trained steps -> step indices
                orders = trained.gather(2, orders)
            minibatches = order.split(batch)
            # DDPO, REBEL and D3PO replay every step of a minibatch before the next minibatch;
            # SDPO's reference replays step j of every minibatch before step j + 1.
            if config.steps_in_outer_loop:
                yield from ((mb, orders[mb][:, :, chunk]) for chunk in chunks for mb in minibatches)
            else:
                yield from ((mb, orders[mb][:, :, chunk]) for mb in minibatches for chunk in chunks)

    def train(block: list[LossCall], update_now: bool) -> None:
        """Backward passes of one update's loss calls, then its optimizer step if due."""
        nonlocal first_bad, backward_passes, updates
        chunk = loop.steps_per_backward if needs.whole_trajectory_loss else None

        def ddp(last: bool) -> contextlib.AbstractContextManager:
            """DDP all-reduces in every backward pass unless its forward ran under no_sync:
            only the update's last one needs synchronised gradients, and every process
            makes it, while the others' calls differ in number by the groups each holds."""
            return contextlib.nullcontext() if update_now and last else accelerator.no_sync(policy.denoiser)

        for loss, metrics, last in micro_batched_losses(block, sampler, micro_batch, chunk, ddp):
            # Recorded on the device and checked once per epoch: a check per call
            # would make the host wait for the GPU every call.
            first_bad = torch.where(torch.isfinite(first_bad), loss.detach(), first_bad)
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
    for minibatch, steps in loss_calls_in_order():
        calls += 1
        update_now = calls % calls_per_update == 0
        noise = torch.randn((len(minibatch), group_size, *traj.latents.shape[3:]), generator=generator) if forward else None
        held = shard.held(minibatch)
        if held.any():
            local, rows, weight = minibatch[held] - shard.start, held, shard.weight(int(held.sum()), len(minibatch))
        elif not block and (update_now or sizing and micro_batch is None):
            # None of this update's groups is here: a backward pass at weight 0 all the same
            # (on this process's first group), for DDP's all-reduce (and the micro-batch
            # measurement's gather) needs every process.
            local, rows, weight = torch.tensor([0]), torch.tensor([0]), 0.0
        else:
            local = None
        if local is not None:
            steps = steps[rows]
            mb = local.to(device)[:, None, None]
            if forward:
                block.append(forward_process_call(
                    algorithm, sampler, traj, local, steps, advantages[mb, gi, steps.to(device)], old_policy,
                    noise[rows], weight,
                ))
            else:
                transitions = gather_transitions(traj, local, steps)
                block.append(ReplayCall(algorithm, transitions, advantages[mb, gi, transitions.steps], weight=weight))
        if block and (update_now or micro_batch is None):
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
    counts = {"optimizer_updates": updates, "backward_passes": _summed(accelerator, backward_passes)}
    return _mean_over_processes(accelerator, totals, shard.world * max(calls, 1)), counts | (
        {"micro_batch": micro_batch} if sizing else {})


def _summed(accelerator: Accelerator, count: int) -> int:
    """`count` summed over every process."""
    return int(accelerator.gather(torch.tensor([count], device=accelerator.device)).sum())


def _mean_over_processes(accelerator: Accelerator, totals: dict[str, torch.Tensor], divisor: int) -> dict[str, float]:
    """Each metric's sum over every process, divided by `divisor`; in the order first met."""
    gathered = gather_object([{name: float(value) for name, value in totals.items()}])
    names = dict.fromkeys(name for part in gathered for name in part)
    return {name: sum(part.get(name, 0.0) for part in gathered) / divisor for name in names}


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
    shard: Shard | None = None,
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

    `prompts` are the global batch's, one per trajectory; each process samples and trains
    its equal part of every minibatch (`shard`: the world; default one process), so DDP's
    mean of the processes' gradients is the minibatch's (`benchmarks.plan` refuses a
    `train_batch_size` that the processes do not divide).

    Returns (mean metrics per trained minibatch over every process, the optimizer updates
    and the backward passes on every process together, the first reward failure or None).
    """
    policy = sampler.policy
    num_prompts = len(prompts)
    shard = shard or Shard(0, num_prompts)
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
        share = min(config.train_batch_size, num_prompts - start) // shard.world
        part = slice(start + shard.rank * share, start + (shard.rank + 1) * share)
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
        pieces = slices_of(len(mb_prompts), micro_batch)
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
    metrics = _mean_over_processes(accelerator, totals, shard.world * max(len(scores), 1))
    if scores:
        metrics["grad_steps"] = sum(grad_steps) / len(grad_steps)
        metrics["train_reward"] = float(accelerator.gather(torch.cat(scores).float().mean().reshape(1)).mean())
    return metrics, {"optimizer_updates": updates, "backward_passes": _summed(accelerator, backward_passes)}, failure
