"""SDPO on a hand-made example: 2 pairs, 4 steps, x̂0 latents in 2-D with rational cosines.

The x̂0 of each step is a 2-vector (C = 2, h = w = 1). Two patterns, up to scale:
  A: (2, 0), (0, 1), (3, 4), (4, 3)
     sim_first = [1, 0, 0.6, 0.8], sim_last = [0.8, 0.6, 0.96, 1], sum = [1.8, 0.6, 1.56, 1.8]
     -> anchor 1, sim_anchor = cos(., (0, 1)) = [0, 1, 0.8, 0.6]
  B: (1, 0), (4, 3), (0, 1), (3, 4)
     sim_first = [1, 0.8, 0, 0.6], sim_last = [0.6, 0.96, 0.8, 1], sum = [1.6, 1.76, 0.8, 1.6]
     -> anchor 2, sim_anchor = [0, 0.6, 1, 0.8]
Pair 0 = (A, B), pair 1 = (B, A).
"""

import math
import statistics

import pytest
import torch

from zoo.algorithm import LossInputs
from zoo.sdpo import SDPOConfig, anchor_similarities, config_for_reward, discounted_returns
from zoo.trajectory import Trajectory

PATTERN_A = [(2.0, 0.0), (0.0, 1.0), (3.0, 4.0), (4.0, 3.0)]
PATTERN_B = [(1.0, 0.0), (4.0, 3.0), (0.0, 1.0), (3.0, 4.0)]
# (P, G, 3) scores of the first, anchor and last x̂0
SCORES = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 4.0, 0.0]], [[0.0, 1.0, 1.0], [3.0, 1.0, 2.0]]])
# Dense rewards: exact scores at first, anchor, last; the one remaining step interpolated.
#   pair 0, A, t=2: (1·0.6 + 2·0.8 + 3·0.96) / (0.6 + 0.8 + 0.96) = 5.08 / 2.36
#   pair 0, B, t=1: (2·0.8 + 4·0.6 + 0·0.96) / (0.8 + 0.6 + 0.96) = 4 / 2.36
#   pair 1, B, t=1: (0·0.8 + 1·0.6 + 1·0.96) / 2.36 = 1.56 / 2.36
#   pair 1, A, t=2: (3·0.6 + 1·0.8 + 2·0.96) / 2.36 = 4.52 / 2.36
DENSE = [
    [[1.0, 2.0, 5.08 / 2.36, 3.0], [2.0, 4.0 / 2.36, 4.0, 0.0]],
    [[0.0, 1.56 / 2.36, 1.0, 1.0], [3.0, 1.0, 4.52 / 2.36, 2.0]],
]


def hand_made_trajectory() -> Trajectory:
    pred_x0 = torch.tensor([[PATTERN_A, PATTERN_B], [PATTERN_B, PATTERN_A]])  # (2, 2, 4, 2)
    pred_x0 = pred_x0[..., None, None]  # (P, G, K, C, h, w) = (2, 2, 4, 2, 1, 1)
    num_prompts, group_size, num_steps = pred_x0.shape[:3]
    latents = torch.zeros(num_prompts, group_size, num_steps, 2, 1, 1)
    return Trajectory(
        prompts=["cat", "dog"],
        prompt_embeds=torch.zeros(num_prompts, 1, 1),
        timesteps=torch.tensor([999, 749, 499, 249]).expand(num_prompts, group_size, num_steps),
        latents=latents,
        next_latents=latents,
        log_probs=torch.zeros(num_prompts, group_size, num_steps),
        images=torch.zeros(num_prompts, group_size, 3, 1, 1),
        pred_x0=pred_x0,
    )


def returns_to_go(rewards: list[float], discount: float) -> list[float]:
    out = list(rewards)
    for t in (2, 1, 0):
        out[t] = rewards[t] + discount * out[t + 1]
    return out


