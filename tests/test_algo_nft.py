"""DiffusionNFT by hand: optimality probabilities, the ε-form implicit policies and their
loss and gradient, the old-policy rule, and the runner's forward-process path on the tiny
pipeline (noised final latents, no log-probs, no CFG, old weights, resume)."""

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import benchmarks.train
from benchmarks.checkpoint import load_state
from benchmarks.epochs import train_on_batch
from benchmarks.loop import TrainLoop
from benchmarks.train import checkpoint_path, run_algorithm
from zoo.algorithm import EpochContext, ForwardLossInputs, ForwardProcessAlgorithm
from zoo.nft import NFTConfig, adaptive_x0_loss, old_policy_decay
from zoo.kernels import SamplerConfig
from zoo.sampling import TrajectorySampler

from helpers.policies import policy_with_random_adapter
from helpers.rewards import Brightness
from helpers.runs import micro_job
from helpers.training import ForwardRecorder


def one_sample(eps, old, theta, alpha, optimality, ref=None) -> ForwardLossInputs:
    """Latents of C = 2 elements (h = w = 1); one row of `eps`, `old`, `theta` per group
    member (p = 1). ε_θ carries the gradient."""
    shape = (1, len(eps), 2, 1, 1)
    prediction = torch.tensor(theta).view(shape).requires_grad_()
    return ForwardLossInputs(
        prediction=prediction,
        old_prediction=torch.tensor(old).view(shape),
        target=torch.tensor(eps).view(shape),
        x0_scale=((1 - torch.tensor([alpha])) / torch.tensor([alpha])).sqrt(),
        advantages=torch.tensor([optimality]),
        ref_prediction=None if ref is None else torch.tensor(ref).view(shape),
    )


# ----------------------------------------------------------------------------------------
# Optimality probabilities


def test_optimality_is_the_clipped_reward_over_z_around_the_prompts_mean():
    """p = 1/2 + 1/2·clip((r - prompt mean) / Z, -1, 1), Z = adv_clip_max·(batch std + 1e-4).

    Prompts a, b, a with G = 2 and rewards [1, 5], [5, 5], [1, 1]: the batch's mean is 3 and
    its population std 2 (every reward 2 away); prompt a's four rewards have mean 2, b's two
    mean 5. adv_clip_max 1: Z = 2.0001, so r = 1 of a gives 1/2 - 1/2 / 2.0001, r = 5 of a
    (3 / 2.0001 > 1) is clipped to p = 1, b's rewards sit at their mean: 1/2. adv_clip_max 5:
    Z = 10.0005, nothing clipped, r = 5 of a gives 1/2 + 1.5 / 10.0005. (The batch mean 3
    instead of the prompt's, or each group's own mean, gives other numbers.)"""
    returns = torch.tensor([[1.0, 5.0], [5.0, 5.0], [1.0, 1.0]])
    prompts = ["a", "b", "a"]
    algo = NFTConfig(num_steps=3, adv_clip_max=1.0).build()
    low = 0.5 - 0.5 / 2.0001
    expected = torch.tensor([[low, 1.0], [0.5, 0.5], [low, low]])
    optimality = algo.advantages(prompts, returns, algo.new_tracker())
    assert optimality.shape == (3, 2, 3) and optimality.dtype == torch.float32
    torch.testing.assert_close(optimality, expected[:, :, None].expand(3, 2, 3), rtol=0, atol=1e-7)

    algo = NFTConfig(num_steps=1).build()  # adv_clip_max 5
    low = 0.5 - 0.5 / 10.0005
    expected = torch.tensor([[low, 0.5 + 1.5 / 10.0005], [0.5, 0.5], [low, low]])
    torch.testing.assert_close(algo.advantages(prompts, returns, algo.new_tracker())[..., 0], expected,
                               rtol=0, atol=1e-7)


