"""`TrainLoop.micro_batch` is a performance switch: how many groups go through the UNet in
one call decides nothing but rounding. One epoch of every algorithm with one group per UNet
call, with the whole minibatch, and with every loss call of an update joined, leaves the
same LoRA; the plan of UNet calls is pinned on worked cases, and each UNet call it plans
is the one the epoch makes."""

from dataclasses import fields, replace

import pytest
import torch
from accelerate import Accelerator

from benchmarks.epochs import reward_backprop_epoch, train_on_batch
from benchmarks.loop import TrainLoop
from benchmarks.loss_calls import fitting_micro_batch, plan_unet_calls
from zoo.algorithm import EpochContext, ForwardProcessAlgorithm, RewardBackpropAlgorithm
from zoo.registry import ALGORITHMS
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

from helpers.policies import policy_with_random_adapter
from helpers.rewards import DistanceToTarget

K = 4
TRAJECTORIES = 8


class _Call:
    """What `plan_unet_calls` reads of a loss call."""

    def __init__(self, groups: int, steps: int = 1):
        self.groups, self.steps = groups, steps


ALL = slice(None)


def test_the_plan_joins_the_calls_of_an_update_and_cuts_the_big_ones():
    """Three per-step calls of 2 groups: none -> one UNet call each; 4 -> two calls joined,
    then the third alone (2 + 2 fits 4, 4 + 2 does not); 1 -> each call in two pieces of
    one group. A 5-group call at micro-batch 2: pieces of 2, 2 and 1 groups."""
    calls = [_Call(2), _Call(2), _Call(2)]
    assert plan_unet_calls(calls, None, None) == [[(0, ALL, ALL)], [(1, ALL, ALL)], [(2, ALL, ALL)]]
    assert plan_unet_calls(calls, 4, None) == [[(0, ALL, ALL), (1, ALL, ALL)], [(2, ALL, ALL)]]
    assert plan_unet_calls(calls, 6, None) == [[(0, ALL, ALL), (1, ALL, ALL), (2, ALL, ALL)]]
    assert plan_unet_calls(calls, 1, None) == [
        [(i, slice(g, g + 1), ALL)] for i in range(3) for g in range(2)
    ]
    assert [segments[0][1] for segments in plan_unet_calls([_Call(5)], 2, None)] == [
        slice(0, 2), slice(2, 4), slice(4, 6)
    ]


def test_the_plan_cuts_whole_trajectory_calls_by_steps_and_groups_and_joins_only_uncut_calls():
    """A whole-trajectory call of 2 groups over 5 steps, at most 2 steps per backward:
    chunks of steps 0-1, 2-3 and 4, for each piece of groups; the next two calls (1 group
    over 2 steps, uncut) are joined at micro-batch 4, and not into the cut call's chunks."""
    calls = [_Call(2, 5), _Call(1, 2), _Call(1, 2)]
    assert plan_unet_calls(calls, None, 2) == [
        [(0, ALL, slice(0, 2))], [(0, ALL, slice(2, 4))], [(0, ALL, slice(4, 6))], [(1, ALL, ALL)], [(2, ALL, ALL)]
    ]
    assert plan_unet_calls(calls, 4, 2)[3:] == [[(1, ALL, ALL), (2, ALL, ALL)]]
    plan = plan_unet_calls(calls, 1, 2)
    assert plan[:3] == [[(0, slice(0, 1), slice(0, 2))], [(0, slice(0, 1), slice(2, 4))],
                        [(0, slice(0, 1), slice(4, 6))]]
    assert len(plan) == 2 * 3 + 2


def test_an_unset_micro_batch_on_cuda_takes_the_most_groups_that_fit():
    """A UNet call of 2 groups grew the memory by 3 GiB (1.5 GiB a group); 40 GiB free:
    90% of it holds 24 groups. Capped by an update's 16 groups; at least 1 when even one
    group does not fit."""
    gib = 2**30
    assert fitting_micro_batch(3 * gib, 2, 40 * gib, 64) == 24
    assert fitting_micro_batch(3 * gib, 2, 40 * gib, 16) == 16
    assert fitting_micro_batch(3 * gib, 2, 1 * gib, 16) == 1


