"""GRPO by hand: per-prompt group advantages, the PPO-clip edges, the KL to the base model
(the loss term, the closed form, the sampler's two UNet calls), the training window, and
one tiny-world epoch through the runner with both."""

import contextlib
import math

import pytest
import torch
from accelerate import Accelerator

import zoo.grpo
from benchmarks.checkpoint import load_state
from benchmarks.evaluate import EvalSettings
from benchmarks.epochs import train_on_batch
from benchmarks.loop import TrainLoop
from benchmarks.loss_calls import gather_transitions, minibatch_losses
from benchmarks.plan import epoch_budget
from benchmarks.train import JobSettings, checkpoint_path, run_algorithm
from zoo.algorithm import EpochContext, LossInputs
from zoo.grpo import GRPOConfig
from zoo.loading import load_policy
from zoo.policy import LoraSettings
from zoo.kernels import gaussian_kl, gaussian_log_prob
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

from helpers.policies import policy_with_random_adapter
from helpers.rewards import Brightness
from helpers.training import (
    CodedSampler, RecordingSGD, ReplayRecorder, clipped_gradient, coded_trajectory, decode, one_transition,
)


# ----------------------------------------------------------------------------------------
# Advantages


def test_each_prompt_is_normalised_over_all_its_trajectories_with_the_std_floor():
    """Prompts a, b, a, c, two trajectories per group (float64 rewards):
    a: its two groups together, 1, 3, 5, 7: mean 4, population std sqrt((9+1+1+9)/4) =
       sqrt(5), so A = (-3, -1, 1, 3) / (sqrt(5) + 1e-4);
    b: 2, 2: std 0, A = 0 / (0 + 1e-4) = 0 (the floor keeps it finite);
    c: 1, 1.0002: mean 1.0001, std 1e-4, A = ±1e-4 / (1e-4 + 1e-4) = ±0.5 (±1 without the floor).
    Every value is repeated over the K = 3 steps."""
    algo = GRPOConfig(num_steps=3, group_size=2).build()
    returns = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0], [1.0, 1.0002]], dtype=torch.float64)
    advantages = algo.advantages(["a", "b", "a", "c"], returns, algo.new_tracker())
    root5 = math.sqrt(5) + 1e-4
    expected = torch.tensor([[-3 / root5, -1 / root5], [0.0, 0.0], [1 / root5, 3 / root5], [-0.5, 0.5]],
                            dtype=torch.float64)
    assert advantages.shape == (4, 2, 3) and advantages.dtype == torch.float64
    torch.testing.assert_close(advantages, expected[:, :, None].expand(4, 2, 3), rtol=1e-9, atol=1e-12)
    assert torch.equal(advantages[1], torch.zeros(2, 3))


def test_global_std_divides_every_prompt_by_the_whole_batch_std():
    """Rewards 1, 3 | 2, 2 | 5, 7 of prompts a, b, a: batch mean 10/3, squared deviations
    (49 + 1 + 16 + 16 + 25 + 121) / 9 = 228/9 over 6, std sqrt(38)/3; each prompt keeps its
    own mean: a: (-3, -1, 1, 3) / (sqrt(38)/3 + 1e-4), b: 0."""
    algo = GRPOConfig(num_steps=1, group_size=2, global_std=True).build()
    returns = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 7.0]], dtype=torch.float64)
    advantages = algo.advantages(["a", "b", "a"], returns, algo.new_tracker())[:, :, 0]
    scale = math.sqrt(38) / 3 + 1e-4
    expected = torch.tensor([[-3 / scale, -1 / scale], [0.0, 0.0], [1 / scale, 3 / scale]], dtype=torch.float64)
    torch.testing.assert_close(advantages, expected, rtol=1e-9, atol=1e-12)


def test_no_statistics_carry_over_between_epochs():
    """The group is the baseline: the same batch gives the same advantages in a second
    epoch, and the tracker saved with checkpoints holds nothing."""
    algo = GRPOConfig(num_steps=1, group_size=2).build()
    tracker = algo.new_tracker()
    returns = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    first = algo.advantages(["a", "a"], returns, tracker)
    algo.advantages(["a", "b"], torch.tensor([[100.0, 0.0], [5.0, 6.0]]), tracker)
    torch.testing.assert_close(algo.advantages(["a", "a"], returns, tracker), first, rtol=0, atol=0)
    assert tracker.state_dict() == {}


