"""REBEL's per-pair regression loss and paired advantages, by hand."""

import math

import pytest
import torch

from zoo.algorithm import LossInputs
from zoo.rebel import REBELConfig


def pair_batch(log_ratios: list[list[list[float]]], advantages: list[list[float]]) -> LossInputs:
    """log_ratios (p, 2, K) of current minus old log-probs; advantages (p, 2) per trajectory."""
    log_ratio = torch.tensor(log_ratios)
    old = torch.full_like(log_ratio, -2.0)
    num_steps = log_ratio.shape[2]
    return LossInputs(
        log_probs=(old + log_ratio).requires_grad_(),
        old_log_probs=old,
        advantages=torch.tensor(advantages)[:, :, None].expand(-1, -1, num_steps),
        step_index=torch.arange(num_steps).expand(log_ratio.shape),
    )


def test_zero_when_scaled_log_ratio_difference_equals_advantage_difference():
    """η = 2. y: log-ratios [0.1, 0.2, 0.3] sum 0.6; y': [-0.1, 0, 0.1] sum 0. Δ / η = 0.3;
    A(y) - A(y') = 0.5 - 0.2 = 0.3, so the residual, the loss and its gradient are 0."""
    algo = REBELConfig(log_scale=2.0, num_steps=3).build()
    inputs = pair_batch([[[0.1, 0.2, 0.3], [-0.1, 0.0, 0.1]]], [[0.5, 0.2]])
    loss, _ = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(inputs.log_probs.grad, torch.zeros(1, 2, 3), atol=1e-6, rtol=0)


def test_sums_over_steps_per_pair_not_over_the_batch():
    """η = 1, two pairs of K = 2 steps.
    pair 0: Δ = (0.4 + 0.2) - 0 = 0.6, ΔA = 0.3 -> (0.3)^2 = 0.09;
    pair 1: Δ = 0.1 - 0 = 0.1, ΔA = -0.4 -> (0.5)^2 = 0.25; loss = mean = 0.17.
    (The reference's batch sum would give both pairs Δ = 0.7: ((0.4)^2 + (1.1)^2) / 2 = 0.685.)
    Gradient of pair 0's y log-probs: 2 · 0.3 / η / p = 0.3 at each step, y': -0.3;
    pair 1: 2 · 0.5 / 2 = 0.5 and -0.5."""
    algo = REBELConfig(log_scale=1.0, num_steps=2).build()
    inputs = pair_batch([[[0.4, 0.2], [0.0, 0.0]], [[0.05, 0.05], [0.0, 0.0]]], [[0.5, 0.2], [-0.2, 0.2]])
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.17))
    expected_grad = torch.tensor([[[0.3, 0.3], [-0.3, -0.3]], [[0.5, 0.5], [-0.5, -0.5]]])
    torch.testing.assert_close(inputs.log_probs.grad, expected_grad)
    torch.testing.assert_close(metrics["log_ratio_diff"], torch.tensor(0.35))


def test_refuses_a_chunk_of_steps():
    """A partial sum over steps would be a different loss; REBEL needs every step at once."""
    algo = REBELConfig(num_steps=3).build()
    with pytest.raises(ValueError, match="whole trajectories"):
        algo.loss(pair_batch([[[0.1, 0.2], [0.0, 0.0]]], [[0.5, 0.2]]))


def test_advantages_from_both_members_in_reference_order():
    """Fresh tracker (32/16), prompts [a, b], rewards y = [1, 2], y' = [3, 6]. All four
    rewards fall back to the batch: mean 3, std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5).
    The deques receive every y before every y': a = [1, 3], b = [2, 6]."""
    algo = REBELConfig(num_steps=3).build()
    tracker = algo.new_tracker()
    advantages = algo.advantages(["a", "b"], torch.tensor([[1.0, 3.0], [2.0, 6.0]]), tracker)
    expected = torch.tensor([[-2.0, 0.0], [-1.0, 3.0]]) / (math.sqrt(3.5) + 1e-6)
    assert advantages.shape == (2, 2, 3)
    torch.testing.assert_close(advantages, expected[:, :, None].expand(2, 2, 3))
    assert tracker.state_dict()["buffers"] == {"a": [1.0, 3.0], "b": [2.0, 6.0]}


def test_defaults_are_the_references():
    config = REBELConfig()
    assert (config.learning_rate, config.max_grad_norm, config.log_scale, config.weight_decay) == (1e-4, None, 1.0, 0.0)
    assert (config.lora_rank, config.lora_alpha, config.num_steps, config.guidance_scale) == (8, 8.0, 8, 8.0)
    assert (config.tracker_buffer_size, config.tracker_min_count, config.sampler) == (32, 16, "lcm")
    assert REBELConfig().build().needs.whole_trajectory_loss


def test_impossible_values_name_the_field():
    with pytest.raises(ValueError, match="log_scale"):
        REBELConfig(log_scale=0.0)
    with pytest.raises(ValueError, match="tracker_min_count"):
        REBELConfig(tracker_buffer_size=8, tracker_min_count=16)


def test_metrics_by_hand():
    """The pairs of `test_sums_over_steps_per_pair_not_over_the_batch`: ΔA = 0.3 and -0.4, so
    advantage_diff = mean |ΔA| = 0.35; log-ratios 0.4, 0.2, 0.05, 0.05 and four zeros:
    approx_kl = 0.5 · (0.16 + 0.04 + 0.0025 + 0.0025) / 8."""
    algo = REBELConfig(log_scale=1.0, num_steps=2).build()
    inputs = pair_batch([[[0.4, 0.2], [0.0, 0.0]], [[0.05, 0.05], [0.0, 0.0]]], [[0.5, 0.2], [-0.2, 0.2]])
    _, metrics = algo.loss(inputs)
    torch.testing.assert_close(metrics["advantage_diff"], torch.tensor(0.35))
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(0.5 * 0.205 / 8))


def test_pairs_are_sampled_from_independent_noise():
    """REBEL's y and y' are two independent samples of the prompt (RLCM samples the batch
    twice); SDPO and D3PO are the ones that share x_T."""
    needs = REBELConfig().build().needs
    assert needs.group_size == 2 and not needs.shared_noise
