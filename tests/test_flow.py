"""The flow-matching sampler and policy: worked numbers of the SDE step, agreement with
diffusers (the scheduler's Euler step, the whole SD3 pipeline's ODE sample), exact
re-scoring of stored transitions, and the LoRA's round trip through plain diffusers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from zoo.flow_policy import FLOW_LORA_TARGETS, FlowPolicy
from zoo.loading import load_policy
from zoo.policy import LoraSettings
from zoo.kernels import FLOW_SDES, dance_flow_transition, flow_transition, gaussian_log_prob
from zoo.kernels import SamplerConfig, SamplerConfigError
from zoo.sampling import TrajectorySampler
from zoo.tiny.flow import T5_TOKENS, build_random_flow_pipeline

from helpers.policies import SHAPE_PROMPTS, assert_rescoring_gives_ratio_one


@pytest.fixture(scope="module")
def flow_folder(tmp_path_factory) -> str:
    return str(build_random_flow_pipeline(tmp_path_factory.mktemp("flow") / "pipeline", seed=3))


@pytest.fixture(scope="module")
def flow_policy(flow_folder) -> FlowPolicy:
    return load_policy(flow_folder)


def test_sde_step_worked_numbers():
    """σ = 0.75 -> 0.5, a = 0.7, x = 1, v = 2: std_σ = 0.7·sqrt(3) = 1.2124, dt = -0.25,
    mean = 1·(1 - 1.47/1.5·0.25) + 2·(1 + 1.47·0.25/1.5)·(-0.25) = 0.755 - 0.6225 = 0.1325,
    std = 1.2124·0.5 = 0.6062, x̂0 = 1 - 0.75·2 = -0.5."""
    one = torch.ones(1)
    mean, std, pred_x0 = flow_transition(2 * one.view(1, 1, 1, 1), one.view(1, 1, 1, 1), 0.75 * one, 0.5 * one,
                                         0.5 * one, 0.7)
    assert mean.item() == pytest.approx(0.1325, abs=1e-6)
    assert std.item() == pytest.approx(0.7 * math.sqrt(3) * 0.5, abs=1e-6)
    assert pred_x0.item() == pytest.approx(-0.5, abs=1e-6)


def test_sde_step_replaces_sigma_one_by_the_second_sigma():
    """At σ = 1 the std's denominator 1 - σ is 1 - σ_max: σ_max = 0.6, a = 0.5 gives
    std_σ = 0.5·sqrt(1/0.4) and std = std_σ·sqrt(0.4) = 0.5."""
    one = torch.ones(1)
    _, std, _ = flow_transition(one.view(1, 1, 1, 1), one.view(1, 1, 1, 1), one, 0.6 * one, 0.6 * one, 0.5)
    assert std.item() == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("sde", FLOW_SDES)
def test_noise_level_zero_is_the_schedulers_euler_step(sde):
    """Flow-GRPO's and DanceGRPO's SDEs at noise level 0 are both diffusers' Euler step."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for k in range(4):
        expected = scheduler.step(v, scheduler.timesteps[k], x).prev_sample
        sigma, sigma_next = scheduler.sigmas[k].expand(2), scheduler.sigmas[k + 1].expand(2)
        if sde == "flow-grpo":
            mean, std, _ = flow_transition(v, x, sigma, sigma_next, scheduler.sigmas[1].expand(2), 0.0)
        else:
            mean, std, _ = dance_flow_transition(v, x, sigma, sigma_next, 0.0)
        assert torch.equal(std, torch.zeros(2))
        torch.testing.assert_close(mean, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ode_sample_is_the_diffusers_pipelines(flow_policy, guidance):
    """Noise level 0 from the same x_T reproduces StableDiffusion3Pipeline's latents: its
    prompt encoding, timesteps, guidance and Euler steps."""
    for steps in (1, 2, 4):
        sampler = TrajectorySampler(flow_policy, SamplerConfig("flow", steps, eta=0.0, guidance_scale=guidance))
        x_t = sampler.initial_noise(2, 1, False, torch.Generator().manual_seed(steps))
        traj = sampler.sample(SHAPE_PROMPTS, initial_noise=x_t)
        ours = traj.next_latents[:, 0, -1]
        theirs = flow_policy.pipeline(
            SHAPE_PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=x_t[:, 0].clone(),
            output_type="latent", max_sequence_length=T5_TOKENS, height=32, width=32,
        ).images
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_rescoring_a_stored_transition_gives_ratio_one(flow_policy, guidance):
    """|exp(logp - stored) - 1| <= 1e-6 at K = 1, 2, 4, 8, in float32."""
    for steps in (1, 2, 4, 8):
        assert_rescoring_gives_ratio_one(flow_policy, SamplerConfig("flow", steps, eta=0.7, guidance_scale=guidance))


def test_stored_log_prob_is_the_gaussian_density(flow_policy):
    """The recorded log-prob is N(mean, std²) of x_σ' averaged over elements, with the mean
    and std of `flow_transition` (worked above) at the stored state."""
    sampler = TrajectorySampler(flow_policy, SamplerConfig("flow", 2, eta=0.7))
    traj = sampler.sample(SHAPE_PROMPTS[:1], generator=torch.Generator().manual_seed(0))
    mean, std, _ = sampler.transition(traj.latents[:, 0, 1], torch.ones(1, dtype=torch.long), traj.prompt_embeds)
    expected = gaussian_log_prob(traj.next_latents[:, 0, 1], mean, std)
    torch.testing.assert_close(traj.log_probs[:, 0, 1], expected, rtol=0, atol=0)
    assert std.item() > 0


def test_training_refuses_the_deterministic_flow():
    with pytest.raises(SamplerConfigError, match="--eta 0.*flow.*--eta 0.7"):
        SamplerConfig("flow", 4, eta=0.0).validate(for_training=True)


def test_a_sampler_of_the_other_family_is_refused(flow_policy):
    with pytest.raises(SamplerConfigError, match="--sampler ddim needs an ε-prediction UNet.*--sampler flow"):
        TrajectorySampler(flow_policy, SamplerConfig("ddim", 4))


def test_pooled_projection_rides_as_the_last_row(flow_policy):
    embeds = flow_policy.encode_prompts(SHAPE_PROMPTS)
    ref, _, pooled, _ = flow_policy.pipeline.encode_prompt(SHAPE_PROMPTS, SHAPE_PROMPTS, None,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=T5_TOKENS)
    assert torch.equal(embeds[:, :-1], ref)
    assert torch.equal(embeds[:, -1, : pooled.shape[1]], pooled)


def test_lora_round_trip_through_diffusers(flow_folder, tmp_path):
    """The exported adapter, loaded by plain diffusers' `load_lora_weights`, gives the
    pipeline's transformer the policy's predictions; and `load_lora` restores it."""
    lora = LoraSettings(rank=4, alpha=4.0, target_modules=FLOW_LORA_TARGETS)
    policy = load_policy(flow_folder, lora=lora)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.save_lora(tmp_path)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *policy.latent_shape, generator=generator)
    t = torch.tensor([1000.0, 500.0])
    embeds = policy.encode_prompts(SHAPE_PROMPTS)
    with torch.no_grad():
        ours = policy.predict(latents, t, embeds, 1.0)
        with policy.reference():
            base = policy.predict(latents, t, embeds, 1.0)
    assert (ours - base).abs().max() > 1e-3

    pipe = StableDiffusion3Pipeline.from_pretrained(flow_folder, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(tmp_path)
    pooled_dim = pipe.transformer.config.pooled_projection_dim
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds[:, :-1],
                                  pooled_projections=embeds[:, -1, :pooled_dim]).sample
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    fresh = load_policy(flow_folder, lora=lora)
    fresh.load_lora(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(latents, t, embeds, 1.0), ours, rtol=0, atol=0)


