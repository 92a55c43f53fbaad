"""AWM by hand: advantages, stratified timesteps, the weighted matching log-probability, the
PPO-clip loss on it with its two KL terms, the rectified-flow view of an ε-prediction model,
the EMA (an old policy that does not sample) and the runner's forward-process path on the tiny
pipeline. Learning on the tiny world is tests/test_learning.py's, with the tiny preset's loop
like every algorithm (measured: 4-step JPEG compressibility -1.1996 -> -1.1530, base spread
0.0241)."""

import math
from collections import Counter

import pytest
import torch
from accelerate import Accelerator

from benchmarks.epochs import train_on_batch
from benchmarks.loop import TrainLoop
from zoo.algorithm import EpochContext, ForwardLossInputs, ForwardProcessAlgorithm
from zoo.awm import AWMConfig, ema_decay, flow_view, matching_log_prob
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

from helpers.policies import policy_with_random_adapter
from helpers.training import ForwardRecorder


def inputs_of(errors, advantages, x0_scale, old=None, ref=None, target=None) -> ForwardLossInputs:
    """One group (p = 1) of len(errors) members, latents of len(errors[0]) elements (h = w = 1):
    prediction = target + error (target 0 unless given), carrying the gradient."""
    shape = (1, len(errors), len(errors[0]), 1, 1)
    target = torch.zeros(shape) if target is None else torch.tensor(target).view(shape)
    prediction = (target + torch.tensor(errors).view(shape)).requires_grad_()
    return ForwardLossInputs(
        prediction=prediction,
        old_prediction=None if old is None else torch.tensor(old).view(shape),
        target=target,
        x0_scale=torch.tensor([x0_scale]),
        advantages=torch.tensor([advantages]),
        ref_prediction=None if ref is None else torch.tensor(ref).view(shape),
    )


def flow(**fields) -> AWMConfig:
    """A config on the flow sampler (the reference's family), without KL terms unless given."""
    return AWMConfig(**{"sampler": "flow", "kl_weight": 0.0, "ema_kl_weight": 0.0, **fields})


# ----------------------------------------------------------------------------------------
# Advantages


def test_advantages_are_the_prompt_normalised_rewards_clipped_and_scaled_by_hand():
    """A = (r - prompt mean) / (batch std + 1e-4), clipped to ±adv_clip_max, times
    advantage_max / adv_clip_max, the same for every step.

    Prompts a, b, a (G = 2), rewards [1, 5], [5, 5], [1, 1]: batch mean 3, population std 2
    (every reward 2 away); prompt a's four rewards have mean 2, b's mean 5. Defaults (clip 5,
    max 1): r = 1 of a gives -1/2.0001/5, r = 5 of a 3/2.0001/5, b's 0. (The batch mean, or
    each group's own, or the prompt's std, gives other numbers.)"""
    algo = AWMConfig(num_steps=3).build()
    returns = torch.tensor([[1.0, 5.0], [5.0, 5.0], [1.0, 1.0]])
    low, high = -1 / 2.0001 / 5, 3 / 2.0001 / 5
    expected = torch.tensor([[low, high], [0.0, 0.0], [low, low]])
    advantages = algo.advantages(["a", "b", "a"], returns, algo.new_tracker())
    assert advantages.shape == (3, 2, 3) and advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, expected[:, :, None].expand(3, 2, 3), rtol=0, atol=1e-7)


