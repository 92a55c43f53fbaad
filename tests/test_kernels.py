"""The transition kernels as the family adapters build them (`Policy.kernel`), and their
per-step noise levels: a level given per sample gives the bits a number gives, and a step at
level 0 is that kernel's ODE step while every other step is untouched."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels import (
    DanceGRPOKernel, DDIMKernel, FlowGRPOKernel, LCMKernel, SamplerConfig, dance_flow_transition, ddim_transition,
    flow_transition,
)
from zoo.loading import load_policy
from zoo.sampling import TrajectorySampler


@pytest.fixture(scope="module")
def flow_policy(tiny_flow_pipeline_dir):
    return load_policy(tiny_flow_pipeline_dir)


@pytest.fixture(scope="module")
def ddim_policy(tiny_pipeline_dir):
    return load_policy(tiny_pipeline_dir)


def test_each_family_builds_its_own_kernels(ddim_policy, tiny_lcm_pipeline_dir, flow_policy):
    assert type(ddim_policy.kernel(SamplerConfig("ddim", 3))) is DDIMKernel
    assert type(load_policy(tiny_lcm_pipeline_dir).kernel(SamplerConfig("lcm", 3))) is LCMKernel
    assert type(flow_policy.kernel(SamplerConfig("flow", 3, eta=0.7))) is FlowGRPOKernel
    assert type(flow_policy.kernel(SamplerConfig("flow", 3, eta=0.3, flow_sde="dance-grpo"))) is DanceGRPOKernel
    kernel = flow_policy.kernel(SamplerConfig("flow", 4, eta=0.7))
    assert kernel.noise_levels.tolist() == [0.7] * 4 and kernel.noise_levels.dtype == torch.float64


@pytest.mark.parametrize("level", [1.0, 0.7, 0.3, 1 / 3])
def test_per_sample_levels_give_the_bits_of_a_number(level):
    """Every kernel multiplies by its noise level; the per-step levels (float64, as the kernels
    hold them) must give exactly what the Python number does, or a restructure that moved the
    level into the kernel would have changed every recorded number."""
    generator = torch.Generator().manual_seed(0)
    x, prediction = torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 2, 4, 4, generator=generator)
    levels = torch.full((3,), level, dtype=torch.float64)
    alpha_t, alpha_prev = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.5, 0.9, 0.99])
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64), torch.tensor([0.6, 0.3, 0.1])
    sigma_max = torch.full((3,), 0.6)
    pairs = [
        (ddim_transition(prediction, x, alpha_t, alpha_prev, level),
         ddim_transition(prediction, x, alpha_t, alpha_prev, levels)),
        (flow_transition(prediction, x, sigma, sigma_next, sigma_max, level),
         flow_transition(prediction, x, sigma, sigma_next, sigma_max, levels)),
        (dance_flow_transition(prediction, x, sigma, sigma_next, level),
         dance_flow_transition(prediction, x, sigma, sigma_next, levels)),
    ]
    for number, per_sample in pairs:
        for a, b in zip(number, per_sample):
            assert torch.equal(a, b)


@pytest.mark.parametrize("flow_sde,eta", [("flow-grpo", 0.7), ("dance-grpo", 0.3)])
def test_a_step_at_level_zero_is_the_ode_step_and_the_others_are_unchanged(flow_policy, flow_sde, eta):
    """Levels (eta, 0, eta): step 1 has std 0 and the ODE sampler's mean, steps 0 and 2 are
    the SDE sampler's exactly, on the same inputs (what MixGRPO's window samples)."""
    sde = TrajectorySampler(flow_policy, SamplerConfig("flow", 3, eta=eta, flow_sde=flow_sde))
    ode = TrajectorySampler(flow_policy, SamplerConfig("flow", 3, eta=0.0, flow_sde=flow_sde))
    mixed = sde.with_noise_levels(torch.tensor([eta, 0.0, eta], dtype=torch.float64))
    assert mixed.kernel.noise_levels.tolist() == [eta, 0.0, eta] and sde.kernel.noise_levels.tolist() == [eta] * 3
    x = torch.randn(2, *flow_policy.latent_shape, generator=torch.Generator().manual_seed(1))
    embeds = flow_policy.encode_prompts(["a red circle", "a blue square"])
    with torch.no_grad():
        for k in range(3):
            step = torch.full((2,), k)
            mean, std, pred_x0 = mixed.transition(x, step, embeds)
            expected = (ode if k == 1 else sde).transition(x, step, embeds)
            assert torch.equal(mean, expected[0]) and torch.equal(std, expected[1]) and torch.equal(pred_x0, expected[2])
            assert (std == 0).all() == (k == 1)


def test_noise_levels_must_have_one_level_per_step(ddim_policy):
    sampler = TrajectorySampler(ddim_policy, SamplerConfig("ddim", 3))
    with pytest.raises(ValueError, match="noise levels of shape \\(2,\\) for a 3-step kernel"):
        sampler.with_noise_levels(torch.zeros(2))
