"""The samplers' log-probs: exact re-scoring, the Gaussian they claim, and diffusers parity."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler

from zoo.loading import load_policy
from zoo.policy import Policy
from zoo.unet_policy import UNetPolicy
from zoo.kernels import SamplerConfig, SamplerConfigError
from zoo.sampling import TrajectorySampler

PROMPTS = ["a red circle on a white background", "a blue square on a black background"]


@pytest.fixture(scope="module")
def ddim_policy(tiny_pipeline_dir) -> Policy:
    return load_policy(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def lcm_policy(tiny_lcm_pipeline_dir) -> Policy:
    return load_policy(tiny_lcm_pipeline_dir)


def _rescored_log_probs(sampler: TrajectorySampler, traj) -> torch.Tensor:
    """Re-score every stored transition in one call per step, as the trainer does."""
    p, g, k = traj.log_probs.shape
    embeds = traj.prompt_embeds.repeat_interleave(g, dim=0)
    out = torch.empty(p, g, k)
    with torch.no_grad():
        for step in range(k):
            latents = traj.latents[:, :, step].reshape(p * g, *traj.latents.shape[3:])
            nxt = traj.next_latents[:, :, step].reshape(p * g, *traj.latents.shape[3:])
            index = torch.full((p * g,), step, dtype=torch.long)
            out[:, :, step] = sampler.log_prob(latents, index, nxt, embeds).reshape(p, g)
    return out


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "kind,guidance,spacing",
    [("ddim", 1.0, None), ("ddim", 4.0, None), ("lcm", 8.0, None), ("lcm", 8.0, "skipping")],
    ids=["ddim-nocfg", "ddim-cfg", "lcm", "lcm-skipping"],
)
def test_rescoring_gives_ratio_one(request, kind, guidance, spacing, num_steps):
    policy = request.getfixturevalue("lcm_policy" if kind == "lcm" else "ddim_policy")
    config = SamplerConfig(kind=kind, num_steps=num_steps, guidance_scale=guidance, timestep_spacing=spacing)
    sampler = TrajectorySampler(policy, config)
    traj = sampler.sample(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(0))
    assert traj.log_probs.shape == (2, 2, num_steps)
    assert torch.isfinite(traj.log_probs).all()
    ratio = torch.exp(_rescored_log_probs(sampler, traj) - traj.log_probs)
    assert (ratio - 1).abs().max().item() <= 1e-6


def test_log_prob_is_the_mean_gaussian_density(ddim_policy):
    """Recompute step k of a DDIM trajectory from the published formulas with the
    scheduler's ᾱ table, and compare to torch.distributions.Normal averaged over elements."""
    num_steps, eta, guidance = 4, 1.0, 3.0
    sampler = TrajectorySampler(ddim_policy, SamplerConfig("ddim", num_steps, eta, guidance))
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(1))
    alphas = DDIMScheduler.from_config(ddim_policy.scheduler_config).alphas_cumprod.double()
    embeds = traj.prompt_embeds
    uncond = ddim_policy.encode_prompts([""]).expand(len(PROMPTS), -1, -1)
    for k in range(num_steps):
        t = int(traj.timesteps[0, 0, k])
        prev = t - 1000 // num_steps
        a_t = alphas[t]
        a_prev = alphas[prev] if prev >= 0 else alphas[0]
        x = traj.latents[:, 0, k]
        with torch.no_grad():
            tt = torch.full((len(PROMPTS),), t)
            e_c = ddim_policy.unet(x, tt, encoder_hidden_states=embeds).sample
            e_u = ddim_policy.unet(x, tt, encoder_hidden_states=uncond).sample
        eps = (e_u + guidance * (e_c - e_u)).double()
        x0 = (x.double() - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps
        expected = torch.distributions.Normal(mean, sigma).log_prob(traj.next_latents[:, 0, k].double())
        expected = expected.flatten(1).mean(1)
        torch.testing.assert_close(traj.log_probs[:, 0, k].double(), expected, rtol=0, atol=2e-5)


def test_trailing_spacing_starts_at_the_top(ddim_policy):
    for k, first in [(1, 999), (2, 999), (4, 999)]:
        sampler = TrajectorySampler(ddim_policy, SamplerConfig("ddim", k))
        assert int(sampler.kernel.timesteps[0]) == first
    eight = TrajectorySampler(ddim_policy, SamplerConfig("ddim", 8)).kernel.timesteps
    assert eight.tolist() == [999, 874, 749, 624, 499, 374, 249, 124]


def test_ddim_spacing_overrides_the_model_config(ddim_policy):
    """A "leading" config (Stable Diffusion 1.5's) starts 1 and 2 steps at t = 1 and
    501, 1; `timestep_spacing="trailing"` starts them at the top whatever the config says."""
    leading = UNetPolicy(ddim_policy.unet, ddim_policy.vae, ddim_policy.text_encoder, ddim_policy.tokenizer,
                         {**ddim_policy.scheduler_config, "timestep_spacing": "leading", "steps_offset": 1})
    for k, own, trailing in [(1, [1], [999]), (2, [501, 1], [999, 499])]:
        assert TrajectorySampler(leading, SamplerConfig("ddim", k)).kernel.timesteps.tolist() == own
        config = SamplerConfig("ddim", k, timestep_spacing="trailing")
        assert TrajectorySampler(leading, config).kernel.timesteps.tolist() == trailing
    fifty = TrajectorySampler(leading, SamplerConfig("ddim", 50, timestep_spacing="trailing")).kernel
    assert fifty.timesteps[0] == 999 and fifty.timesteps[-1] == 19
    alphas = DDIMScheduler.from_config(ddim_policy.scheduler_config).alphas_cumprod.double()
    assert fifty.alpha_prev[0] == alphas[979] and fifty.alpha_prev[-1] == alphas[0]


def test_lcm_skipping_spacing_is_rlcms_rule(lcm_policy):
    """rlcm lcm_rl_pytorch/diffusers_patch/lcm_scheduler.py:377-382: every (50 // K)-th of
    the distillation timesteps 19, 39, ..., 999 from the top; diffusers' LCMScheduler
    (None) takes floor(linspace) indices instead, which differ from K = 4 on."""
    def timesteps(k, spacing):
        config = SamplerConfig("lcm", k, guidance_scale=8.0, timestep_spacing=spacing)
        return TrajectorySampler(lcm_policy, config).kernel.timesteps.tolist()

    assert timesteps(8, "skipping") == [999, 879, 759, 639, 519, 399, 279, 159]
    assert timesteps(8, None) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert timesteps(4, "skipping") == [999, 759, 519, 279]
    assert timesteps(2, "skipping") == timesteps(2, None) == [999, 499]
    assert timesteps(1, "skipping") == [999]
    schedule = TrajectorySampler(lcm_policy, SamplerConfig("lcm", 8, timestep_spacing="skipping")).kernel
    alphas = LCMScheduler.from_config(lcm_policy.scheduler_config).alphas_cumprod.double()
    assert schedule.alpha_prev.tolist() == alphas[[879, 759, 639, 519, 399, 279, 159, 0]].tolist()
    with pytest.raises(SamplerConfigError, match="--steps 51"):
        TrajectorySampler(lcm_policy, SamplerConfig("lcm", 51, timestep_spacing="skipping"))


@pytest.mark.parametrize("kind,spacing", [("lcm", "trailing"), ("ddim", "skipping"), ("ddim", "last")])
def test_a_spacing_of_another_sampler_is_refused(kind, spacing):
    with pytest.raises(SamplerConfigError, match="timestep spacing"):
        SamplerConfig(kind, 4, timestep_spacing=spacing).validate(for_training=False)


def test_ddim_mean_at_eta_zero_equals_diffusers_step(ddim_policy):
    num_steps = 4
    sampler = TrajectorySampler(ddim_policy, SamplerConfig("ddim", num_steps, eta=0.0))
    reference = DDIMScheduler.from_config(ddim_policy.scheduler_config)
    reference.set_timesteps(num_steps)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, *ddim_policy.latent_shape, generator=gen)
    embeds = ddim_policy.encode_prompts(PROMPTS)
    for k in range(num_steps):
        index = torch.full((2,), k, dtype=torch.long)
        with torch.no_grad():
            mean, std, pred_x0 = sampler.transition(x, index, embeds)
            eps = ddim_policy.unet(x, reference.timesteps[k], encoder_hidden_states=embeds).sample
        out = reference.step(eps, reference.timesteps[k], x, eta=0.0)
        assert float(std.abs().max()) == 0.0
        torch.testing.assert_close(mean, out.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pred_x0, out.pred_original_sample, rtol=1e-5, atol=1e-5)
        x = mean