def test_advantages_are_clipped_before_scaling():
    """One prompt, rewards [0, 0, 0, 12]: mean 3, population std sqrt((3·9 + 81)/4) =
    sqrt(27). adv_clip_max 1, advantage_max 2: the 12 is 9/(sqrt(27) + 1e-4) = 1.732 > 1,
    clipped to 1, then 2·1/1 = 2; the 0s are -3/(sqrt(27) + 1e-4)·2."""
    algo = AWMConfig(num_steps=1, adv_clip_max=1.0, advantage_max=2.0).build()
    zero = -3 / (math.sqrt(27) + 1e-4) * 2
    advantages = algo.advantages(["a"], torch.tensor([[0.0, 0.0, 0.0, 12.0]]), algo.new_tracker())
    torch.testing.assert_close(advantages[..., 0], torch.tensor([[zero, zero, zero, 2.0]]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------
# Timesteps


def _steps(num_prompts=400, group_size=2, seed=0, **fields) -> torch.Tensor:
    algo = AWMConfig(**fields).build()
    return algo.trained_steps(EpochContext(0, 1, torch.Generator().manual_seed(seed)), num_prompts, group_size)


def test_timesteps_are_one_per_stratum_of_the_first_steps():
    """K = 14, fraction 0.9, 6 timesteps: int(12.6) = 12, boundaries linspace(0, 12, 7) =
    0, 2, ..., 12, so column j is step 2j or 2j + 1, both drawn; steps 12 and 13 never.
    discrete-wo-init: linspace(1, 12, 7) = 1, 2.83, 4.67, 6.5, 8.33, 10.17, 12 truncated to
    1, 2, 4, 6, 8, 10, 12: the first column is always step 1 (its stratum holds only it),
    then 2-3, 4-5, 6-7, 8-9, 10-11."""
    steps = _steps()
    assert steps.shape == (400, 2, 6) and steps.dtype == torch.long
    for j in range(6):
        assert set(steps[..., j].unique().tolist()) == {2 * j, 2 * j + 1}
    steps = _steps(time_sampling="discrete-wo-init")
    assert set(steps[..., 0].unique().tolist()) == {1}
    for j in range(1, 6):
        assert set(steps[..., j].unique().tolist()) == {2 * j, 2 * j + 1}
    # Drawn from the epoch's generator: the same seed gives the same steps.
    assert torch.equal(_steps(seed=3), _steps(seed=3)) and not torch.equal(_steps(seed=3), _steps(seed=4))


def test_fewer_steps_than_timesteps_repeat_steps_as_the_reference_does():
    """K = 4, fraction 0.9, 6 timesteps: int(3.6) = 3, linspace(0, 3, 7) = 0, .5, ..., 3
    truncated to 0, 0, 1, 1, 2, 2, 3: strata [0, 0), [0, 1), [1, 1), [1, 2), [2, 2), [2, 3)
    give steps 0, 0, 1, 1, 2, 2 always (the last step never). Fraction 1 and 4 timesteps: each
    step once. K = 1: the range is widened to the one step."""
    assert torch.equal(_steps(num_steps=4, num_prompts=50), torch.tensor([0, 0, 1, 1, 2, 2]).expand(50, 2, 6))
    assert torch.equal(_steps(num_steps=4, num_prompts=5, train_timesteps=4, timestep_fraction=1.0),
                       torch.arange(4).expand(5, 2, 4))
    assert torch.equal(_steps(num_steps=1, num_prompts=5, train_timesteps=2), torch.zeros(5, 2, 2, dtype=torch.long))
    assert AWMConfig(num_steps=4, train_timesteps=5).trained_steps_per_trajectory == 5


# ----------------------------------------------------------------------------------------
# The weighted matching log-probability


@pytest.mark.parametrize("weighting, expected", [
    ("uniform", -0.0625),
    ("t", -0.0625 * 0.5),
    ("t-squared", -0.0625 * 0.25),
    ("huber", -(0.25 - 1e-5) * 0.5),
    ("ghuber", -(0.5 - 10**-2.5) * 0.5 / 0.25),
])
def test_weightings_by_hand(weighting, expected):
    """Errors ±0.25 on 2 elements: e = 0.0625, σ = 0.5. uniform -e; t -e·σ; t-squared -e·σ²;
    huber -(sqrt(e + 1e-10) - 1e-5)·σ, sqrt(e) = 0.25; ghuber (p = 0.25)
    -((e + 1e-10)^p - (1e-10)^p)·σ/p, e^p = 0.5 and (1e-10)^p = 10^-2.5. (e + 1e-10 moves
    the roots by under 1e-9.)"""
    error = torch.tensor([0.25, -0.25]).view(1, 1, 2, 1, 1)
    sigma, scale = torch.tensor([[0.5]], dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    log_p = matching_log_prob(error, torch.zeros_like(error), sigma, scale, weighting, 0.25)
    assert log_p.dtype == torch.float64
    assert float(log_p) == pytest.approx(expected, rel=1e-8)


# ----------------------------------------------------------------------------------------
# The loss


def test_on_policy_the_loss_is_the_advantage_weighted_matching_loss_by_hand():
    """Flow model, uniform weighting, no KL. On-policy the ratio is exp(log p - sg(log p)) = 1,
    so the loss is mean(-A) and its gradient -A·∇log p / N = A·2·(v̂ - v)/(n·N).
    Member 0: error [1, 2], A = 0.5; member 1: error [1, 1], A = -1 (n = 2, N = 2).
    Loss -(0.5 - 1)/2 = 0.25; gradient 0.5·2·[1, 2]/4 = [0.25, 0.5] and -2·[1, 1]/4 = [-0.5, -0.5]:
    gradient descent lowers the error of the sample above its prompt's mean and raises the
    other's. matching_loss = mean(e) = (2.5 + 1)/2 = 1.75; clipfrac 0."""
    algo = flow(weighting="uniform").build()
    inputs = inputs_of([[1.0, 2.0], [1.0, 1.0]], [0.5, -1.0], [0.5, 0.8])
    loss, metrics = algo.loss(inputs)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(0.25))
    torch.testing.assert_close(inputs.prediction.grad.view(2, 2), torch.tensor([[0.25, 0.5], [-0.5, -0.5]]))
    torch.testing.assert_close(metrics["matching_loss"], torch.tensor(1.75))
    assert float(metrics["clipfrac"]) == 0.0 and metrics["loss"] == metrics["policy_loss"] == loss.detach()
    assert set(metrics) == {"loss", "policy_loss", "matching_loss", "clipfrac"}


def test_the_published_ghuber_gradient_by_hand():
    """ghuber, p = 0.25, errors ±0.25 (e = 0.0625), σ = 0.5: ∂log p/∂v̂ =
    -σ·(e + 1e-10)^(p-1)·2·(v̂ - v)/n = -0.5·8·[0.25, -0.25] = [-1, 1] (e^-0.75 = 8, n = 2), so
    A = 0.6 alone (N = 1) gives the gradient -A·[-1, 1] = [0.6, -0.6] and the loss -0.6."""
    algo = flow().build()  # ghuber
    inputs = inputs_of([[0.25, -0.25]], [0.6], [0.5])
    loss, _ = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-0.6))
    torch.testing.assert_close(inputs.prediction.grad.view(2), torch.tensor([0.6, -0.6]), rtol=1e-6, atol=0)