# ----------------------------------------------------------------------------------------
# Loss


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, expected_grad",
    [
        # A = 2 > 0, ratio 1.19 inside 1 + 0.2: both terms -2.38; d/dlogp (-A·ratio) = -2.38.
        (1.19, 2.0, -2.38, -2.38),
        # just past the edge, 1.21: max(-2.42, -2.4) = -2.4, the clipped constant: no gradient.
        (1.21, 2.0, -2.4, 0.0),
        # A = -2 < 0, ratio 0.81 inside 1 - 0.2: both 1.62, gradient -A·ratio = 1.62.
        (0.81, -2.0, 1.62, 1.62),
        # just past the lower edge, 0.79: max(1.58, 1.6) = 1.6, clipped, no gradient.
        (0.79, -2.0, 1.6, 0.0),
        # the pessimistic bound keeps the unclipped term where it is worse: 1.5, A = -2:
        # max(3, 2.4) = 3, gradient 3; and 0.5, A = 2: max(-1, -1.6) = -1, gradient -1.
        (1.5, -2.0, 3.0, 3.0),
        (0.5, 2.0, -1.0, -1.0),
        # A = 10 clamped to adv_clip_max 5 at ratio 1: loss -5, gradient -5.
        (1.0, 10.0, -5.0, -5.0),
    ],
)
def test_clip_edges(ratio, advantage, expected_loss, expected_grad):
    """β = 0: loss = max(-A_c·r, -A_c·clamp(r, 0.8, 1.2)), clip_range 0.2, A_c = clamp(A, ±5)."""
    algo = GRPOConfig(clip_range=0.2, adv_clip_max=5.0, beta=0.0).build()
    inputs = one_transition(math.log(ratio), advantage)
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(expected_loss))
    torch.testing.assert_close(inputs.log_probs.grad, torch.tensor([[[expected_grad]]]))
    assert "kl_to_reference" not in metrics and float(metrics["clipfrac"]) == float(abs(ratio - 1) > 0.2)


def test_kl_term_adds_beta_times_its_mean():
    """Two members at ratio 1 with A = 1, -1: policy loss mean(-1, 1) = 0, gradient -A/2 =
    (-0.5, 0.5) on the log-probs; KL (0.5, 1.5), mean 1: loss = 0 + 0.04·1 = 0.04, and
    d loss / d KL = β / 2 = 0.02 for each transition."""
    algo = GRPOConfig(beta=0.04).build()
    log_probs = torch.tensor([[[-1.0], [-2.0]]], requires_grad=True)
    kl = torch.tensor([[[0.5], [1.5]]], requires_grad=True)
    inputs = LossInputs(
        log_probs=log_probs, old_log_probs=log_probs.detach().clone(), advantages=torch.tensor([[[1.0], [-1.0]]]),
        step_index=torch.zeros(1, 2, 1, dtype=torch.long), kl_to_reference=kl,
    )
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.04))
    torch.testing.assert_close(kl.grad, torch.full((1, 2, 1), 0.02))
    torch.testing.assert_close(log_probs.grad, torch.tensor([[[-0.5], [0.5]]]))
    torch.testing.assert_close(metrics["kl_to_reference"], torch.tensor(1.0))
    torch.testing.assert_close(metrics["policy_loss"], torch.tensor(0.0))
    with pytest.raises(ValueError, match="kl_to_reference"):
        algo.loss(LossInputs(log_probs=log_probs, old_log_probs=log_probs.detach(), advantages=torch.zeros(1, 2, 1),
                             step_index=torch.zeros(1, 2, 1, dtype=torch.long)))