def test_optimality_is_clipped_below_to_zero():
    """One prompt, rewards [8, 8], [8, 0]: mean 6, population std sqrt((3·4 + 36) / 4) =
    2·sqrt(3); adv_clip_max 1: the three 8s get 1/2 + 1/2·2/Z (Z = 2·sqrt(3) + 1e-4), the 0
    is 6/Z > 1 below the mean: clipped to p = 0."""
    algo = NFTConfig(num_steps=1, adv_clip_max=1.0).build()
    z = 2 * math.sqrt(3) + 1e-4
    high = 0.5 + 1.0 / z
    optimality = algo.advantages(["a", "a"], torch.tensor([[8.0, 8.0], [8.0, 0.0]]), algo.new_tracker())
    torch.testing.assert_close(optimality[..., 0], torch.tensor([[high, high], [high, 0.0]]), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------
# The ε-form loss


def test_implicit_policies_loss_and_gradient_by_hand():
    """β = 1/2, adv_clip_max 5 (factor 5 / β = 10), no KL. Two members of one group.

    Member 0: ᾱ = 0.2, so s/a = sqrt(0.8 / 0.2) = 2; ε = [0, 0], ε_old = [1, -1],
    ε_θ = [2, 1], p = 0.75.
      ε⁺ = 0.5·ε_old + 0.5·ε_θ = [1.5, 0];   x0 error E⁺ = 2·(ε⁺ - ε) = [3, 0]:
        mean(E²) = 4.5, mean|E| = 1.5, ℓ⁺ = 3.
      ε⁻ = 1.5·ε_old - 0.5·ε_θ = [0.5, -2];  E⁻ = [1, -4]: mean(E²) = 8.5, mean|E| = 2.5, ℓ⁻ = 3.4.
      p·ℓ⁺ + (1-p)·ℓ⁻ = 2.25 + 0.85 = 3.1.
      ∂ℓ⁺/∂ε_θ = (1/n)·2·E⁺·(s/a·β) / W⁺ = [3, 0] / 1.5 = [2, 0]   (n = 2, W detached);
      ∂ℓ⁻/∂ε_θ = -E⁻ / 2.5 = [-0.4, 1.6];
      weighted: 0.75·[2, 0] + 0.25·[-0.4, 1.6] = [1.4, 0.4].
    Member 1: ᾱ = 0.5 (s/a = 1), ε = [0, 0], ε_old = ε_θ = [1, 1], p = 1/2: ε⁺ = ε⁻ = [1, 1],
      ℓ⁺ = ℓ⁻ = 1, and the two gradients ±[0.5, 0.5] cancel at p = 1/2.
    Loss = 10·mean(3.1, 1) = 20.5; gradient = 10·[1.4, 0.4] / 2 = [7, 2] and [0, 0].
    old_deviation = mean((ε_θ - ε_old)²) over the four elements = (1 + 4) / 4 = 1.25."""
    algo = NFTConfig(beta=0.5, kl_weight=0.0).build()
    inputs = one_sample(eps=[[0.0, 0.0], [0.0, 0.0]], old=[[1.0, -1.0], [1.0, 1.0]], theta=[[2.0, 1.0], [1.0, 1.0]],
                        alpha=[0.2, 0.5], optimality=[0.75, 0.5])
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(20.5))
    torch.testing.assert_close(inputs.prediction.grad.view(2, 2), torch.tensor([[7.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(metrics["old_deviation"], torch.tensor(1.25))
    assert metrics["loss"] == metrics["policy_loss"] == loss.detach() and "ref_deviation" not in metrics


def test_an_exact_prediction_gives_zero_loss_through_the_weight_floor():
    """ε_θ = ε_old = ε: both x0 errors are 0 and the weight is floored at 1e-5: loss 0,
    gradient 0, nothing infinite."""
    algo = NFTConfig(kl_weight=0.0).build()
    inputs = one_sample(eps=[[0.5, -0.5]], old=[[0.5, -0.5]], theta=[[0.5, -0.5]], alpha=[0.5], optimality=[0.9])
    loss, _ = algo.loss(inputs)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(inputs.prediction.grad, torch.zeros_like(inputs.prediction))


def test_kl_to_the_base_model_by_hand():
    """β = 1, kl_weight 0.1, ε = ε_old = ε_θ = [1, 1], so ε⁺ = ε⁻ = ε and the policy term is
    0; ε_base = [0, 2]: mean((ε_θ - ε_base)²) = mean(1, 1) = 1, loss 0.1, gradient
    0.1·2·[1, -1] / 2 = [0.1, -0.1]. Without ε_base the loss refuses to run."""
    algo = NFTConfig(kl_weight=0.1).build()
    assert algo.needs.reference_prediction and not NFTConfig(kl_weight=0.0).build().needs.reference_prediction
    inputs = one_sample(eps=[[1.0, 1.0]], old=[[1.0, 1.0]], theta=[[1.0, 1.0]], alpha=[0.5], optimality=[0.8],
                        ref=[[0.0, 2.0]])
    loss, metrics = algo.loss(inputs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.1))
    torch.testing.assert_close(inputs.prediction.grad.view(2), torch.tensor([0.1, -0.1]))
    torch.testing.assert_close(metrics["ref_deviation"], torch.tensor(1.0))
    with pytest.raises(ValueError, match="ref_prediction"):
        algo.loss(one_sample(eps=[[1.0, 1.0]], old=[[1.0, 1.0]], theta=[[1.0, 1.0]], alpha=[0.5], optimality=[0.8]))


def test_epsilon_form_is_the_references_x0_loss_and_any_parametrisation_mixes_alike():
    """The reference's loss, written as its code computes it but on the ε-model's forward
    process: x_t = a·x0 + s·ε, x̂0(ε̂) = (x_t - s·ε̂) / a, weight = max(mean|x̂0 - x0|, 1e-5) in
    float64, loss = (adv_clip_max / β)·mean(p·mean((x̂0⁺ - x0)²) / w⁺ + (1-p)·(same for ⁻)).
    NFT's ε-form gives its value and its gradient. And mixing v-predictions
    (v = a·ε - s·x0, x̂0 = a·x_t - s·v) gives the x̂0 that mixing ε-predictions gives: the
    implicit policies do not depend on the parametrisation (module docstring, 1)."""
    generator = torch.Generator().manual_seed(0)
    shape = (3, 2, 4, 2, 2)
    x0, eps, old = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    theta = (old + 0.3 * torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_()
    alpha = 0.05 + 0.9 * torch.rand(3, 2, generator=generator, dtype=torch.float64)
    optimality = torch.rand(3, 2, generator=generator, dtype=torch.float64)
    beta, clip = 0.3, 5.0
    a, s = alpha.sqrt()[..., None, None, None], (1 - alpha).sqrt()[..., None, None, None]
    x_t = a * x0 + s * eps

    def x0_loss(prediction):
        x0_hat = (x_t - s * prediction) / a
        weight = (x0_hat - x0).abs().mean(dim=(2, 3, 4), keepdim=True).clamp(min=1e-5).detach()
        return ((x0_hat - x0) ** 2 / weight).mean(dim=(2, 3, 4))

    positive, negative = (1 - beta) * old + beta * theta, (1 + beta) * old - beta * theta
    reference = clip / beta * (optimality * x0_loss(positive) + (1 - optimality) * x0_loss(negative)).mean()
    (reference_grad,) = torch.autograd.grad(reference, theta)

    algo = NFTConfig(beta=beta, adv_clip_max=clip, kl_weight=0.0).build()
    prediction = theta.detach().float().requires_grad_()
    loss, _ = algo.loss(ForwardLossInputs(prediction=prediction, old_prediction=old.float(), target=eps.float(),
                                          x0_scale=((1 - alpha) / alpha).sqrt().float(), advantages=optimality.float()))
    loss.backward()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0)
    torch.testing.assert_close(prediction.grad.double(), reference_grad, rtol=1e-4, atol=1e-7)

    def v_of(eps_hat):
        return a * eps_hat - s * (x_t - s * eps_hat) / a

    v_positive = (1 - beta) * v_of(old) + beta * v_of(theta.detach())
    torch.testing.assert_close(a * x_t - s * v_positive, (x_t - s * positive.detach()) / a)


def test_at_the_old_weights_the_gradient_weights_the_denoising_loss_by_the_clipped_advantage():
    """Module docstring, 4: at ε_θ = ε_old, ∂/∂ε_θ (adv_clip_max/β)·(p·ℓ(ε⁺) + (1-p)·ℓ(ε⁻)) =
    adv_clip_max·(2p - 1)·∂ℓ(ε_θ) for each sample: with p = 1/2 + 1/2·A/adv_clip_max (A
    inside the clip) the advantage A times the adaptive denoising loss's gradient, whatever β.
    Here A = 2p·5 - 5 for p = 0.9, 0.5, 0.3 (A = 4, 0, -2), β = 0.3, and the batch mean over
    the three samples divides both sides alike."""
    generator = torch.Generator().manual_seed(1)
    shape = (1, 3, 4, 2, 2)
    eps, old = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    alpha = torch.tensor([[0.1, 0.5, 0.9]])
    optimality = torch.tensor([[0.9, 0.5, 0.3]])
    prediction = old.clone().requires_grad_()
    algo = NFTConfig(beta=0.3, kl_weight=0.0).build()
    loss, _ = algo.loss(ForwardLossInputs(prediction=prediction, old_prediction=old, target=eps,
                                          x0_scale=((1 - alpha) / alpha).sqrt(), advantages=optimality))
    loss.backward()
    denoising = old.clone().requires_grad_()
    advantage = torch.tensor([[4.0, 0.0, -2.0]])
    (advantage * adaptive_x0_loss(denoising - eps, ((1 - alpha) / alpha).sqrt())).mean().backward()
    torch.testing.assert_close(prediction.grad, denoising.grad, rtol=1e-5, atol=1e-7)
    assert prediction.grad[0, 1].abs().max() < 1e-6 < prediction.grad[0, 0].abs().max()


# ----------------------------------------------------------------------------------------
# The old policy


def test_old_policy_decay_schedules_by_hand():
    """d(s) = 0 before the delay, then min(rate·(s - delay), d_max). The reference's decay
    type 1 (delay 0, rate 0.001, cap 0.5): d(0) = 0, d(100) = 0.1, d(500) = d(10^4) = 0.5;
    type 2 (75, 0.0075, 0.999): d(74) = d(75) = 0, d(95) = 0.15, d(300) = 0.999
    (1.6875 capped)."""
    default = NFTConfig()
    assert [old_policy_decay(default, s) for s in (0, 100, 500, 10_000)] == pytest.approx([0.0, 0.1, 0.5, 0.5])
    ocr = NFTConfig(old_policy_decay_delay=75, old_policy_decay_rate=0.0075, old_policy_decay_max=0.999)
    assert [old_policy_decay(ocr, s) for s in (74, 75, 95, 300)] == pytest.approx([0.0, 0.0, 0.15, 0.999])


def test_next_old_policy_by_hand():
    """old [1, 2], current [3, 6]: after 100 steps (d = 0.1) 0.1·[1, 2] + 0.9·[3, 6] =
    [2.8, 5.6]; after 0 steps (d = 0) the current weights."""
    algo = NFTConfig().build()
    old, current = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}
    torch.testing.assert_close(algo.next_old_policy(old, current, 100)["w"], torch.tensor([2.8, 5.6]))
    torch.testing.assert_close(algo.next_old_policy(old, current, 0)["w"], current["w"])


# ----------------------------------------------------------------------------------------
# Config


def test_defaults_are_the_references():
    """NVlabs/DiffusionNFT 24af555, SD3.5 config (zoo/nft.py cites each line)."""
    c = NFTConfig()
    assert (c.beta, c.adv_clip_max, c.kl_weight, c.group_size) == (1.0, 5.0, 1e-4, 24)
    assert (c.old_policy_decay_delay, c.old_policy_decay_rate, c.old_policy_decay_max) == (0, 0.001, 0.5)
    assert (c.lora_rank, c.lora_alpha, c.num_steps, c.guidance_scale, c.eta) == (32, 64.0, 10, 1.0, 0.0)
    assert (c.learning_rate, c.weight_decay, c.max_grad_norm) == (3e-4, 1e-4, 1.0)
    assert c.loss_calls_per_update == 16 * 10 and not c.reads_log_probs
    algorithm = c.build()
    needs = algorithm.needs
    assert isinstance(algorithm, ForwardProcessAlgorithm) and algorithm.needs_old_policy
    assert needs.group_size == 24 and not needs.shared_noise
    assert not needs.same_step_order_in_group


@pytest.mark.parametrize("field, value", [
    ("beta", 0.0), ("beta", -1.0), ("adv_clip_max", 0.0), ("kl_weight", -1e-4), ("group_size", 0),
    ("old_policy_decay_delay", -1), ("old_policy_decay_rate", -0.1), ("old_policy_decay_max", 1.0),
    ("old_policy_decay_max", -0.1), ("eta", -1.0),
])
def test_impossible_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        NFTConfig(**{field: value})


def test_deterministic_ddim_is_accepted():
    assert NFTConfig(sampler="ddim", eta=0.0).eta == 0.0


# ----------------------------------------------------------------------------------------
# The runner's forward-process path on the tiny pipeline


def _flat(weights) -> torch.Tensor:
    return torch.cat([w.detach().flatten() for w in weights])


def test_an_epoch_trains_on_noised_final_latents_under_old_and_current_weights_without_cfg(tiny_pipeline_dir):
    """`train_on_batch` with NFT (K = 3, 2 groups of 2, one group per minibatch) over
    trajectories sampled with CFG 3, their log-probs set to NaN (never read), an old policy
    0.05-perturbed from the current weights and lr 0. Each loss call makes three UNet calls,
    all at guidance 1: under the old weights, under the base (adapter disabled, checked
    against a recomputation) and under the current weights; its inputs are those outputs.
    Each x_t is sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε of the final latent of the trajectory whose
    prompt it carries, at the sampler's timestep of one of its steps, with that step's ᾱ and
    advantage; every (trajectory, step) is trained once, each with its own noise; the
    current weights are back after every call."""
    config = NFTConfig(num_steps=3, group_size=2, train_batch_size=1, gradient_accumulation_steps=1,
                       guidance_scale=3.0, eta=1.0, lora_rank=4, lora_alpha=4.0)
    recorder = ForwardRecorder(config.build())
    policy = policy_with_random_adapter(tiny_pipeline_dir)
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 3, 1.0, 3.0))
    generator = torch.Generator().manual_seed(0)
    traj = sampler.sample(["a cat", "a dog"], group_size=2, generator=generator)
    traj.log_probs = torch.full_like(traj.log_probs, math.nan)
    with torch.no_grad():  # x0: the latent each trajectory's image decodes
        torch.testing.assert_close(policy.decode(traj.final_latents.flatten(0, 1)), traj.images.flatten(0, 1))
    advantages = torch.rand(2, 2, 3, generator=generator)
    current = policy.trainable_state()
    old = {name: w + 0.05 * torch.randn(w.shape, generator=generator) for name, w in current.items()}

    calls = []
    real_predict = policy.predict

    def predict(latents, timesteps, embeds, guidance_scale, guidance_embedding):
        output = real_predict(latents, timesteps, embeds, guidance_scale, guidance_embedding)
        # By name: peft marks a disabled adapter's weights as not trainable.
        lora = [param for name, param in policy.unet.named_parameters() if "lora" in name]
        calls.append(SimpleNamespace(latents=latents, timesteps=timesteps, embeds=embeds, guidance=guidance_scale,
                                     weights=_flat(lora), output=output.detach()))
        return output

    policy.predict = predict
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0)
    accelerator = Accelerator(cpu=True)
    policy.denoiser, optimizer = accelerator.prepare(policy.unet, optimizer)
    metrics, counts = train_on_batch(recorder, config, sampler, traj, advantages, optimizer, accelerator,
                                   EpochContext(0, 1, generator), TrainLoop(), False, old)

    assert counts == {"optimizer_updates": 2, "backward_passes": 6} and len(recorder.inputs) == 6
    assert len(calls) == 18 and {call.guidance for call in calls} == {1.0}
    assert math.isfinite(metrics["loss"]) and metrics["old_deviation"] > 0 and metrics["ref_deviation"] > 0
    flat_old, flat_current = _flat(old.values()), _flat(current.values())
    assert not torch.equal(flat_old, flat_current)
    schedule = sampler.kernel
    seen = torch.zeros(2, 2, 3, dtype=torch.long)
    noises = []
    for inputs, (old_call, ref_call, current_call) in zip(recorder.inputs, zip(*[iter(calls)] * 3)):
        assert torch.equal(old_call.weights, flat_old) and torch.equal(current_call.weights, flat_current)
        assert torch.equal(ref_call.weights, flat_current)
        torch.testing.assert_close(inputs.old_prediction.flatten(0, 1), old_call.output, rtol=0, atol=0)
        torch.testing.assert_close(inputs.ref_prediction.flatten(0, 1), ref_call.output, rtol=0, atol=0)
        torch.testing.assert_close(inputs.prediction.detach().flatten(0, 1), current_call.output, rtol=0, atol=0)
        with torch.no_grad(), policy.reference():
            base = real_predict(ref_call.latents, ref_call.timesteps, ref_call.embeds, 1.0)
        torch.testing.assert_close(ref_call.output, base, rtol=0, atol=0)
        assert torch.equal(old_call.latents, current_call.latents) and torch.equal(old_call.latents, ref_call.latents)
        for i, (x_t, t, embed) in enumerate(zip(current_call.latents, current_call.timesteps, current_call.embeds)):
            group = next(p for p in range(2) if torch.equal(embed, traj.prompt_embeds[p]))
            member, step = i % 2, int((schedule.timesteps == t).nonzero())
            alpha, noise = schedule.alpha_t[step].float(), inputs.target.flatten(0, 1)[i]
            assert float(inputs.x0_scale.flatten()[i]) == pytest.approx(float(((1 - alpha) / alpha).sqrt()), rel=1e-6)
            x0 = traj.final_latents[group, member]
            torch.testing.assert_close(x_t, alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise, rtol=0, atol=1e-6)
            assert float(inputs.advantages.flatten()[i]) == float(advantages[group, member, step])
            seen[group, member, step] += 1
            noises.append(noise)
    assert (seen == 1).all()
    assert min((a - b).abs().max() for j, a in enumerate(noises) for b in noises[:j]) > 0.1
    assert torch.equal(_flat(policy.trainable_parameters()), flat_current)


