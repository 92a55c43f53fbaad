"""Loss calls and how they reach the denoiser.

A loss call is one `loss` of the algorithm: a `ReplayCall` re-scores stored transitions
(p groups, G members, S steps) under the current weights; a `ForwardCall` predicts at each
trajectory's final latent noised again. `micro_batched_losses` decides the UNet calls with
gradients that train one optimizer update's loss calls (`TrainLoop.micro_batch`,
`steps_per_backward`): calls joined while they fit, or cut into pieces whose backward
passes sum to the whole loss's exact gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from zoo.algorithm import ForwardLossInputs, ForwardProcessAlgorithm, LossInputs, ReplayAlgorithm
from zoo.sampling import TrajectorySampler
from zoo.trajectory import Trajectory


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

    algorithm: ReplayAlgorithm
    transitions: Transitions
    advantages: torch.Tensor  # (p, G, S)
    per_member: bool = False
    """One UNet call per group member (the reference codes' way, for benchmarks.perf,
    which trains one loss call at a time: such calls are never joined)."""
    weight: float = 1.0
    """The factor on the call's loss and metrics: this process's share of a global
    minibatch (`benchmarks.epochs.Shard.weight`)."""

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
        needs = self.algorithm.needs
        score = partial(sampler.log_prob_and_kl, kl_form=needs.kl_form) if needs.kl_to_reference else sampler.log_prob
        detached = sampler.policy.unconditional_detached() if needs.detach_unconditional else contextlib.nullcontext()
        with detached:
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
    """One `loss` call of a forward-process algorithm (`ForwardProcessAlgorithm`): p
    groups of G trajectories, each one's final clean latent noised to one timestep, with
    the predictions that take no gradient already made; cut and joined like `ReplayCall`."""

    algorithm: ForwardProcessAlgorithm
    noisy: torch.Tensor  # (p, G, C, h, w) x_t
    timesteps: torch.Tensor  # (p, G)
    embeds: torch.Tensor  # (p, G, L, D)
    inputs: ForwardLossInputs  # everything but `prediction`
    weight: float = 1.0
    """As `ReplayCall.weight`."""

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


def slices_of(count: int, most: int | None) -> list[slice]:
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
        step_parts = slices_of(call.steps, steps_per_backward)
        group_parts = slices_of(call.groups, micro_batch)
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
    forward_context: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext(),
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor] | None, bool]]:
    """(loss, metrics, last) for each UNet call of `plan_unet_calls`: the sum of the losses
    of the loss calls it holds, whose backward passes together give the sum of those loss
    calls' gradients; `last` marks the final one. Each UNet call's forward pass with
    gradients runs inside `forward_context(last)`: DDP decides in the forward whether the
    backward pass all-reduces (`Accelerator.no_sync`).

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
        with forward_context(position == len(plan) - 1):
            flat = calls[segments[0][0]].run(sampler, *joined)
        sizes = [part[0].shape[0] for part in inputs]
        total, metrics = None, None
        for (index, groups, steps), outputs in zip(segments, zip(*(o.split(sizes) for o in flat))):
            call = calls[index]
            outputs = call.unflatten(outputs, len(range(call.groups)[groups]), len(range(call.steps)[steps]))
            if index in constants:
                outputs = call.place(constants[index], outputs, groups, steps)
            loss, call_metrics = call.loss(outputs)
            loss = loss * call.weight
            total = loss if total is None else total + loss
            if pieces_of[index][0] == (index, groups, steps):
                metrics = metrics or {}
                for name, value in call_metrics.items():
                    metrics[name] = metrics.get(name, 0.0) + value * call.weight
        yield total, metrics, position == len(plan) - 1


def minibatch_losses(
    algorithm: ReplayAlgorithm,
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
    algorithm: ForwardProcessAlgorithm,
    sampler: TrajectorySampler,
    traj: Trajectory,
    groups: torch.Tensor,
    steps: torch.Tensor,
    advantages: torch.Tensor,
    old_policy: dict[str, torch.Tensor] | None,
    noise: torch.Tensor,
    weight: float = 1.0,
) -> ForwardCall:
    """The loss call of a forward-process algorithm (`ForwardProcessAlgorithm`) on one
    minibatch: the final clean latent x0 of each trajectory of the groups `groups` (p,)
    noised to the timestep of its step `steps` (p, G, 1) with the fresh `noise` (p, G, C,
    h, w) (`TrajectorySampler.forward_process`), and the predictions there without
    guidance (training never uses CFG) under the `old_policy` weights (None: no old
    prediction, for an algorithm that keeps no old policy) and, when asked, the frozen base
    model, made now without gradients; the current weights' prediction, with
    them, is the call's to make. advantages: (p, G, 1), aligned with `steps`; `weight`:
    `ForwardCall.weight`."""
    if steps.shape[2] != 1:
        raise ValueError(f"a forward-process loss call takes one step per trajectory, got {steps.shape[2]}")
    policy = sampler.policy
    device = traj.latents.device
    groups, steps = groups.to(device), steps[:, :, 0].to(device)  # (p,), (p, G)
    x0 = traj.final_latents[groups]  # (p, G, C, h, w)
    noisy, timesteps, target, x0_scale = sampler.forward_process(x0, noise.to(device), steps)
    embeds = traj.prompt_embeds[groups][:, None].expand(-1, traj.group_size, -1, -1)  # (p, G, L, D)
    call = ForwardCall(algorithm, noisy, timesteps, embeds, ForwardLossInputs(
        prediction=None, old_prediction=None, target=target, x0_scale=x0_scale, advantages=advantages[:, :, 0],
    ), weight)
    everything = (slice(None), slice(None))
    with torch.no_grad():
        if old_policy is not None:
            with policy.trainable_weights(old_policy):
                call.inputs.old_prediction = _outputs(call, sampler, *everything)[0]
        if algorithm.needs.reference_prediction:
            with policy.reference():
                call.inputs.ref_prediction = _outputs(call, sampler, *everything)[0]
    return call


def fitting_micro_batch(grown_bytes: int, groups: int, free_bytes: int, most: int) -> int:
    """Groups per UNet call (`TrainLoop.micro_batch` unset, on CUDA): the most whose memory
    fits in 90% of `free_bytes`, from `grown_bytes` of peak growth measured for a call of
    `groups` (memory taken as linear in groups); at least 1, at most `most` (an update's
    groups, beyond which nothing is left to join)."""
    per_group = max(grown_bytes, 1) / groups
    return max(1, min(most, int(0.9 * free_bytes / per_group)))
