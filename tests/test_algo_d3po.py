"""D3PO's preferences and per-step DPO loss, by hand."""

import math

import pytest
import torch

from zoo.algorithm import LossInputs
from zoo.d3po import D3POConfig

LOG_HIGH, LOG_LOW = math.log(1.1), math.log(0.9)  # ε = 0.1


def pair_steps(ref_log_ratios: list[list[float]], preferences: list[list[float]]) -> LossInputs:
    """ref_log_ratios (p, 2) of current minus reference log-probs at one step; preferences (p, 2)."""
    ratio = torch.tensor(ref_log_ratios)[:, :, None]  # (p, 2, 1)
    ref = torch.full_like(ratio, -3.0)
    log_probs = (ref + ratio).requires_grad_()
    return LossInputs(
        log_probs=log_probs,
        old_log_probs=log_probs.detach().clone(),
        advantages=torch.tensor(preferences)[:, :, None],
        step_index=torch.zeros_like(ratio, dtype=torch.long),
        ref_log_probs=ref,
    )


def softplus(x: float) -> float:
    """-logsigmoid(-x) = log(1 + e^x), for the expected values."""
    return math.log1p(math.exp(x))


def test_preferences_from_rewards():
    """Rewards [[1, 2], [3, 3], [5, 4]]: member 1 wins, a tie, member 0 wins."""
    algo = D3POConfig(num_steps=4).build()
    rewards = torch.tensor([[1.0, 2.0], [3.0, 3.0], [5.0, 4.0]])
    preferences = algo.advantages(["a", "b", "c"], rewards, algo.new_tracker())
    expected = torch.tensor([[-1.0, 1.0], [0.0, 0.0], [1.0, -1.0]])
    torch.testing.assert_close(preferences, expected[:, :, None].expand(3, 2, 4))


def test_hand_computed_point():
    """β = 0.1, ε = 0.1. Winner (member 0) log-ratio 0.05, loser -0.02, both inside
    [log 0.9, log 1.1]. logit = 0.1 · (0.05 + 0.02) = 0.007; loss = log(1 + e^-0.007).
    d loss / d logp_w = -β σ(-0.007), d loss / d logp_l = +β σ(-0.007)."""
    algo = D3POConfig(beta=0.1, ratio_clip=0.1).build()
    inputs = pair_steps([[0.05, -0.02]], [[1.0, -1.0]])
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(softplus(-0.007)))
    sigma = 1 / (1 + math.exp(0.007))
    torch.testing.assert_close(inputs.log_probs.grad, torch.tensor([[[-0.1 * sigma], [0.1 * sigma]]]))
    torch.testing.assert_close(metrics["preference_accuracy"], torch.tensor(1.0))


def test_preference_accuracy_counts_unseparated_pairs_as_half():
    """Three decided pairs: one ranked right (logit > 0), one wrong, one with both
    log-ratios clamped to the same bound (logit 0): accuracy (1 + 0 + 0.5) / 3."""
    algo = D3POConfig(beta=0.1, ratio_clip=0.1).build()
    inputs = pair_steps([[0.05, -0.02], [-0.02, 0.05], [0.5, 0.7]], [[1.0, -1.0]] * 3)
    _, metrics = algo.loss(inputs)
    torch.testing.assert_close(metrics["preference_accuracy"], torch.tensor(0.5))


def test_ratios_are_clamped_with_no_gradient_outside():
    """Winner log-ratio 0.5 -> log 1.1, loser -0.5 -> log 0.9: logit = 0.1 · log(1.1 / 0.9);
    both clamped, so the gradient is zero."""
    algo = D3POConfig().build()
    inputs = pair_steps([[0.5, -0.5]], [[1.0, -1.0]])
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(softplus(-0.1 * (LOG_HIGH - LOG_LOW))))
    torch.testing.assert_close(inputs.log_probs.grad, torch.zeros(1, 2, 1))
    torch.testing.assert_close(metrics["ratio_clipfrac"], torch.tensor(1.0))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_at_plus_minus_50_logits(sign):
    """β = 50 / log(1.1 / 0.9) and log-ratios at the clamp edges make the logit ±50:
    loss = log(1 + e^∓50): about 2e-22 for +50, 50 for -50; the raw log-ratios ±50 are
    far outside the clamp and must leave a finite (zero) gradient."""
    beta = 50.0 / (LOG_HIGH - LOG_LOW)
    algo = D3POConfig(beta=beta).build()
    inputs = pair_steps([[sign * 50.0, -sign * 50.0]], [[1.0, -1.0]])
    loss, _ = algo.loss(inputs)
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.tensor(softplus(-sign * 50.0)))
    assert torch.isfinite(inputs.log_probs.grad).all()