def test_gaussian_kl_with_equal_stds():
    """KL(N(m, s²) || N(m_ref, s²)) = (m - m_ref)² / (2 s²) per element, averaged:
    m = (1, 2), m_ref = 0, s = 2: (1/8 + 4/8) / 2 = 0.3125, gradient (m - m_ref) / s² / 2
    = (0.125, 0.25). Per sample: means 1 everywhere with s = 1 and 2: 0.5 and 0.125."""
    mean = torch.tensor([[1.0, 2.0]], requires_grad=True)
    kl = gaussian_kl(mean, torch.zeros(1, 2), torch.tensor([2.0]))
    kl.sum().backward()
    torch.testing.assert_close(kl, torch.tensor([0.3125]))
    torch.testing.assert_close(mean.grad, torch.tensor([[0.125, 0.25]]))
    per_sample = gaussian_kl(torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(per_sample, torch.tensor([0.5, 0.125]))


# ----------------------------------------------------------------------------------------
# The KL on the real sampler


@pytest.mark.parametrize("kind", ["ddim", "lcm"])
def test_sampler_kl_is_zero_at_the_base_and_the_closed_form_elsewhere(kind, tiny_pipeline_dir, tiny_lcm_pipeline_dir):
    """`TrajectorySampler.log_prob_and_kl`: with a fresh adapter (B = 0) the current and
    base means coincide, so the KL is exactly 0; with a random adapter it is the closed
    form of the two means (the adapter's and the adapter-disabled one) and the step's
    std, its gradient flows through the current mean only, the log-prob and its gradient
    are `log_prob`'s, and the adapter is back on afterwards."""
    folder = tiny_pipeline_dir if kind == "ddim" else tiny_lcm_pipeline_dir
    config = SamplerConfig(kind, 3, 1.0, 2.0)
    fresh = TrajectorySampler(load_policy(folder, lora=LoraSettings()), config)
    traj = fresh.sample(["a cat", "a dog"], group_size=2, generator=torch.Generator().manual_seed(0))
    x, x_next = traj.latents.flatten(0, 2), traj.next_latents.flatten(0, 2)
    steps = torch.arange(3).repeat(4)
    embeds = traj.prompt_embeds.repeat_interleave(6, dim=0)
    log_prob, kl = fresh.log_prob_and_kl(x, steps, x_next, embeds)
    assert torch.equal(kl, torch.zeros(12))
    torch.testing.assert_close(log_prob, traj.log_probs.flatten(), rtol=0, atol=1e-5)

    policy = policy_with_random_adapter(folder)
    sampler = TrajectorySampler(policy, config)
    params = policy.trainable_parameters()
    log_prob, kl = sampler.log_prob_and_kl(x, steps, x_next, embeds)
    (kl_grad,) = torch.autograd.grad(kl.sum(), params[:1], retain_graph=True)
    (log_prob_grad,) = torch.autograd.grad(log_prob.sum(), params[:1])
    mean, std, _ = sampler.transition(x, steps, embeds)
    with torch.no_grad(), policy.reference():
        ref_mean, _, _ = sampler.transition(x, steps, embeds)
    expected = ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)
    assert float(kl.detach().min()) > 0
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=0)
    (expected_grad,) = torch.autograd.grad(expected.sum(), params[:1])
    torch.testing.assert_close(kl_grad, expected_grad, rtol=1e-4, atol=1e-10)
    plain = sampler.log_prob(x, steps, x_next, embeds)
    torch.testing.assert_close(log_prob, plain.detach(), rtol=0, atol=0)
    (plain_grad,) = torch.autograd.grad(plain.sum(), params[:1])
    torch.testing.assert_close(log_prob_grad, plain_grad, rtol=1e-6, atol=0)
    assert all(p.requires_grad for p in params)


@pytest.mark.parametrize("beta, unet_calls", [(0.0, 1), (0.04, 2)])
def test_the_reference_unet_call_is_made_only_when_beta_is_positive(beta, unet_calls, tiny_pipeline_dir):
    """One minibatch loss: one UNet call for the current weights, and one more without
    gradients under the base model only when β > 0, made first (in full fine-tuning the
    reference copies the base weights into the parameters, which must not change between a
    call with gradients and its backward pass)."""
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 2, 1.0, 1.0))
    algorithm = GRPOConfig(num_steps=2, guidance_scale=1.0, group_size=2, beta=beta).build()
    assert algorithm.needs.kl_to_reference == (beta > 0)
    traj = sampler.sample(["a cat"], group_size=2, generator=torch.Generator().manual_seed(0))
    transitions = gather_transitions(traj, torch.tensor([0]), torch.tensor([[[1], [0]]]))
    calls = []
    real = policy.predict
    policy.predict = lambda *args: calls.append(torch.is_grad_enabled()) or real(*args)
    (loss, metrics, last), = minibatch_losses(algorithm, sampler, transitions, torch.ones(1, 2, 1), 8)
    assert last and calls == [False, True][-unet_calls:]
    assert ("kl_to_reference" in metrics) == (beta > 0)