def test_off_policy_ratio_against_the_ema_is_clipped_by_hand():
    """off_policy, uniform, clip_range 0.1, one element: v̂_ema - v = 1 (log p_old = -1),
    v̂_θ - v = 0.5 (log p = -0.25), so ratio = e^0.75 ≈ 2.117 > 1.1.
    A = +1: max(-ratio, -1.1) = -1.1, the clipped term, whose gradient is 0.
    A = -1: max(ratio, 1.1) = ratio, unclipped: gradient -A·ratio·∂log p = ratio·(-2·0.5).
    Mean over the two: loss (-1.1 + e^0.75)/2, gradients 0 and -e^0.75/2; clipfrac 1."""
    algo = flow(weighting="uniform", off_policy=True, clip_range=0.1).build()
    ratio = math.exp(0.75)
    inputs = inputs_of([[0.5], [0.5]], [1.0, -1.0], [0.5, 0.5], old=[[1.0], [1.0]])
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor((-1.1 + ratio) / 2))
    torch.testing.assert_close(inputs.prediction.grad.view(2), torch.tensor([0.0, -ratio / 2]))
    assert float(metrics["clipfrac"]) == 1.0


def test_kl_terms_by_hand():
    """Flow model, A = 0 (no policy gradient), kl_weight 0.1, ema_kl_weight 0.5: v̂ = [1, 1],
    v̂_base = [0, 2], v̂_ema = [1, 3]: ref_deviation mean([1, 1]) = 1, old_deviation
    mean([0, 4]) = 2, loss 0.1 + 1 = 1.1; gradient 0.1·2·[1, -1]/2 + 0.5·2·[0, -2]/2 =
    [0.1, -1.1]. Without the base's or the EMA's prediction the loss refuses to run."""
    algo = flow(kl_weight=0.1, ema_kl_weight=0.5).build()
    assert algo.needs.reference_prediction and algo.needs_old_policy
    inputs = inputs_of([[1.0, 1.0]], [0.0], [0.5], old=[[1.0, 3.0]], ref=[[0.0, 2.0]])
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(1.1))
    torch.testing.assert_close(inputs.prediction.grad.view(2), torch.tensor([0.1, -1.1]))
    torch.testing.assert_close(metrics["ref_deviation"], torch.tensor(1.0))
    torch.testing.assert_close(metrics["old_deviation"], torch.tensor(2.0))
    with pytest.raises(ValueError, match="ref_prediction"):
        algo.loss(inputs_of([[1.0, 1.0]], [0.0], [0.5], old=[[1.0, 3.0]]))
    with pytest.raises(ValueError, match="old_prediction"):
        algo.loss(inputs_of([[1.0, 1.0]], [0.0], [0.5], ref=[[0.0, 2.0]]))


