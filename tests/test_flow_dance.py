"""DanceGRPO's SDE as the flow sampler's alternative (`SamplerConfig.flow_sde` "dance-grpo"):
worked numbers of its step, exact re-scoring of stored transitions (its Euler ODE at
eta 0 is checked beside Flow-GRPO's in tests/test_flow.py), the sampler's dispatch to it, the refusals naming the flag, and the way the
setting travels from a preset or a per-algorithm flag to training and config.json."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

import zoo.kernels
from benchmarks.cli import UsageError, parse_args, preset_algo_configs
from benchmarks.plan import make_plan
from benchmarks.presets import tiny_flow
from benchmarks.run import main
from benchmarks.train import training_sampler_config
from zoo.grpo import GRPOConfig
from zoo.loading import load_policy
from zoo.policy import Policy
from zoo.kernels import dance_flow_transition, flow_transition
from zoo.kernels import SamplerConfig, SamplerConfigError
from zoo.sampling import TrajectorySampler

from helpers.policies import SHAPE_PROMPTS, assert_rescoring_gives_ratio_one
from helpers.runs import micro_args


@pytest.fixture(scope="module")
def flow_policy(tiny_flow_pipeline_dir) -> Policy:
    return load_policy(tiny_flow_pipeline_dir)


def _dance(steps: int, eta: float = 0.3, guidance: float = 1.0) -> SamplerConfig:
    return SamplerConfig("flow", steps, eta=eta, guidance_scale=guidance, flow_sde="dance-grpo")


def test_dance_step_worked_numbers():
    """σ = 0.75 -> σ' = 0.5, eta = 0.3 (DanceGRPO's FLUX eta), x = 1, v = 2; dt = -0.25.
    x̂0 = x - σ·v = 1 - 1.5 = -0.5.
    score = -(x - (1-σ)·x̂0)/σ² = -(1 + 0.125)/0.5625 = -2   (DanceGRPO's form)
          = -(x + (1-σ)·v)/σ  = -(1 + 0.5)/0.75    = -2   (the form computed).
    mean = x + v·dt - ½·eta²·score·dt = 1 - 0.5 - 0.5·0.09·(-2)·(-0.25) = 0.5 - 0.0225 = 0.4775.
    std = eta·sqrt(σ - σ') = 0.3·0.5 = 0.15."""
    one = torch.ones(1)
    mean, std, pred_x0 = dance_flow_transition(2 * one.view(1, 1, 1, 1), one.view(1, 1, 1, 1), 0.75 * one, 0.5 * one, 0.3)
    assert mean.item() == pytest.approx(0.4775, abs=1e-6)
    assert std.item() == pytest.approx(0.15, abs=1e-6)
    assert pred_x0.item() == pytest.approx(-0.5, abs=1e-6)
    assert mean.dtype == torch.float32
    mean64, _, _ = dance_flow_transition(2 * one.view(1, 1, 1, 1).double(), one.view(1, 1, 1, 1).double(), 0.75 * one,
                                         0.5 * one, 0.3)
    assert mean64.dtype == torch.float64


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_rescoring_a_stored_transition_gives_ratio_one(flow_policy, guidance):
    """|exp(logp - stored) - 1| <= 1e-6 at K = 1, 2, 4, 8, in float32, with and without CFG."""
    for steps in (1, 2, 4, 8):
        assert_rescoring_gives_ratio_one(flow_policy, _dance(steps, guidance=guidance))


def test_the_sampler_steps_with_dancegrpos_sde_not_flow_grpos(flow_policy):
    """A "dance-grpo" sampler's transition is `dance_flow_transition` of the guided velocity,
    and at the same eta it is not Flow-GRPO's (whose transition the default sampler takes)."""
    steps, guidance = 4, 4.5
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *flow_policy.latent_shape, generator=generator)
    embeds = flow_policy.encode_prompts(SHAPE_PROMPTS)
    dance = TrajectorySampler(flow_policy, _dance(steps, eta=0.7, guidance=guidance))
    flow_grpo = TrajectorySampler(flow_policy, SamplerConfig("flow", steps, eta=0.7, guidance_scale=guidance))
    s = dance.kernel
    for k in range(steps):
        step = torch.full((2,), k, dtype=torch.long)
        with torch.no_grad():
            velocity = dance.predict(x, s.timesteps[step], embeds, guidance)
            mean, std, pred_x0 = dance.transition(x, step, embeds)
            other_mean, other_std, _ = flow_grpo.transition(x, step, embeds)
        expected = dance_flow_transition(velocity, x, s.sigma[step], s.sigma_next[step], 0.7)
        for ours, theirs in zip((mean, std, pred_x0), expected):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert (mean - other_mean).abs().max() > 1e-3 and (std - other_std).abs().max() > 1e-3
        flow_grpo_expected, _, _ = flow_transition(velocity, x, s.sigma[step], s.sigma_next[step],
                                                   s.sigma_next[0].expand(2), 0.7)
        torch.testing.assert_close(other_mean, flow_grpo_expected, rtol=0, atol=0)


def test_bad_settings_are_refused_naming_the_flag():
    with pytest.raises(SamplerConfigError, match="--flow-sde dance-grpo is an SDE of the flow sampler.*--sampler flow"):
        SamplerConfig("ddim", 4, flow_sde="dance-grpo").validate(for_training=False)
    with pytest.raises(SamplerConfigError, match="--flow-sde must be one of flow-grpo, dance-grpo, got 'dance'"):
        SamplerConfig("flow", 4, eta=0.3, flow_sde="dance").validate(for_training=False)
    with pytest.raises(SamplerConfigError, match="--eta 0 .*--eta 0.3 \\(DanceGRPO's"):
        _dance(4, eta=0.0).validate(for_training=True)
    with pytest.raises(ValueError, match="flow_sde dance-grpo is an SDE of the flow sampler, not of ddim"):
        GRPOConfig(sampler="ddim", flow_sde="dance-grpo")
    with pytest.raises(UsageError, match="--grpo.flow-sde: flow_sde dance-grpo .* not of ddim"):
        parse_args(["--preset", "tiny", "--grpo.flow-sde", "dance-grpo"])


def test_a_preset_sets_it_for_every_algorithm_and_the_trainer_samples_with_it():
    preset = dataclasses.replace(tiny_flow(), flow_sde="dance-grpo", eta=0.3)
    configs = preset_algo_configs(preset, preset.reward)
    eval_settings = SimpleNamespace(eval=SimpleNamespace(sampler="flow", timestep_spacing=None))
    for field in dataclasses.fields(configs):
        config = getattr(configs, field.name)
        assert config.flow_sde == "dance-grpo", field.name
        assert training_sampler_config(config, eval_settings).flow_sde == "dance-grpo"


def test_runs_recorded_before_the_setting_resume_with_flow_grpos_sde(tmp_path):
    """A config.json whose algorithm configs lack flow_sde sampled with Flow-GRPO's SDE, the
    only one there was: it resumes as that, and refuses a --resume that asks for DanceGRPO's."""
    flags = ["--preset", "tiny-flow", "--algos", "grpo", "--reward", "jpeg_compressibility", "--out", str(tmp_path / "run")]
    recorded = make_plan(parse_args(flags)).config_json()
    for config in recorded["algorithm_configs"].values():
        del config["flow_sde"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps(recorded))
    make_plan(parse_args([*flags, "--resume"]))
    with pytest.raises(UsageError, match="--grpo.flow-sde flow-grpo there, dance-grpo here"):
        make_plan(parse_args([*flags, "--resume", "--grpo.flow-sde", "dance-grpo", "--grpo.eta", "0.3"]))


def test_grpo_trains_with_dancegrpos_sde_from_its_flag(tiny_flow_pipeline_dir, tmp_path, monkeypatch):
    """`--grpo.flow-sde dance-grpo` reaches the training sampler (every transition is
    DanceGRPO's) and config.json; the evaluation samples the ODE, as with Flow-GRPO's SDE."""
    etas = []
    real = zoo.kernels.dance_flow_transition

    def spy(velocity, x, sigma, sigma_next, eta):
        etas.extend(eta.tolist())  # the kernel's per-step noise levels of the batch
        return real(velocity, x, sigma, sigma_next, eta)

    monkeypatch.setattr(zoo.kernels, "dance_flow_transition", spy)
    out = tmp_path / "run"
    args = micro_args(tiny_flow_pipeline_dir, out, "tiny-flow") + ["--algos", "grpo",
                                                       "--grpo.flow-sde", "dance-grpo", "--grpo.eta", "0.3"]
    assert main(args) == 0
    assert etas and set(etas) == {0.3}
    config = json.loads((out / "config.json").read_text())["algorithm_configs"]["grpo"]
    assert config["flow_sde"] == "dance-grpo" and config["eta"] == 0.3