def test_lcm_denoised_equals_diffusers_step(lcm_policy):
    from zoo.kernels import lcm_transition

    num_steps, guidance = 4, 8.0
    sampler = TrajectorySampler(lcm_policy, SamplerConfig("lcm", num_steps, guidance_scale=guidance))
    reference = LCMScheduler.from_config(lcm_policy.scheduler_config)
    reference.set_timesteps(num_steps)
    assert sampler.kernel.timesteps.tolist() == reference.timesteps.tolist()
    x = torch.randn(2, *lcm_policy.latent_shape, generator=torch.Generator().manual_seed(3))
    embeds = lcm_policy.encode_prompts(PROMPTS)
    s = sampler.kernel
    for k in range(num_steps):
        t = reference.timesteps[k]
        with torch.no_grad():
            eps = lcm_policy.predict(x, torch.full((2,), int(t)), embeds, guidance, guidance_embedding=True)
        expected = reference.step(eps, t, x).denoised
        ones = torch.ones(2, dtype=torch.float64)
        _, _, _, denoised = lcm_transition(
            eps, x, s.alpha_t[k] * ones, s.alpha_prev[k] * ones, s.c_skip[k] * ones, s.c_out[k] * ones
        )
        torch.testing.assert_close(denoised, expected, rtol=1e-5, atol=1e-5)
        x = reference.step(eps, t, x).prev_sample if k < num_steps - 1 else x