def test_runs_sample_with_the_old_policy_and_a_resume_restores_it(tiny_pipeline_dir, tmp_path, monkeypatch):
    """`run_algorithm` on deterministic DDIM (eta 0: NaN log-probs), 2 epochs of 2 groups
    of 2 trajectories at K = 2, one group per minibatch: 2 updates per epoch. With decay
    rate 0.2 the old policy after epoch 1 (2 steps) is 0.4·(the initial weights) + 0.6·(the
    weights after epoch 1), and epoch 2 samples with it, not with the current weights. A
    run stopped after epoch 1's checkpoint and resumed ends with the old policy, LoRA,
    counters and records of the uninterrupted run, and samples epoch 2 with the same
    weights (a resume that restarted the old policy from the current weights would not).
    After epoch 2 (4 steps: 0.8, capped at 0.5) the old policy is the mean of the old one
    and the current weights."""
    config = NFTConfig(num_steps=2, group_size=2, train_batch_size=1, gradient_accumulation_steps=1, eta=0.0,
                       learning_rate=3e-2, old_policy_decay_rate=0.2, lora_rank=4, lora_alpha=4.0)
    accelerator = Accelerator(cpu=True)
    sampled_with: dict[str, list[dict]] = {"straight": [], "resumed": []}
    real_sample = benchmarks.train.sample_and_score

    def run(name: str) -> dict:
        out = tmp_path / name

        def sample_and_score(algorithm, sampler, *args):
            sampled_with[name].append(sampler.policy.trainable_state())
            return real_sample(algorithm, sampler, *args)

        monkeypatch.setattr(benchmarks.train, "sample_and_score", sample_and_score)
        run_algorithm("nft", config, 0, micro_job(tiny_pipeline_dir, out, 2), Brightness(),
                      {"brightness": Brightness()}, accelerator)
        return load_state(checkpoint_path(out, "nft", 0))

    straight = run("straight")
    real_save = benchmarks.train.save_state
    first = {}

    class Stop(Exception):
        pass

    def save_then_stop(path, state):
        real_save(path, state)
        if state["epoch"] == 1:
            first.update(state)
            raise Stop

    monkeypatch.setattr(benchmarks.train, "save_state", save_then_stop)
    with pytest.raises(Stop):
        run("resumed")
    monkeypatch.setattr(benchmarks.train, "save_state", real_save)
    resumed = run("resumed")

    assert straight["done"] and resumed["done"] and straight["counters"]["optimizer_updates"] == 4
    initial, epoch2 = sampled_with["straight"]
    trained = {name: first["lora"][name.replace(".default.", ".")] for name in initial}  # after epoch 1
    assert max(float((trained[n] - initial[n]).abs().max()) for n in initial) > 1e-3  # epoch 1 trained
    for name in initial:
        torch.testing.assert_close(first["old_policy"][name], 0.4 * initial[name] + 0.6 * trained[name])
        assert torch.equal(epoch2[name], first["old_policy"][name])
    assert max(float((epoch2[n] - trained[n]).abs().max()) for n in initial) > 1e-4  # old != current
    for name in initial:
        final = straight["lora"][name.replace(".default.", ".")]
        torch.testing.assert_close(straight["old_policy"][name], 0.5 * epoch2[name] + 0.5 * final)
    assert straight["old_policy"].keys() == resumed["old_policy"].keys() == initial.keys()
    for name in initial:
        assert torch.equal(resumed["old_policy"][name], straight["old_policy"][name])
        assert torch.equal(sampled_with["resumed"][-1][name], epoch2[name])
    for key in straight["lora"]:
        assert torch.equal(resumed["lora"][key], straight["lora"][key]), key
    without_time = lambda rows: [{k: v for k, v in row.items() if k != "wall_time"} for row in rows]  # noqa: E731
    assert without_time(resumed["records"]) == without_time(straight["records"])
    assert {k: v for k, v in resumed["counters"].items() if k != "wall_time"} == \
        {k: v for k, v in straight["counters"].items() if k != "wall_time"}