@pytest.mark.parametrize("family", ["flow", "epsilon"])
def test_the_loss_is_the_references_on_the_rectified_flow_of_the_same_x_t(family):
    """The reference's loss, written as its code computes it (train_sd3_awm.py:234-252,
    :1305-1352): x_σ = (1-σ)·x0 + σ·ε, v = ε - x0, log p = ghuber of mean((v̂ - v)²) at t = σ,
    ratio against the EMA's log p (off-policy), PPO-clip, + β·mean((v̂ - v̂_base)²) +
    ema_beta·mean((v̂ - v̂_ema)²), all in float64. A flow model gives it v̂ directly. An
    ε-prediction model at ᾱ gives ε̂; its rectified flow is x_t/(a+s) = (1-σ̃)·x0 + σ̃·ε at
    σ̃ = s/(a+s), with v̂ = ε̂ - (x_t - s·ε̂)/a. AWM's loss from (ε̂, ε, x0_scale = s/a) has the
    reference's value on (v̂, σ̃) and its gradient through v̂ = ε̂ - x̂0(ε̂)."""
    generator = torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 2, 2)
    x0, eps, old = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    theta = (old + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_()
    ref = old + 0.2 * torch.randn(shape, generator=generator, dtype=torch.float64)
    level = 0.05 + 0.9 * torch.rand(3, 2, generator=generator, dtype=torch.float64)  # σ, or ᾱ
    advantages = torch.rand(3, 2, generator=generator, dtype=torch.float64) * 2 - 1
    beta, ema_beta, clip, power = 0.1, 0.5, 0.05, 0.25
    expand = (..., None, None, None)
    if family == "flow":
        sigma, x0_scale, target = level, level, eps - x0

        def velocity(prediction):
            return prediction
    else:
        a, s = level.sqrt(), (1 - level).sqrt()
        sigma, x0_scale, target = s / (a + s), s / a, eps
        x_t = a[expand] * x0 + s[expand] * eps
        torch.testing.assert_close(x_t / (a + s)[expand], (1 - sigma[expand]) * x0 + sigma[expand] * eps)

        def velocity(prediction):
            return prediction - (x_t - s[expand] * prediction) / a[expand]

    def log_p(prediction):
        squared = ((velocity(prediction) - (eps - x0)) ** 2).mean(dim=(2, 3, 4))
        return -((squared + 1e-10) ** power - 1e-10**power) * sigma / power

    ratio = torch.exp(log_p(theta) - log_p(old))
    policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)).mean()
    reference = (policy + beta * ((velocity(theta) - velocity(ref)) ** 2).mean()
                 + ema_beta * ((velocity(theta) - velocity(old)) ** 2).mean())
    (reference_grad,) = torch.autograd.grad(reference, theta)

    algo = AWMConfig(sampler="flow" if family == "flow" else "ddim", off_policy=True, clip_range=clip,
                     kl_weight=beta, ema_kl_weight=ema_beta).build()
    prediction = theta.detach().float().requires_grad_()
    loss, _ = algo.loss(ForwardLossInputs(
        prediction=prediction, old_prediction=old.float(), target=target.float(), x0_scale=x0_scale.float(),
        advantages=advantages.float(), ref_prediction=ref.float(),
    ))
    loss.backward()
    assert ratio.min() < 1 - clip or ratio.max() > 1 + clip  # the clip is exercised
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(prediction.grad.double(), reference_grad, rtol=1e-4, atol=1e-7)