def test_lcm_guidance_embedding_changes_the_prediction(lcm_policy):
    x = torch.randn(1, *lcm_policy.latent_shape, generator=torch.Generator().manual_seed(4))
    embeds = lcm_policy.encode_prompts(PROMPTS[:1])
    t = torch.tensor([999])
    with torch.no_grad():
        low = lcm_policy.predict(x, t, embeds, 2.0, guidance_embedding=True)
        high = lcm_policy.predict(x, t, embeds, 8.0, guidance_embedding=True)
    assert (low - high).abs().max() > 1e-4


def test_groups_share_or_do_not_share_initial_noise(ddim_policy):
    sampler = TrajectorySampler(ddim_policy, SamplerConfig("ddim", 4))
    shared = sampler.sample(PROMPTS, group_size=2, shared_noise=True, generator=torch.Generator().manual_seed(5))
    x_t = shared.latents[:, :, 0]
    torch.testing.assert_close(x_t[:, 0], x_t[:, 1], rtol=0, atol=0)
    assert (shared.next_latents[:, 0, -1] - shared.next_latents[:, 1, -1]).abs().mean() > 1e-2
    assert not torch.equal(x_t[0, 0], x_t[1, 0])  # different prompts get different noise
    indep = sampler.sample(PROMPTS, group_size=2, shared_noise=False, generator=torch.Generator().manual_seed(5))
    assert (indep.latents[:, 0, 0] - indep.latents[:, 1, 0]).abs().mean() > 1e-1


def test_trajectory_fields_chain_and_images_are_in_range(ddim_policy):
    sampler = TrajectorySampler(ddim_policy, SamplerConfig("ddim", 3, guidance_scale=2.0))
    traj = sampler.sample(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(6), record_pred_x0=True)
    torch.testing.assert_close(traj.latents[:, :, 1:], traj.next_latents[:, :, :-1], rtol=0, atol=0)
    assert traj.pred_x0.shape == traj.latents.shape
    assert traj.images.shape == (2, 2, 3, 32, 32)
    assert traj.images.min() >= 0 and traj.images.max() <= 1
    again = sampler.sample(PROMPTS, group_size=2, generator=torch.Generator().manual_seed(6), record_pred_x0=True)
    torch.testing.assert_close(again.next_latents, traj.next_latents, rtol=0, atol=0)


def test_eta_zero_is_refused_for_training():
    with pytest.raises(SamplerConfigError, match="--eta 0"):
        SamplerConfig("ddim", 4, eta=0.0).validate(for_training=True)
    SamplerConfig("ddim", 4, eta=0.0).validate(for_training=False)  # evaluation may use it


@pytest.mark.parametrize(
    "config,flag", [(SamplerConfig(num_steps=0), "--steps"), (SamplerConfig(guidance_scale=0.5), "--guidance")]
)
def test_bad_sampler_settings_name_their_flag(config, flag):
    with pytest.raises(SamplerConfigError, match=flag):
        config.validate(for_training=True)