def test_per_member_kl_equals_the_batched_one(tiny_pipeline_dir):
    """`Transitions.log_probs_and_kl(per_member=True)` (one call per group member, the way
    benchmarks.perf times the reference codes) gives the batched log-probs and KL."""
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 2, 1.0, 2.0))
    traj = sampler.sample(["a cat", "a dog"], group_size=2, generator=torch.Generator().manual_seed(3))
    transitions = gather_transitions(traj, torch.tensor([1, 0]), torch.tensor([1, 0]).expand(2, 2, 2))
    with torch.no_grad():
        batched, per_member = transitions.log_probs_and_kl(sampler), transitions.log_probs_and_kl(sampler, True)
    for a, b in zip(batched, per_member):
        assert a.shape == (2, 2, 2)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert float(batched[1].min()) > 0


# ----------------------------------------------------------------------------------------
# The training window


def test_window_steps_are_consecutive_and_start_uniformly_in_the_range():
    """K = 5, window 2 in steps 1 .. 3: starts 1 or 2, so windows (1, 2) or (2, 3), both
    drawn; a range of exactly the window's size fixes it; no window trains every step."""
    algo = GRPOConfig(num_steps=5, window_size=2, window_range=(1, 4)).build()
    windows = algo.trained_steps(EpochContext(0, 1, torch.Generator().manual_seed(0)), 50, 2)
    assert windows.shape == (50, 2, 2)
    assert torch.equal(windows[..., 1], windows[..., 0] + 1)
    assert set(windows[..., 0].flatten().tolist()) == {1, 2}
    fixed = GRPOConfig(num_steps=5, window_size=2, window_range=(1, 3)).build()
    context = EpochContext(0, 1, torch.Generator())
    assert torch.equal(fixed.trained_steps(context, 3, 2), torch.tensor([1, 2]).expand(3, 2, 2))
    assert GRPOConfig(num_steps=5).build().trained_steps(context, 3, 2) is None


def test_loss_calls_per_update_count_the_window_only():
    """Accumulation 4: 4 x K = 40 loss calls per update without a window, 4 x 2 with one;
    64 trajectories = 8 groups of 8, batch 1: 8 x 2 = 16 calls, 2 updates."""
    assert GRPOConfig().loss_calls_per_update == 40
    windowed = GRPOConfig(window_size=2)
    assert windowed.loss_calls_per_update == 8 and windowed.trained_steps_per_trajectory == 2
    assert epoch_budget(windowed, 64) == {"loss_calls": 16, "optimizer_updates": 2}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(window_size=0), "window_size"),
        (dict(num_steps=4, window_size=5), "window_size"),
        (dict(num_steps=4, window_size=2, window_range=(3, 4)), "window_range"),
        (dict(num_steps=4, window_size=2, window_range=(0, 5)), "window_range"),
        (dict(window_range=(0, 2)), "window_range"),
        (dict(group_size=1), "group_size"),
        (dict(std_epsilon=0.0), "std_epsilon"),
        (dict(beta=-0.1), "beta"),
        (dict(clip_range=0.0), "clip_range"),
    ],
)
def test_impossible_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GRPOConfig(**overrides)


