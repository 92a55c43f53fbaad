"""DDPO's PPO-clip loss and per-prompt advantages, by hand."""

import math

import pytest
import torch

from zoo.algorithm import LossInputs
from zoo.ddpo import DDPOConfig

from helpers.training import one_transition


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, expected_grad",
    [
        # ratio 1.5 > 1 + 0.2 with A = 2 > 0: max(-3, -2.4) = -2.4, the clipped (constant) branch.
        (1.5, 2.0, -2.4, 0.0),
        # ratio 0.5 < 1 - 0.2 with A = -2 < 0: max(1, 1.6) = 1.6, clipped, no gradient.
        (0.5, -2.0, 1.6, 0.0),
        # inside: ratio 1.1, A = 2: both -2.2; d/dlogp (-A * ratio) = -2.2.
        (1.1, 2.0, -2.2, -2.2),
        # pessimistic bound keeps the unclipped term where it is worse: ratio 1.5, A = -2:
        # max(3, 2.4) = 3, gradient -A * ratio = 3.
        (1.5, -2.0, 3.0, 3.0),
        # ratio 0.5, A = 2: max(-1, -1.6) = -1, gradient -1.
        (0.5, 2.0, -1.0, -1.0),
        # advantage 10 is clamped to adv_clip_max 5 at ratio 1: loss -5, gradient -5.
        (1.0, 10.0, -5.0, -5.0),
        # and -10 to -5: loss 5, gradient 5.
        (1.0, -10.0, 5.0, 5.0),
    ],
)
def test_clip_branches(ratio, advantage, expected_loss, expected_grad):
    """loss = max(-A_c * r, -A_c * clamp(r, 0.8, 1.2)) with clip_range 0.2, A_c = clamp(A, ±5)."""
    algo = DDPOConfig(clip_range=0.2, adv_clip_max=5.0).build()
    inputs = one_transition(math.log(ratio), advantage)
    loss, _ = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(expected_loss))
    torch.testing.assert_close(inputs.log_probs.grad, torch.tensor([[[expected_grad]]]))


def test_metrics():
    """Log-ratios [log 1.5, log 0.5, log 1.1, 0] with clip_range 0.2:
    clipfrac = |r - 1| > 0.2 for 1.5 and 0.5 only -> 0.5;
    approx_kl = 0.5 * mean(log(1.5)^2, log(0.5)^2, log(1.1)^2, 0)."""
    algo = DDPOConfig(clip_range=0.2).build()
    log_ratio = torch.log(torch.tensor([1.5, 0.5, 1.1, 1.0])).view(4, 1, 1)
    inputs = LossInputs(
        log_probs=log_ratio - 1.0,
        old_log_probs=torch.full((4, 1, 1), -1.0),
        advantages=torch.ones(4, 1, 1),
        step_index=torch.zeros(4, 1, 1, dtype=torch.long),
    )
    _, metrics = algo.loss(inputs)
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.5))
    expected_kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 4
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(expected_kl))


def test_advantages_per_prompt_broadcast_over_steps():
    """Fresh tracker (16/16): every prompt falls back to the batch [1, 2, 3]: mean 2,
    std sqrt(2/3); A = [-1, 0, 1] / (sqrt(2/3) + 1e-6), the same at each of the K steps."""
    algo = DDPOConfig(num_steps=5).build()
    advantages = algo.advantages(["a", "b", "a"], torch.tensor([[1.0], [2.0], [3.0]]), algo.new_tracker())
    expected = torch.tensor([-1.0, 0.0, 1.0]) / (math.sqrt(2 / 3) + 1e-6)
    assert advantages.shape == (3, 1, 5)
    torch.testing.assert_close(advantages, expected.view(3, 1, 1).expand(3, 1, 5))


def test_defaults_are_the_references():
    config = DDPOConfig()
    assert (config.learning_rate, config.clip_range, config.adv_clip_max) == (3e-4, 1e-4, 5.0)
    assert config.max_grad_norm == 1.0
    assert (config.tracker_buffer_size, config.tracker_min_count, config.lora_rank) == (16, 16, 4)
    assert config.loss_calls_per_update == config.gradient_accumulation_steps * config.num_steps


def test_impossible_values_name_the_field():
    with pytest.raises(ValueError, match="clip_range"):
        DDPOConfig(clip_range=0.0)
    with pytest.raises(ValueError, match="eta"):
        DDPOConfig(eta=0.0)