def test_anchor_choice_and_similarities():
    anchor, sim_first, sim_anchor, sim_last = anchor_similarities(hand_made_trajectory().pred_x0)
    assert anchor.tolist() == [[1, 2], [2, 1]]
    a_first, a_anchor, a_last = [1, 0, 0.6, 0.8], [0, 1, 0.8, 0.6], [0.8, 0.6, 0.96, 1]
    b_first, b_anchor, b_last = [1, 0.8, 0, 0.6], [0, 0.6, 1, 0.8], [0.6, 0.96, 0.8, 1]
    torch.testing.assert_close(sim_first, torch.tensor([[a_first, b_first], [b_first, a_first]]))
    torch.testing.assert_close(sim_anchor, torch.tensor([[a_anchor, b_anchor], [b_anchor, a_anchor]]))
    torch.testing.assert_close(sim_last, torch.tensor([[a_last, b_last], [b_last, a_last]]))


def test_reward_steps_are_first_anchor_last():
    steps = SDPOConfig().build().reward_steps(hand_made_trajectory())
    assert steps.tolist() == [[[0, 1, 3], [0, 2, 3]], [[0, 2, 3], [0, 1, 3]]]


def test_dense_interpolation_with_exact_values_at_first_anchor_last():
    """γ = 0 leaves the dense rewards themselves (module docstring and DENSE)."""
    algo = SDPOConfig(discount=0.0).build()
    dense = algo.shape_rewards(hand_made_trajectory(), SCORES)
    torch.testing.assert_close(dense, torch.tensor(DENSE))


def test_discounted_return_to_go():
    """γ = 0.5: G_3 = r_3, G_t = r_t + 0.5 G_{t+1}; e.g. pair 0, A:
    G = [1 + 0.5(2 + 0.5(5.08/2.36 + 1.5)), 2 + 0.5(5.08/2.36 + 1.5), 5.08/2.36 + 1.5, 3]."""
    algo = SDPOConfig(discount=0.5).build()
    returns = algo.shape_rewards(hand_made_trajectory(), SCORES)
    expected = [[returns_to_go(member, 0.5) for member in pair] for pair in DENSE]
    torch.testing.assert_close(returns, torch.tensor(expected))
    torch.testing.assert_close(
        discounted_returns(torch.tensor([1.0, 2.0, 4.0]), 0.5), torch.tensor([1 + 0.5 * 4.0, 4.0, 4.0])
    )


def test_per_step_normalisation_fallback_over_the_whole_batch():
    """Fresh tracker (32/16): every (prompt, step) holds 2 < 16 returns, so step t uses the
    population mean and std of its 4 returns (both members of both pairs)."""
    algo = SDPOConfig(discount=0.5).build()
    returns = algo.shape_rewards(hand_made_trajectory(), SCORES)
    advantages = algo.advantages(["cat", "dog"], returns, algo.new_tracker())
    expected = torch.empty(2, 2, 4)
    for t in range(4):
        column = returns[..., t].flatten().tolist()
        mean, std = statistics.fmean(column), statistics.pstdev(column)
        expected[..., t] = (returns[..., t] - mean) / (std + 1e-6)
    torch.testing.assert_close(advantages, expected)


def test_per_step_normalisation_with_own_statistics():
    """buffer 2, min_count 2: each (prompt, step) holds exactly its pair's two returns, so
    mean (G_0 + G_1)/2 and std |G_0 - G_1|/2 =: d, so A = ±(G_0 - G_1)/2 / (d + 1e-6): the
    better member just under +1, the other just above -1."""
    algo = SDPOConfig(discount=0.5, tracker_buffer_size=2, tracker_min_count=2).build()
    returns = algo.shape_rewards(hand_made_trajectory(), SCORES)
    advantages = algo.advantages(["cat", "dog"], returns, algo.new_tracker())
    half_gap = (returns[:, 0] - returns[:, 1]) / 2  # (P, K)
    first = half_gap / (half_gap.abs() + 1e-6)
    torch.testing.assert_close(advantages, torch.stack([first, -first], dim=1))