def test_reference_log_probs_equal_current_before_training(tiny_pipeline_dir):
    from zoo.loading import load_policy
    from zoo.policy import LoraSettings

    policy = load_policy(tiny_pipeline_dir, lora=LoraSettings(rank=2, alpha=2))
    sampler = TrajectorySampler(policy, SamplerConfig("ddim", 2))
    # A fresh LoRA has B = 0, so base and adapted policies coincide.
    traj = sampler.sample(PROMPTS, generator=torch.Generator().manual_seed(7), reference_log_probs=True)
    torch.testing.assert_close(traj.ref_log_probs, traj.log_probs, rtol=0, atol=1e-6)
    assert math.isfinite(float(traj.ref_log_probs.sum()))


def test_lcm_transition_is_diffusers_step_with_the_same_noise(lcm_policy):
    """Each LCM transition is N(sqrt(ᾱ_t') · denoised, 1 - ᾱ_t') with t' the next timestep of
    the schedule: with the noise diffusers' LCMScheduler draws, mean + std · z is its
    prev_sample at every step but the last. At the last step ᾱ_t' is ᾱ of timestep 0 (the
    documented deviation: diffusers returns `denoised` without noise)."""
    num_steps, guidance = 4, 8.0
    sampler = TrajectorySampler(lcm_policy, SamplerConfig("lcm", num_steps, guidance_scale=guidance))
    reference = LCMScheduler.from_config(lcm_policy.scheduler_config)
    reference.set_timesteps(num_steps)
    alphas = reference.alphas_cumprod.double()
    x = torch.randn(2, *lcm_policy.latent_shape, generator=torch.Generator().manual_seed(8))
    embeds = lcm_policy.encode_prompts(PROMPTS)
    for k in range(num_steps):
        t = reference.timesteps[k]
        with torch.no_grad():
            mean, std, _ = sampler.transition(x, torch.full((2,), k, dtype=torch.long), embeds)
            eps = lcm_policy.predict(x, torch.full((2,), int(t)), embeds, guidance, guidance_embedding=True)
        out = reference.step(eps, t, x, generator=torch.Generator().manual_seed(10 + k))
        if k < num_steps - 1:
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(10 + k))
            a_prev = alphas[reference.timesteps[k + 1]]
            torch.testing.assert_close(std, torch.full((2,), float((1 - a_prev).sqrt())), rtol=1e-6, atol=0)
            torch.testing.assert_close(mean + std.view(-1, 1, 1, 1) * z, out.prev_sample, rtol=1e-5, atol=1e-5)
            x = out.prev_sample
        else:
            torch.testing.assert_close(std, torch.full((2,), float((1 - alphas[0]).sqrt())), rtol=1e-6, atol=0)
            torch.testing.assert_close(mean, float(alphas[0].sqrt()) * out.denoised, rtol=1e-5, atol=1e-6)


def test_sampled_transitions_use_the_given_noise_at_full_scale(ddim_policy):
    """x_T is `initial_noise` and every x_t' is mean + std · z with z the given step noise
    (the log-prob's Gaussian is the one actually sampled from, not a narrower one)."""
    num_steps = 3
    sampler = TrajectorySampler(ddim_policy, SamplerConfig("ddim", num_steps, eta=1.0, guidance_scale=2.0))
    generator = torch.Generator().manual_seed(9)
    initial = torch.randn(2, 1, *ddim_policy.latent_shape, generator=generator)
    step_noise = torch.randn(2, 1, num_steps, *ddim_policy.latent_shape, generator=generator)
    traj = sampler.sample(PROMPTS, initial_noise=initial, step_noise=step_noise)
    torch.testing.assert_close(traj.latents[:, 0, 0], initial[:, 0], rtol=0, atol=0)
    for k in range(num_steps):
        with torch.no_grad():
            mean, std, _ = sampler.transition(traj.latents[:, 0, k], torch.full((2,), k), traj.prompt_embeds)
        assert float(std.min()) > 0.01
        expected = mean + std.view(-1, 1, 1, 1) * step_noise[:, 0, k]
        torch.testing.assert_close(traj.next_latents[:, 0, k], expected, rtol=1e-5, atol=1e-6)