def test_the_loop_replays_each_trajectorys_window_only_and_counts_those_calls():
    """`train_on_batch` on the coded trajectory (helpers.training): 6 groups of
    2 at K = 4, a window of 2 anywhere in the 4 steps, 2 inner epochs, batch 1, accumulation
    2. Every trajectory trains exactly its two consecutive window steps, twice (once per
    inner epoch), and no other step; windows differ between trajectories; the loop makes
    2 x 6 x 2 = 24 loss calls (one backward pass each) and 24 / (2 x 2) = 6 optimizer
    steps, as `epoch_budget` declares, each applying the mean gradient of its 4 calls."""
    config = GRPOConfig(num_steps=4, group_size=2, window_size=2, train_batch_size=1, gradient_accumulation_steps=2,
                        num_inner_epochs=2)
    algorithm = config.build()
    traj = coded_trajectory(6, 2, 4, reference=False)
    sampler = CodedSampler()
    recorder = ReplayRecorder(algorithm, sampler.policy.trainable_parameters())
    optimizer = RecordingSGD(sampler.policy.trainable_parameters())
    advantages = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(7))
    _, counts = train_on_batch(recorder, config, sampler, traj, advantages, optimizer, Accelerator(cpu=True),
                             EpochContext(0, 1, torch.Generator().manual_seed(0)), TrainLoop(), False)
    trained: dict[tuple[int, int], list[int]] = {}
    for call in recorder.calls:
        p, g, k = decode(call.old)
        assert torch.equal(call.step_index, k)
        for key, step in zip(zip(p.flatten().tolist(), g.flatten().tolist()), k.flatten().tolist()):
            trained.setdefault(key, []).append(step)
    assert len(trained) == 12
    windows = set()
    for steps in trained.values():
        first = min(steps)
        assert sorted(steps) == [first, first, first + 1, first + 1]
        windows.add(first)
    assert len(windows) > 1
    assert len(recorder.calls) == counts["backward_passes"] == 24
    assert len(optimizer.grads) == counts["optimizer_updates"] == epoch_budget(config, 12)["optimizer_updates"] == 6
    for update, applied in enumerate(optimizer.grads):
        window = recorder.calls[4 * update : 4 * update + 4]
        expected = torch.stack([call.grad for call in window]).sum() / 4
        torch.testing.assert_close(applied, clipped_gradient(expected, config.max_grad_norm), rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------------------
# One epoch through the runner


@pytest.mark.parametrize("kind", ["ddim", "lcm"])
def test_runner_epoch_trains_the_window_with_a_kl_that_starts_at_zero(
    kind, tiny_pipeline_dir, tiny_lcm_pipeline_dir, tmp_path, monkeypatch
):
    """`run_algorithm` on the random tiny pipeline, one epoch of 4 trajectories (2 groups of
    2, one prompt) at K = 4, β = 0.5, the window fixed to steps 1 and 2, batch 1,
    accumulation 1: 2 minibatches x 2 steps = 4 loss calls, an update every 2. Every call
    trains step 1 or 2 (never 0 or 3); the first update's calls see the base model itself
    (the adapter starts at B = 0), so their KL is exactly 0, and after that update it is
    positive; the checkpoint counts 4 backward passes and 2 updates, `epoch_budget`'s."""
    folder = tiny_pipeline_dir if kind == "ddim" else tiny_lcm_pipeline_dir
    config = GRPOConfig(sampler=kind, num_steps=4, guidance_scale=2.0, group_size=2, beta=0.5, window_size=2,
                        window_range=(1, 3), train_batch_size=1, gradient_accumulation_steps=1, learning_rate=1e-2)
    seen = []
    real_loss = zoo.grpo.GRPO.loss

    def recording_loss(self, inputs):
        seen.append((inputs.step_index.clone(), inputs.kl_to_reference.detach().clone()))
        return real_loss(self, inputs)

    monkeypatch.setattr(zoo.grpo.GRPO, "loss", recording_loss)
    settings = JobSettings(
        model=folder, epochs=1, trajectories_per_epoch=4, train_prompts=("a cat",), eval_every=2,
        eval=EvalSettings(prompts=("a fox",), step_counts=(1,), samples_per_prompt=1, batch_size=1, sampler=kind,
                          guidance_scale=2.0, eta=1.0, seed=0),
        mixed_precision="no", train_reward="brightness", out_dir=tmp_path,
    )
    run_algorithm("grpo", config, 0, settings, Brightness(), {"brightness": Brightness()}, Accelerator(cpu=True))

    assert len(seen) == 4
    assert sorted(int(steps.unique()) for steps, _ in seen) == [1, 1, 2, 2]
    assert all(steps.shape == (1, 2, 1) for steps, _ in seen)
    assert torch.equal(seen[0][1], torch.zeros(1, 2, 1)) and torch.equal(seen[1][1], torch.zeros(1, 2, 1))
    assert float(seen[2][1].min()) > 0 and float(seen[3][1].min()) > 0
    counters = load_state(checkpoint_path(tmp_path, "grpo", 0))["counters"]
    budget = epoch_budget(config, 4)
    assert counters["backward_passes"] == budget["loss_calls"] == 4
    assert counters["optimizer_updates"] == budget["optimizer_updates"] == 2


# ----------------------------------------------------------------------------------------
# Defaults


def test_defaults_are_flow_grpos_single_gpu_config():
    config = GRPOConfig()
    assert (config.group_size, config.num_steps, config.guidance_scale) == (8, 10, 4.5)
    assert (config.clip_range, config.adv_clip_max, config.beta, config.std_epsilon) == (1e-4, 5.0, 0.04, 1e-4)
    assert (config.learning_rate, config.train_batch_size, config.gradient_accumulation_steps) == (3e-4, 1, 4)
    assert (config.lora_rank, config.lora_alpha, config.max_grad_norm) == (32, 64.0, 1.0)
    assert not config.global_std and config.window_size is None
    needs = config.build().needs
    assert needs.group_size == 8 and not needs.shared_noise and needs.kl_to_reference
    assert not GRPOConfig(beta=0.0).build().needs.kl_to_reference


# ----------------------------------------------------------------------------------------
# Fidelity to flow_grpo's training log-prob and KL (yifan123/flow_grpo ac4c86e)


@pytest.mark.parametrize("pipeline", ["tiny_pipeline_dir", "tiny_flow_pipeline_dir"])
def test_the_training_log_prob_detaches_the_unconditional_prediction_as_flow_grpo(request, pipeline):
    """flow_grpo's compute_log_prob (scripts/train_sd3.py:179-215) runs the denoiser on the
    conditional and unconditional inputs, detaches the unconditional output (:190) and guides;
    its log-prob's gradient therefore reaches the adapter through g·∂(conditional) only. The
    same formula written out here (two separate denoiser calls, the unconditional one without
    gradients) must give GRPO's log-prob and LoRA gradient; without the detach the value is
    the same and the gradient is not (the issue measured cosine 0.51-0.66 on the flow model)."""
    policy = policy_with_random_adapter(request.getfixturevalue(pipeline))
    kind, guidance = ("flow", 4.5) if policy.prediction == "velocity" else ("ddim", 4.0)
    sampler = TrajectorySampler(policy, SamplerConfig(kind, 3, eta=0.7 if kind == "flow" else 1.0,
                                                      guidance_scale=guidance))
    traj = sampler.sample(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0))
    x, x_next, step = traj.latents[:, 0, 1], traj.next_latents[:, 0, 1], torch.full((2,), 1)
    params = policy.trainable_parameters()

    def gradient(log_prob: torch.Tensor) -> torch.Tensor:
        policy.model.zero_grad(set_to_none=True)
        log_prob.sum().backward()
        return torch.cat([p.grad.flatten() for p in params])

    with policy.unconditional_detached():
        ours = sampler.log_prob(x, step, x_next, traj.prompt_embeds)
    ours_grad = gradient(ours)
    timesteps = sampler.kernel.timesteps[step]
    conditional = policy.predict(x, timesteps, traj.prompt_embeds, 1.0)
    with torch.no_grad():
        unconditional = policy.predict(x, timesteps, policy.uncond_embeds().expand(2, -1, -1), 1.0)
    guided = unconditional + guidance * (conditional - unconditional)
    mean, std, _ = sampler.kernel.step(guided, x, step)
    reference = gaussian_log_prob(x_next, mean, std)
    reference_grad = gradient(reference)
    torch.testing.assert_close(ours, reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grad, reference_grad, rtol=1e-4, atol=1e-6)
    attached = sampler.log_prob(x, step, x_next, traj.prompt_embeds)
    attached_grad = gradient(attached)
    torch.testing.assert_close(attached.detach(), ours.detach(), rtol=1e-6, atol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(attached_grad, ours_grad, dim=0)
    assert cosine < 0.99


def test_grpo_replays_with_the_unconditional_prediction_detached_unless_told_not_to():
    """The config decides it (flow_grpo's behaviour by default) and the runner's replay call
    enters `Policy.unconditional_detached` for it."""
    assert GRPOConfig().build().needs.detach_unconditional
    assert not GRPOConfig(detach_unconditional=False).build().needs.detach_unconditional
    seen = []

    class Policy:
        device = torch.device("cpu")

        @contextlib.contextmanager
        def unconditional_detached(self):
            seen.append("entered")
            yield

    class Sampler:
        policy = Policy()

        def log_prob(self, *inputs):
            return torch.zeros(inputs[0].shape[0])

    from benchmarks.loss_calls import ReplayCall, Transitions

    latents = torch.zeros(1, 2, 1, 4, 2, 2)
    transitions = Transitions(latents, latents, torch.zeros(1, 2, 1, dtype=torch.long), torch.zeros(1, 2, 1, 3, 5),
                              torch.zeros(1, 2, 1), None)
    for detach, expected in ((True, ["entered"]), (False, [])):
        seen.clear()
        algorithm = GRPOConfig(beta=0.0, detach_unconditional=detach).build()
        call = ReplayCall(algorithm, transitions, torch.zeros(1, 2, 1))
        call.run(Sampler(), *call.model_inputs(slice(None), slice(None)))
        assert seen == expected


def test_flow_grpos_kl_form_is_the_exact_kl_times_the_step_size_worked_numbers():
    """One Flow-GRPO SDE step σ = 0.75 -> σ' = 0.5 at noise level a = 0.7, x = 0, a velocity
    of 1 under the current weights and 0 under the base (a stand-in policy), every element:
    std_dev_t² = a²·σ/(1-σ) = 0.49·3 = 1.47 (sd3_sde_with_logprob.py:47); the mean's velocity
    coefficient (1 + std_dev_t²·(1-σ)/(2σ))·dt = (1 + 1.47·0.25/1.5)·(-0.25) = -0.31125 (:50),
    so Δμ = -0.31125 and Δμ² = 0.0968765625.
    flow_grpo's KL (train_sd3.py:895): Δμ² / (2·std_dev_t²) = 0.0968765625 / 2.94 = 0.032951...
    the exact Gaussian KL: Δμ² / (2·std_dev_t²·(σ - σ')) = 0.131804...: four times it."""
    from zoo.kernels import FlowGRPOKernel

    class Policy:
        device = torch.device("cpu")
        in_reference = False

        def predict(self, latents, timesteps, embeds, guidance_scale, guidance_embedding=False):
            return torch.full_like(latents, 0.0 if self.in_reference else 1.0)

        def reference(self):
            policy = self

            class Reference:
                def __enter__(self):
                    policy.in_reference = True

                def __exit__(self, *exc):
                    policy.in_reference = False

            return Reference()

    kernel = FlowGRPOKernel(timesteps=torch.tensor([750.0]), noise_levels=torch.tensor([0.7], dtype=torch.float64),
                            sigma=torch.tensor([0.75], dtype=torch.float64),
                            sigma_next=torch.tensor([0.5], dtype=torch.float64))
    sampler = TrajectorySampler(Policy(), SamplerConfig("flow", 1, eta=0.7), kernel=kernel)
    x = torch.zeros(1, 4, 2, 2)
    step, embeds = torch.zeros(1, dtype=torch.long), torch.zeros(1, 3, 5)
    _, exact = sampler.log_prob_and_kl(x, step, x, embeds)
    _, flow_grpo = sampler.log_prob_and_kl(x, step, x, embeds, kl_form="flow-grpo")
    assert flow_grpo.item() == pytest.approx(0.0968765625 / 2.94, rel=1e-5)
    assert exact.item() == pytest.approx(0.0968765625 / (2.94 * 0.25), rel=1e-5)


def test_the_flow_presets_carry_flow_grpos_beta_on_its_kl_form():
    """sd3.5-medium and flux-schnell take flow_grpo's β 0.01 (config/grpo.py:206), so their KL
    is flow_grpo's; the ε samplers have no step size and refuse that form."""
    from benchmarks.cli import preset_algo_configs
    from benchmarks.presets import PRESETS

    for name in ("sd3.5-medium", "flux-schnell"):
        preset = PRESETS[name]()
        config = preset_algo_configs(preset, preset.reward).grpo
        assert (config.beta, config.kl_form) == (0.01, "flow-grpo")
    with pytest.raises(ValueError, match="kl_form flow-grpo scales the KL by a flow step's size"):
        GRPOConfig(sampler="ddim", kl_form="flow-grpo")
    with pytest.raises(ValueError, match="kl_form must be one of exact, flow-grpo"):
        GRPOConfig(sampler="flow", kl_form="flowgrpo")


def test_a_grpo_run_recorded_before_the_detach_reads_as_attached():
    """config.json of a run made before `detach_unconditional` and `kl_form` existed reads as
    what it ran (attached, exact), so resuming it with today's defaults is a change of
    settings, not a silent switch of the loss halfway through."""
    from benchmarks.run_folder import recorded_setting

    old = {"algorithm_configs": {"grpo": {"beta": 0.04}, "ddpo": {"clip_range": 1e-4}}}
    configs = recorded_setting(old, "algorithm_configs")
    assert configs["grpo"]["detach_unconditional"] is False and configs["grpo"]["kl_form"] == "exact"
    assert "detach_unconditional" not in configs["ddpo"]