def pair_step(log_ratios, advantages, step_index, old=-1.0) -> LossInputs:
    """log_ratios, advantages: (p, 2) at one step each; step_index: (p,) k of that step."""
    log_ratio = torch.tensor(log_ratios)[:, :, None]
    old_log_probs = torch.full_like(log_ratio, old)
    return LossInputs(
        log_probs=(old_log_probs + log_ratio).requires_grad_(),
        old_log_probs=old_log_probs,
        advantages=torch.tensor(advantages)[:, :, None],
        step_index=torch.tensor(step_index)[:, None, None].expand(-1, 2, 1),
    )


@pytest.mark.parametrize("clip_range", [0.0, 1.0])
def test_zero_when_weighted_log_ratio_difference_equals_advantage_difference(clip_range):
    """λ = 0.5, η = 2, k = 2: w = 0.25 / 2 = 0.125. Δρ = 0.5 - (-0.3) = 0.8, w Δρ = 0.1;
    ΔA = 0.3 - 0.2 = 0.1: both terms vanish with no clipping (clip_range 0) or a clip range
    that contains the log-ratios (1.0). With the default 1e-4 the clipped term
    (0.125 · 2e-4 - 0.1)^2 would win the max: the loss is zero only inside the trust region."""
    algo = SDPOConfig(step_weight_decay=0.5, log_scale=2.0, clip_range=clip_range).build()
    inputs = pair_step([[0.5, -0.3]], [[0.3, 0.2]], [2])
    loss, _ = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-12, rtol=0)
    torch.testing.assert_close(inputs.log_probs.grad, torch.zeros(1, 2, 1), atol=1e-7, rtol=0)


def test_clipped_squared_loss_by_hand():
    """λ = 0.5, η = 1, k = 1 -> w = 0.5; clip_range 0.1, adv_clip_max 5.
    Both pairs: log-ratios (0.3, -0.2): w Δρ = 0.5 · 0.5 = 0.25; clamped (0.1, -0.1): w Δρ_c = 0.1.
    pair 0: A = (7 -> 5, 4.5), ΔA = 0.5: unclipped 0.0625, clipped 0.16 -> 0.16 (constant in logp).
    pair 1: A = (0, 0.25), ΔA = -0.25: unclipped 0.25, clipped 0.1225 -> 0.25.
    loss = (0.16 + 0.25) / 2 = 0.205; pair 1's gradient: 2 · 0.5 · w / 2 = ±0.25.
    clipfrac = 1/2; adv_clipfrac = 1/4 (only the 7)."""
    algo = SDPOConfig(step_weight_decay=0.5, log_scale=1.0, clip_range=0.1, adv_clip_max=5.0).build()
    inputs = pair_step([[0.3, -0.2], [0.3, -0.2]], [[7.0, 4.5], [0.0, 0.25]], [1, 1])
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.205))
    torch.testing.assert_close(inputs.log_probs.grad, torch.tensor([[[0.0], [0.0]], [[0.25], [-0.25]]]))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.5))
    torch.testing.assert_close(metrics["adv_clipfrac"], torch.tensor(0.25))


def test_temporal_weight_follows_step_index():
    """No clipping, ΔA = 0, Δρ = 0.4, λ = 0.5: k = 0 gives (1 · 0.4)^2 = 0.16,
    k = 3 gives (0.125 · 0.4)^2 = 0.0025; their mean is 0.08125."""
    algo = SDPOConfig(step_weight_decay=0.5, clip_range=0.0).build()
    inputs = pair_step([[0.3, -0.1], [0.3, -0.1]], [[0.0, 0.0], [0.0, 0.0]], [0, 3])
    loss, _ = algo.loss(inputs)
    torch.testing.assert_close(loss, torch.tensor((0.16 + 0.0025) / 2))