def test_logsigmoid_where_log_of_sigmoid_underflows():
    """β = 1000 at the clamp edges, loser favoured: logit = -1000 · log(1.1 / 0.9) ≈ -200.7.
    log(sigmoid(-200.7)) is -inf in float32; the loss must be 200.67."""
    algo = D3POConfig(beta=1000.0).build()
    inputs = pair_steps([[-1.0, 1.0]], [[1.0, -1.0]])
    loss, _ = algo.loss(inputs)
    logit = -1000.0 * (LOG_HIGH - LOG_LOW)
    assert torch.log(torch.sigmoid(torch.tensor(logit))).isinf()
    torch.testing.assert_close(loss, torch.tensor(softplus(-logit)))


def test_ties_are_masked_out():
    """Pair 0 decided as in `test_hand_computed_point`, pair 1 tied: the loss is pair 0's
    term alone, log(1 + e^-0.007), not its mean with a constant log 2. All ties: loss 0."""
    algo = D3POConfig().build()
    inputs = pair_steps([[0.05, -0.02], [0.03, 0.01]], [[1.0, -1.0], [0.0, 0.0]])
    loss, metrics = algo.loss(inputs)
    torch.testing.assert_close(loss, torch.tensor(softplus(-0.007)))
    torch.testing.assert_close(metrics["tie_fraction"], torch.tensor(0.5))

    all_ties = pair_steps([[0.05, -0.02]], [[0.0, 0.0]])
    loss, _ = algo.loss(all_ties)
    loss.backward()
    assert loss.item() == 0.0
    assert (all_ties.log_probs.grad == 0).all()


def test_needs_reference_log_probs():
    algo = D3POConfig().build()
    inputs = pair_steps([[0.0, 0.0]], [[1.0, -1.0]])
    inputs.ref_log_probs = None
    with pytest.raises(ValueError, match="ref_log_probs"):
        algo.loss(inputs)


def test_defaults_are_the_references():
    config = D3POConfig()
    assert (config.beta, config.ratio_clip, config.learning_rate, config.num_steps, config.guidance_scale) == (
        0.1, 0.1, 3e-5, 20, 5.0,
    )
    needs = config.build().needs
    assert needs.shared_noise and needs.reference_log_probs and needs.group_size == 2


def test_impossible_values_name_the_field():
    with pytest.raises(ValueError, match="ratio_clip"):
        D3POConfig(ratio_clip=1.0)
    with pytest.raises(ValueError, match="beta"):
        D3POConfig(beta=0.0)


def test_tie_fraction_and_kl_to_reference_by_hand():
    """Three pairs, the last tied: tie_fraction 1/3. Log-ratios to the reference
    (0.05, -0.02), (0.03, 0.01), (0.2, 0.0): kl_to_reference = 0.5 · mean of their squares
    = 0.5 · (0.0025 + 0.0004 + 0.0009 + 0.0001 + 0.04 + 0) / 6; ratio_clipfrac: only 0.2 is
    outside [log 0.9, log 1.1], 1/6."""
    algo = D3POConfig().build()
    inputs = pair_steps([[0.05, -0.02], [0.03, 0.01], [0.2, 0.0]], [[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0]])
    _, metrics = algo.loss(inputs)
    torch.testing.assert_close(metrics["tie_fraction"], torch.tensor(1 / 3))
    torch.testing.assert_close(metrics["kl_to_reference"], torch.tensor(0.5 * 0.0439 / 6))
    torch.testing.assert_close(metrics["ratio_clipfrac"], torch.tensor(1 / 6))