def test_flow_view_by_hand():
    """A flow model's σ is its x0_scale, velocity scale 1; an ε model's x0_scale c = s/a = 3
    (ᾱ = 0.1) gives σ̃ = 3/4 and velocity scale 4."""
    sigma, scale = flow_view(torch.tensor([0.25]), epsilon_model=False)
    assert sigma.tolist() == [0.25] and scale.tolist() == [1.0]
    sigma, scale = flow_view(torch.tensor([3.0]), epsilon_model=True)
    assert sigma.tolist() == [0.75] and scale.tolist() == [4.0]


# ----------------------------------------------------------------------------------------
# The EMA: an old policy that does not sample


def test_the_ema_is_kept_for_the_loss_and_samples_only_off_policy():
    """Published (ema_kl_weight 1, on-policy): the runner keeps the EMA and the current
    weights sample; off_policy: the EMA samples too; no EMA term and on-policy: no old policy."""
    published = AWMConfig().build()
    assert published.needs_old_policy and not published.samples_with_old_policy
    off = AWMConfig(off_policy=True, ema_kl_weight=0.0).build()
    assert off.needs_old_policy and off.samples_with_old_policy
    assert not AWMConfig(ema_kl_weight=0.0).build().needs_old_policy


def test_ema_decay_schedules_by_hand():
    """linear: d = min(0.3, 0.001·s): d(0) = 0, d(100) = 0.1, d(300) = d(10^4) = 0.3;
    constant: 0.3 from the start. next_old_policy: old [1, 2], current [3, 6] after 100
    steps: 0.1·[1, 2] + 0.9·[3, 6] = [2.8, 5.6]; after 0 steps, the current weights."""
    assert [ema_decay(AWMConfig(), s) for s in (0, 100, 300, 10_000)] == pytest.approx([0.0, 0.1, 0.3, 0.3])
    assert ema_decay(AWMConfig(ema_decay_schedule="constant"), 0) == 0.3
    algo = AWMConfig().build()
    old, current = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    torch.testing.assert_close(algo.next_old_policy(old, current, 100)["w"], torch.tensor([2.8, 5.6]))
    torch.testing.assert_close(algo.next_old_policy(old, current, 0)["w"], current["w"])


# ----------------------------------------------------------------------------------------
# Config


def test_defaults_are_the_references():
    """scxue/advantage_weighted_matching be51372, PickScore configuration (zoo/awm.py cites
    each line)."""
    c = AWMConfig()
    assert (c.group_size, c.adv_clip_max, c.advantage_max, c.clip_range) == (24, 5.0, 1.0, 1.0)
    assert (c.kl_weight, c.ema_kl_weight, c.ema_decay, c.ema_decay_schedule) == (1e-4, 1.0, 0.3, "linear")
    assert (c.weighting, c.ghuber_power, c.train_timesteps, c.timestep_fraction) == ("ghuber", 0.25, 6, 0.9)
    assert (c.time_sampling, c.off_policy) == ("discrete", False)
    assert (c.lora_rank, c.lora_alpha, c.num_steps, c.guidance_scale, c.eta) == (32, 64.0, 14, 1.0, 0.0)
    assert (c.learning_rate, c.weight_decay, c.max_grad_norm, c.adam_epsilon) == (3e-4, 1e-4, 1.0, 1e-8)
    assert c.loss_calls_per_update == 3 * 6 and c.trained_steps_per_trajectory == 6 and not c.reads_log_probs
    algorithm = c.build()
    assert isinstance(algorithm, ForwardProcessAlgorithm)
    needs = algorithm.needs
    assert needs.group_size == 24 and not needs.shared_noise and not needs.same_step_order_in_group
    assert needs.reference_prediction and not AWMConfig(kl_weight=0.0).build().needs.reference_prediction