def test_forward_process_is_the_rectified_flow_path(flow_policy):
    """x_σ = (1-σ)·x0 + σ·ε at step k's σ, target v = ε - x0, x0_scale σ: x_σ - σ·v = x0."""
    sampler = TrajectorySampler(flow_policy, SamplerConfig("flow", 4, eta=0.7))
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, *flow_policy.latent_shape, generator=generator), torch.randn(2, 3, *flow_policy.latent_shape, generator=generator)
    steps = torch.tensor([[0, 1, 2], [3, 2, 1]])
    x_t, timesteps, target, scale = sampler.forward_process(x0, noise, steps)
    sigma = sampler.kernel.sigma[steps].float()
    torch.testing.assert_close(scale, sigma)
    torch.testing.assert_close(timesteps, sampler.kernel.timesteps[steps])
    torch.testing.assert_close(x_t, (1 - sigma)[..., None, None, None] * x0 + sigma[..., None, None, None] * noise)
    torch.testing.assert_close(x_t - sigma[..., None, None, None] * target, x0, rtol=0, atol=1e-6)


def test_nft_loss_on_flow_inputs_is_the_x0_loss_of_the_velocity():
    """NFT's loss from flow inputs equals the reference written in x̂0 = x_σ - σ·v̂ directly:
    (clip/β)·mean(p·ℓ(v⁺) + (1-p)·ℓ(v⁻)), ℓ(v) = mean((x̂0(v) - x0)²) / sg(mean|x̂0(v) - x0|)."""
    from zoo.algorithm import ForwardLossInputs
    from zoo.nft import NFTConfig

    generator = torch.Generator().manual_seed(2)
    shape = (1, 3, 4, 2, 2)
    x0, eps = torch.randn(shape, generator=generator, dtype=torch.float64), torch.randn(shape, generator=generator, dtype=torch.float64)
    old, theta = torch.randn(shape, generator=generator, dtype=torch.float64), torch.randn(shape, generator=generator, dtype=torch.float64)
    sigma = torch.tensor([[0.2, 0.6, 0.9]], dtype=torch.float64)
    optimality = torch.tensor([[0.8, 0.5, 0.1]], dtype=torch.float64)
    s = sigma[..., None, None, None]
    x_t = (1 - s) * x0 + s * eps
    theta = theta.requires_grad_()

    def x0_loss(v):
        error = x_t - s * v - x0
        return (error**2).mean(dim=(2, 3, 4)) / error.abs().mean(dim=(2, 3, 4)).clamp(min=1e-5).detach()

    beta, clip = 0.5, 5.0
    positive, negative = (1 - beta) * old + beta * theta, (1 + beta) * old - beta * theta
    reference = clip / beta * (optimality * x0_loss(positive) + (1 - optimality) * x0_loss(negative)).mean()
    algo = NFTConfig(beta=beta, adv_clip_max=clip, kl_weight=0.0).build()
    loss, _ = algo.loss(ForwardLossInputs(prediction=theta, old_prediction=old, target=eps - x0, x0_scale=sigma,
                                          advantages=optimality))
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=0)


def test_rescoring_is_exact_in_bf16_too(flow_folder):
    """Under the mixed precision used for training (bf16 weights and autocast, float32
    log-prob arithmetic), re-scoring a stored transition still gives ratio 1."""
    policy = load_policy(flow_folder, mixed_precision="bf16", lora=LoraSettings(target_modules=FLOW_LORA_TARGETS))
    assert policy.transformer.dtype == torch.bfloat16
    sampler = TrajectorySampler(policy, SamplerConfig("flow", 2, eta=0.7, guidance_scale=4.5))
    traj = sampler.sample(SHAPE_PROMPTS, generator=torch.Generator().manual_seed(1))
    assert traj.log_probs.dtype == torch.float32
    for k in range(2):
        logp = sampler.log_prob(traj.latents[:, 0, k], torch.full((2,), k), traj.next_latents[:, 0, k], traj.prompt_embeds)
        assert (torch.exp(logp - traj.log_probs[:, 0, k]) - 1).abs().max().item() <= 1e-6
