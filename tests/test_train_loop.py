"""The training loop's speed switches change nothing but speed: chunked backward passes of
whole-trajectory losses give the one-pass gradient, and an epoch's trajectories and scores
do not depend on the sampling-call size or on rewards being overlapped with sampling."""

import math

import pytest
import torch

from benchmarks.loop import TrainLoop
from benchmarks.loss_calls import gather_transitions, minibatch_losses
from benchmarks.rollout import sample_and_score
from zoo.ddpo import DDPOConfig
from zoo.rebel import REBELConfig
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

from helpers.policies import policy_with_random_adapter
from helpers.rewards import Brightness


def _gradient(policy, algorithm, sampler, transitions, advantages, steps_per_backward) -> tuple[torch.Tensor, list]:
    for param in policy.trainable_parameters():
        param.grad = None
    losses = []
    for loss, metrics, last in minibatch_losses(algorithm, sampler, transitions, advantages, steps_per_backward):
        loss.backward()
        losses.append((float(loss.detach()), metrics, last))
    return torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]), losses


def test_chunked_whole_trajectory_loss_gives_the_one_pass_gradient(tiny_pipeline_dir):
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    config = REBELConfig(sampler="ddim", num_steps=4, guidance_scale=2.0)
    algorithm = config.build()
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 4, 1.0, 2.0))
    traj = sampler.sample(["a cat", "a dog", "a fox"], group_size=2, generator=torch.Generator().manual_seed(1))
    transitions = gather_transitions(traj, torch.arange(3), torch.arange(4).expand(3, 2, 4))
    # Off-policy old log-probs, so the loss is far from zero and every step matters.
    transitions.old_log_probs = transitions.old_log_probs + torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(2))
    advantages = torch.tensor([1.0, -1.0, 0.5])[:, None, None] * torch.tensor([1.0, -1.0])[None, :, None]
    advantages = advantages.expand(3, 2, 4).clone()

    whole, whole_losses = _gradient(policy, algorithm, sampler, transitions, advantages, steps_per_backward=4)
    assert len(whole_losses) == 1 and whole_losses[0][2]
    assert whole.abs().max() > 0
    for steps in (1, 3):  # even and uneven chunks
        chunked, losses = _gradient(policy, algorithm, sampler, transitions, advantages, steps_per_backward=steps)
        assert len(losses) == math.ceil(4 / steps)
        assert [last for *_, last in losses] == [False] * (len(losses) - 1) + [True]
        assert losses[0][1] is not None and all(metrics is None for _, metrics, _ in losses[1:])
        # Every chunk's loss is the whole loss in value.
        for value, _, _ in losses:
            assert value == pytest.approx(whole_losses[0][0], rel=1e-5)
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-7)
    # The first chunk alone carries only its share of the gradient: the test can tell.
    for param in policy.trainable_parameters():
        param.grad = None
    first_loss, _, _ = next(minibatch_losses(algorithm, sampler, transitions, advantages, steps_per_backward=1))
    first_loss.backward()
    first_only = torch.cat([p.grad.flatten() for p in policy.trainable_parameters()])
    assert not torch.allclose(first_only, whole, rtol=1e-2)


def test_per_step_losses_are_never_chunked(tiny_pipeline_dir):
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    algorithm = DDPOConfig(num_steps=4).build()
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 4, 1.0, 2.0))
    traj = sampler.sample(["a cat", "a dog"], generator=torch.Generator().manual_seed(1))
    transitions = gather_transitions(traj, torch.arange(2), torch.arange(4).expand(2, 1, 4))
    losses = list(minibatch_losses(algorithm, sampler, transitions, torch.ones(2, 1, 4), steps_per_backward=1))
    assert len(losses) == 1


@pytest.mark.parametrize("algo", ["rebel", "sdpo"])
def test_epoch_does_not_depend_on_call_size_or_overlap(tiny_pipeline_dir, algo):
    from zoo.registry import ALGORITHMS

    policy = policy_with_random_adapter(tiny_pipeline_dir)
    algorithm = ALGORITHMS[algo](num_steps=3).build()
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 3, 1.0, 2.0))
    prompts = ["a cat", "a dog", "a fox", "a cow", "a pig", "an owl"]

    def epoch(loop: TrainLoop):
        reward = Brightness()
        traj, scores, failure = sample_and_score(
            algorithm, sampler, prompts, torch.Generator().manual_seed(5), reward, loop
        )
        assert failure is None
        return traj, scores, reward

    one_call, one_scores, one_reward = epoch(TrainLoop(sample_batch_size=None, overlap_rewards=False))
    split, split_scores, split_reward = epoch(TrainLoop(sample_batch_size=4, overlap_rewards=True))
    assert one_reward.calls == 1 and split_reward.calls == 3  # 6 pairs in calls of 2 pairs
    assert all(name.startswith("reward-") for name in split_reward.threads)
    assert one_reward.images_scored == split_reward.images_scored
    assert split.prompts == one_call.prompts
    for name in ("latents", "next_latents", "log_probs") + (("images",) if algorithm.needs.final_images else ()):
        # Batch size changes float rounding, which 3 steps amplify; a noise mix-up is O(1).
        torch.testing.assert_close(getattr(split, name), getattr(one_call, name), rtol=1e-3, atol=1e-4)
    assert split_scores.shape == one_scores.shape
    # SDPO scores x̂0 at an anchor step chosen by an argmax, which rounding can flip
    # between near-equal steps: compare the scores of the steps both chose.
    same = torch.ones_like(one_scores, dtype=torch.bool)
    if one_scores.dim() == 3:
        same = algorithm.reward_steps(split) == algorithm.reward_steps(one_call)
        assert same.float().mean() > 0.8
    torch.testing.assert_close(split_scores[same], one_scores[same], rtol=1e-3, atol=1e-4)


def test_a_failing_call_fails_the_epoch_with_the_reason(tiny_pipeline_dir):
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    algorithm = DDPOConfig(num_steps=2).build()
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 2, 1.0, 2.0))
    for overlap in (False, True):
        reward = Brightness(fail_on_call=2)
        traj, scores, failure = sample_and_score(
            algorithm, sampler, ["a cat"] * 6, torch.Generator().manual_seed(0), reward,
            TrainLoop(sample_batch_size=2, overlap_rewards=overlap),
        )
        assert scores is None and traj.num_prompts == 6
        assert failure == "raised RuntimeError: reward server went away"