@pytest.mark.parametrize("field, value", [
    ("group_size", 0), ("adv_clip_max", 0.0), ("advantage_max", 0.0), ("clip_range", 0.0), ("kl_weight", -1e-4),
    ("ema_kl_weight", -1.0), ("ema_decay", 1.0), ("ema_decay", -0.1), ("ghuber_power", 0.0), ("train_timesteps", 0),
    ("timestep_fraction", 0.0), ("timestep_fraction", 1.5), ("eta", -1.0),
])
def test_impossible_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AWMConfig(**{field: value})


def test_without_the_first_step_one_step_is_refused():
    with pytest.raises(ValueError, match="discrete-wo-init"):
        AWMConfig(num_steps=1, time_sampling="discrete-wo-init")
    assert AWMConfig(sampler="ddim", eta=0.0).eta == 0.0


# ----------------------------------------------------------------------------------------
# The runner's forward-process path on the tiny pipeline


def test_an_epoch_trains_each_trajectory_at_its_drawn_timesteps(tiny_pipeline_dir):
    """`train_on_batch` with AWM at K = 4 and its default 6 timesteps per trajectory (steps 0,
    0, 1, 1, 2, 2: `test_fewer_steps_than_timesteps_repeat_steps_as_the_reference_does`), 2
    groups of 2, one group per minibatch: 2 minibatches x 6 loss calls, one update each (the
    noising, the guidance-free predictions and the old policy's and base's passes are the
    runner's, checked for NFT in tests/test_algo_nft.py). Each example is known by its
    advantage (all distinct) and its x0_scale, sqrt((1-ᾱ)/ᾱ) of the step it was noised to:
    every trajectory sees steps 0, 1 and 2 twice each, with its own advantage of that step."""
    generator = torch.Generator().manual_seed(0)
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    # Deterministic DDIM (eta 0), whose transitions have no log-prob: AWM reads none.
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 4, 0.0, 1.0))
    traj = sampler.sample(["a cat", "a dog"], group_size=2, generator=generator)
    ema = {name: w + 0.05 * torch.randn(w.shape, generator=generator) for name, w in policy.trainable_state().items()}
    advantages = torch.rand(2, 2, 4, generator=generator)
    config = AWMConfig(num_steps=4, group_size=2, train_batch_size=1, gradient_accumulation_steps=1, lora_rank=4,
                       lora_alpha=4.0)
    recorder, accelerator = ForwardRecorder(config.build()), Accelerator(cpu=True)
    policy.denoiser, optimizer = accelerator.prepare(policy.unet, torch.optim.AdamW(policy.trainable_parameters(), lr=0))
    metrics, counts = train_on_batch(recorder, config, sampler, traj, advantages, optimizer, accelerator,
                                     EpochContext(0, 1, generator), TrainLoop(), False, ema)

    assert counts == {"optimizer_updates": 2, "backward_passes": 12} and len(recorder.inputs) == 12
    assert math.isfinite(metrics["loss"]) and metrics["old_deviation"] > 0 and metrics["ref_deviation"] > 0
    alpha = sampler.kernel.alpha_t.float()
    scales = ((1 - alpha) / alpha).sqrt()
    seen = Counter()
    for inputs in recorder.inputs:
        assert inputs.old_prediction is not None and inputs.ref_prediction is not None
        for value, scale in zip(inputs.advantages.flatten().tolist(), inputs.x0_scale.flatten().tolist()):
            group, member, step = (advantages == value).nonzero()[0].tolist()
            assert scale == pytest.approx(float(scales[step]), rel=1e-6)
            seen[group, member, step] += 1
    assert seen == Counter({(g, m, k): 2 for g in range(2) for m in range(2) for k in range(3)})