def test_defaults_and_paper_settings():
    config = SDPOConfig()
    assert (config.clip_range, config.adv_clip_max) == (1e-4, 5.0)
    assert (config.step_weight_decay, config.log_scale, config.discount) == (0.99, 1.0, 0.99)
    assert (config.tracker_buffer_size, config.tracker_min_count) == (32, 16)
    assert (config.guidance_scale, config.num_steps, config.eta) == (1.0, 50, 1.0)
    assert config.loss_calls_per_update == 8 and config.steps_in_outer_loop
    pickscore = config_for_reward("pickscore")
    assert (pickscore.learning_rate, pickscore.train_batch_size, pickscore.gradient_accumulation_steps) == (6e-5, 1, 16)
    needs = config.build().needs
    assert needs.shared_noise and needs.record_pred_x0 and needs.group_size == 2
    with pytest.raises(ValueError, match="aesthetic"):
        config_for_reward("clip")


def test_impossible_values_name_the_field():
    with pytest.raises(ValueError, match="step_weight_decay"):
        SDPOConfig(step_weight_decay=0.0)
    with pytest.raises(ValueError, match="discount"):
        SDPOConfig(discount=1.5)


def test_anchor_score_overwrites_the_first_steps_when_the_anchor_is_the_first_step():
    """x̂0 = (1, 0), (1, 1), (0, 1): sim_first + sim_last = [1 + 0, 2/√2, 0 + 1] = [1, 1.41, 1],
    so the anchor is step 0 (the first of the tied minima), and sim_anchor = sim_first. The
    reference writes the exact scores at the first and last steps and then R_anchor at the
    anchor, so r_0 = R_anchor (5), not R_first (1); r_2 = R_last (3); r_1 weighs the three
    scores by equal similarities 1/√2: (1 + 5 + 3) / 3 = 3. γ = 0."""
    pred_x0 = torch.tensor([[[(1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]]])[..., None, None]  # (1, 1, 3, 2, 1, 1)
    latents = torch.zeros(1, 1, 3, 2, 1, 1)
    traj = Trajectory(
        prompts=["cat"], prompt_embeds=torch.zeros(1, 1, 1), timesteps=torch.tensor([999, 666, 333]).expand(1, 1, 3),
        latents=latents, next_latents=latents, log_probs=torch.zeros(1, 1, 3), images=torch.zeros(1, 1, 3, 1, 1),
        pred_x0=pred_x0,
    )
    algo = SDPOConfig(discount=0.0).build()
    assert algo.reward_steps(traj).tolist() == [[[0, 0, 2]]]
    dense = algo.shape_rewards(traj, torch.tensor([[[1.0, 5.0, 3.0]]]))
    torch.testing.assert_close(dense, torch.tensor([[[5.0, 3.0, 3.0]]]))


def test_metrics_inside_the_trust_region_and_negative_advantage_clamp():
    """clip_range 0.5 contains the log-ratios (0.3, -0.2), so the clipped term equals the
    unclipped one: clipfrac 0 (ties do not count as clipped). approx_kl = 0.5 · mean(0.3²,
    0.2²) = 0.0325. A = (-7, 1) is clamped to (-5, 1): ΔA = -6, adv_clipfrac 1/2; λ = 1 so
    w = 1, Δρ = 0.5: loss (0.5 + 6)² = 42.25."""
    algo = SDPOConfig(step_weight_decay=1.0, clip_range=0.5, adv_clip_max=5.0).build()
    loss, metrics = algo.loss(pair_step([[0.3, -0.2]], [[-7.0, 1.0]], [2]))
    torch.testing.assert_close(loss, torch.tensor(42.25))
    torch.testing.assert_close(metrics["clipfrac"], torch.tensor(0.0))
    torch.testing.assert_close(metrics["approx_kl"], torch.tensor(0.0325))
    torch.testing.assert_close(metrics["adv_clipfrac"], torch.tensor(0.5))