def _config(name: str):
    """`name`'s config at K = 4 (DDIM, eta 1, guidance 2): minibatches of 2 groups, two
    minibatches per update, groups of 2 where the group size is a field."""
    config = ALGORITHMS[name]()
    group_field = {"group_size": 2} if "group_size" in {f.name for f in fields(config)} else {}
    eta = 0.0 if not config.reads_log_probs else 1.0
    return replace(config, sampler="ddim", num_steps=K, eta=eta, guidance_scale=2.0, train_batch_size=2,
                   gradient_accumulation_steps=2, **group_field)


def _epoch_lora(
    tiny_pipeline_dir, name: str, micro_batch: int | None, lr: float = 1.0
) -> tuple[torch.Tensor, dict, int]:
    """How far one epoch of `name` on 8 trajectories moves the LoRA from the same start
    with the same draws (plain SGD at `lr`, so the weights move by the gradients
    themselves), its counts, and the UNet calls with gradients it made."""
    config = _config(name)
    algorithm = config.build()
    torch.manual_seed(0)
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", K, config.eta, config.guidance_scale, "trailing"))
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=lr)
    start = torch.cat([p.detach().flatten() for p in policy.trainable_parameters()])
    accelerator = Accelerator(cpu=True)
    policy.denoiser, optimizer = accelerator.prepare(policy.unet, optimizer)
    generator = torch.Generator().manual_seed(1)
    grad_calls = []
    hook = policy.unet.register_forward_hook(lambda *args: grad_calls.append(1) if torch.is_grad_enabled() else None)
    try:
        if isinstance(algorithm, RewardBackpropAlgorithm):
            reward = DistanceToTarget(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
            prompts = [f"prompt {i}" for i in range(TRAJECTORIES)]
            _, counts, failure = reward_backprop_epoch(algorithm, config, sampler, prompts, generator, reward,
                                                       optimizer, accelerator, False, micro_batch)
            assert failure is None
        else:
            needs = algorithm.needs
            traj = sampler.sample([f"prompt {i}" for i in range(TRAJECTORIES // needs.group_size)],
                                  group_size=needs.group_size, shared_noise=needs.shared_noise, generator=generator,
                                  record_pred_x0=needs.record_pred_x0,
                                  reference_log_probs=needs.reference_log_probs)
            advantages = torch.randn(traj.log_probs.shape, generator=generator)
            if isinstance(algorithm, ForwardProcessAlgorithm):  # NFT's advantages are optimality probabilities
                advantages = advantages.sigmoid()
            _, counts = train_on_batch(algorithm, config, sampler, traj, advantages, optimizer, accelerator,
                                     EpochContext(0, 1, generator),
                                     TrainLoop(micro_batch=micro_batch, steps_per_backward=2), False)
    finally:
        hook.remove()
    return torch.cat([p.detach().flatten() for p in policy.trainable_parameters()]) - start, counts, len(grad_calls)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_one_group_per_unet_call_and_every_call_joined_train_the_same_lora(tiny_pipeline_dir, name):
    """Micro-batch 1 (each minibatch of 2 groups cut in two, after a pass without
    gradients) and 8 (an update's loss calls joined: two minibatches of 2 groups) move the
    LoRA as one UNet call per loss call does, to float32 rounding, with the same optimizer
    steps. The learning rate is set so that the largest move is 1e-3, far above the
    weights' rounding (~1e-8), so a gradient off by any factor shows."""
    probe, _, _ = _epoch_lora(tiny_pipeline_dir, name, None)
    assert probe.abs().max() > 0
    lr = 1e-3 / probe.abs().max().item()
    plain, plain_counts, plain_calls = _epoch_lora(tiny_pipeline_dir, name, None, lr)
    for micro_batch in (1, 8):
        moved, counts, calls = _epoch_lora(tiny_pipeline_dir, name, micro_batch, lr)
        assert counts["optimizer_updates"] == plain_counts["optimizer_updates"]
        # Cut: more UNet calls with gradients; joined: fewer. Never joined: DRaFT's
        # minibatch (its sampling call) and REBEL's calls, cut here by steps (2 of 4 per
        # backward pass).
        if micro_batch == 1:
            assert calls > plain_calls
        elif name not in ("draft", "rebel"):
            assert calls < plain_calls
        torch.testing.assert_close(moved, plain, rtol=1e-3, atol=1e-3 * plain.abs().max().item())
